"""Correctness of the sparse CPU kernel against dense ``F.linear`` (no timing here)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from jupyter_sparsify import kernels

from helpers import assert_within_linear_bound


def random_weight(out_f: int, in_f: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen)
    return (weight * (torch.rand(out_f, in_f, generator=gen) >= sparsity)).to(dtype)


INDEX_DTYPES = [torch.uint8, torch.int16]


def check(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run the kernel on compress(weight, index_dtype) and compare with fp32 F.linear within the fp error bound."""
    out_f, in_f = weight.shape
    y = kernels.sparse_linear(x, *kernels.compress(weight, index_dtype), bias, out_f, in_f)
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], out_f)
    assert_within_linear_bound(y, x, weight, bias)
    return y


def test_the_error_bound_catches_a_wrong_kernel() -> None:
    """The bound every check uses is tight enough that a kernel which drops one ordinary weight, or writes
    each row's output one row over, fails it."""
    weight = random_weight(192, 576, 0.5, torch.float32)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(1))
    values, cols, row_ptr = kernels.compress(weight)
    assert_within_linear_bound(kernels.sparse_linear(x, values, cols, row_ptr, None, 192, 576), x, weight)
    dropped = values.clone()
    dropped[values.abs().argsort()[len(values) // 2]] = 0  # the median nonzero, not the largest
    with pytest.raises(AssertionError, match="beyond the fp error bound"):
        assert_within_linear_bound(kernels.sparse_linear(x, dropped, cols, row_ptr, None, 192, 576), x, weight)
    shifted = kernels.sparse_linear(x, values, cols, row_ptr, None, 192, 576).roll(1, dims=-1)
    with pytest.raises(AssertionError, match="beyond the fp error bound"):
        assert_within_linear_bound(shifted, x, weight)


def test_index_dtype_for() -> None:
    assert kernels.index_dtype_for(7) == torch.int16
    assert kernels.index_dtype_for(65536) == torch.int16
    assert kernels.index_dtype_for(65537) == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_layout(dtype: torch.dtype) -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]], dtype=dtype)
    values, cols, row_ptr = kernels.compress(weight, torch.uint8)
    assert values.dtype == dtype and cols.dtype == torch.uint8 and row_ptr.dtype == torch.int32
    assert values.tolist() == [1.5, -2.0, 3.0, 4.0]
    assert cols.tolist() == [0b1010, 0, 0, 0, 0, 0, 0, 0] + [0] * 8 + [0b1001, 0, 0, 0, 0, 0, 0, 0]  # one word per row
    assert row_ptr.tolist() == [0, 2, 2, 4]
    assert kernels.column_positions(cols, 4).tolist() == [1, 3, 0, 3]
    absolute = kernels.compress(weight, torch.int16)
    assert absolute[1].dtype == torch.int16 and absolute[1].tolist() == [1, 3, 0, 3]
    assert kernels.column_positions(absolute[1], 4).tolist() == [1, 3, 0, 3]
    assert kernels.compress(weight, torch.int32)[1].dtype == torch.int32


def test_bitmap_rows_span_several_words() -> None:
    """Columns on both sides of each 64-bit word boundary and in a last, partial word decode
    back to the weight, and the layer still computes F.linear for one token and for many."""
    weight = torch.zeros(4, 200)
    real = {0: [0, 15, 16, 63, 64, 127, 128, 199], 1: [100], 2: [], 3: list(range(130, 200))}
    for row, cols in real.items():
        weight[row, cols] = torch.arange(1, len(cols) + 1, dtype=torch.float32)
    values, bitmap, row_ptr = kernels.compress(weight, torch.uint8)
    assert bitmap.numel() == 4 * 4 * 8 and row_ptr.diff().tolist() == [8, 1, 0, 70]
    rows = torch.repeat_interleave(torch.arange(4), row_ptr.diff().long())
    rebuilt = torch.zeros_like(weight)
    rebuilt[rows, kernels.column_positions(bitmap, 200)] = values
    assert torch.equal(rebuilt, weight)
    for tokens in (1, 7, 40):
        check(torch.randn(tokens, 200), weight, torch.randn(4), torch.uint8)


def test_default_index_format_is_the_smallest() -> None:
    scattered = torch.zeros(2, 70000)
    scattered[:, ::5000] = 1.0  # 14 nonzeros per row: int32 indices are smaller than a 70000-bit bitmap
    assert kernels.compress(scattered)[1].dtype == torch.int32
    assert kernels.compress(random_weight(30, 70000, 0.9, torch.float32))[1].dtype == torch.uint8
    # a bitmap costs 1/8 byte per weight, uint16 indices 2 bytes per nonzero: uint16 wins beyond 15/16 sparsity
    assert kernels.compress(random_weight(64, 576, 0.97, torch.float32))[1].dtype == torch.int16
    assert kernels.compress(random_weight(64, 576, 0.9, torch.float32))[1].dtype == torch.uint8


def test_compress_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        kernels.compress(torch.ones(3))
    with pytest.raises(ValueError):
        kernels.compress(torch.ones(2, 3), torch.int64)
    with pytest.raises(ValueError):
        kernels.compress(torch.ones(2, 3), torch.int8)
    with pytest.raises(ValueError):
        kernels.compress(torch.ones(1, 65537), torch.int16)


def test_compress_uint16_columns_above_32767() -> None:
    weight = torch.zeros(3, 40000)
    weight[0, [5, 32767, 32768, 39999]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weight[2, 65535 % 40000] = 5.0
    values, cols, _ = kernels.compress(weight, torch.int16)
    assert cols.dtype == torch.int16
    assert (cols.to(torch.int32) & 0xFFFF).tolist() == [5, 32767, 32768, 39999, 25535]


@pytest.mark.parametrize("in_f", [40000, 65536, 70000])
@pytest.mark.parametrize("index_dtype", [None, torch.uint8])
def test_wide_inputs(in_f: int, index_dtype: torch.dtype | None) -> None:
    weight = torch.zeros(4, in_f)
    cols = torch.tensor([0, 100, 32767, 32768, 50000 % in_f, in_f - 1])
    weight[:, cols] = torch.randn(4, len(cols))
    expected = index_dtype or kernels.index_dtype_for(in_f)  # long gaps: absolute indices are smaller
    assert kernels.compress(weight, index_dtype)[1].dtype == expected
    for tokens in (1, 3, 20):
        check(torch.randn(tokens, in_f), weight, torch.randn(4), index_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (576, 576), (1536, 576)])
@pytest.mark.parametrize("tokens", [1, 3, 16, 20, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_matches_dense(
    dtype: torch.dtype, shape: tuple[int, int], tokens: int, sparsity: float, index_dtype: torch.dtype
) -> None:
    weight = random_weight(*shape, sparsity, dtype)
    x = torch.randn(tokens, shape[1]).to(dtype)
    check(x, weight, None, index_dtype)
    check(x, weight, torch.randn(shape[0]).to(dtype), index_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f", [13, 100, 576])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_one_token_at_every_row_density(dtype: torch.dtype, in_f: int, index_dtype: torch.dtype) -> None:
    """Rows of all densities, and rows whose nonzeros crowd the last columns (the last rows of
    the values use masked loads), must agree with dense for one token."""
    densities = torch.linspace(0.05, 1.0, 20)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(len(densities) + 2, in_f, generator=gen)
    mask = torch.rand(weight.shape, generator=gen) < torch.cat([densities, torch.ones(2)])[:, None]
    mask[-2, : in_f - 20] = False  # last 20 columns only
    mask[-1, : in_f - 40] = False
    check(torch.randn(1, in_f).to(dtype), (weight * mask).to(dtype), torch.randn(len(weight)), index_dtype)


@pytest.mark.parametrize("out_f,in_f", [(1, 40000), (2, 40000), (3, 20000), (5, 9000), (6, 64)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_one_token_with_few_rows_per_thread(out_f: int, in_f: int, threads: int, index_dtype: torch.dtype) -> None:
    """Decoding splits each thread's rows into interleaved streams: ranges of zero, one or a
    few rows per stream (long rows, so that several threads take part) must agree with dense.
    Positive inputs: a sum of 28 000 terms of mixed signs may cancel below the error bound."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = random_weight(out_f, in_f, 0.3, torch.float32).abs()
        check(torch.rand(1, in_f), weight, torch.rand(out_f), index_dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 16, 70])
def test_all_zero_rows_and_matrix(tokens: int) -> None:
    weight = random_weight(64, 96, 0.3, torch.float32)
    weight[[0, 5, 63]] = 0.0
    bias = torch.randn(64)
    y = check(torch.randn(tokens, 96), weight, bias)
    assert torch.equal(y[:, 5], bias[5].expand(tokens))
    y = check(torch.randn(tokens, 96), torch.zeros(64, 96), bias)
    assert torch.equal(y, bias.expand(tokens, 64))


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_non_contiguous_and_3d_inputs(tokens: int) -> None:
    weight = random_weight(48, 80, 0.5, torch.float32)
    bias = torch.randn(48)
    check(torch.randn(80, tokens).t(), weight, bias)  # transposed
    check(torch.randn(tokens, 160)[:, ::2], weight, bias)  # strided columns
    check(torch.randn(2, tokens, 80), weight, bias)  # 3-D
    check(torch.randn(3, 80, tokens).transpose(1, 2), weight, None)  # 3-D, non-contiguous
    check(torch.randn(0, 80), weight, bias)  # no tokens


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_mixed_dtypes(tokens: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    weight = random_weight(40, 72, 0.5, w_dtype)
    check(torch.randn(tokens, 72).to(x_dtype), weight, torch.randn(40))  # fp32 bias with any x


def test_concurrent_calls_and_long_inputs() -> None:
    """Python threads may call the kernel at once (it releases the GIL and keeps per-thread
    scratch buffers); more than 256 tokens are processed in chunks."""
    weight = random_weight(300, 400, 0.5, torch.float32)
    bias = torch.randn(300)
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(check, torch.randn(t, 400), weight, bias) for t in (1, 5, 40, 300, 600) * 4]:
            future.result()


def test_int64_row_ptr_and_int32_columns() -> None:
    weight = random_weight(33, 50, 0.6, torch.float32)
    values, cols, row_ptr = kernels.compress(weight, torch.int32)
    x = torch.randn(9, 50)
    y = kernels.sparse_linear(x, values, cols, row_ptr.long(), None, 33, 50)
    assert_within_linear_bound(y, x, weight)


def test_rejects_wrong_shapes() -> None:
    values, cols, row_ptr = kernels.compress(random_weight(8, 16, 0.5, torch.float32))
    with pytest.raises(RuntimeError):
        kernels.sparse_linear(torch.randn(2, 15), values, cols, row_ptr, None, 8, 16)
    with pytest.raises(RuntimeError):
        kernels.sparse_linear(torch.randn(2, 16), values, cols, row_ptr, None, 9, 16)
    with pytest.raises(RuntimeError):
        kernels.sparse_linear(torch.randn(2, 16), values, cols, row_ptr, torch.randn(3), 8, 16)
    assert cols.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="64-bit words per row"):
        kernels.sparse_linear(torch.randn(2, 16), values, cols[:-8], row_ptr, None, 8, 16)
    with pytest.raises(RuntimeError, match="64-bit words per row"):  # not 8-byte aligned
        kernels.sparse_linear(torch.randn(2, 16), values, torch.cat([cols[:1], cols])[1:], row_ptr, None, 8, 16)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_fallback_instruction_sets(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code paths for CPUs without AVX-512 agree with dense too."""
    flags = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": []}[isa]
    monkeypatch.setattr(kernels, "_isa_cflags", lambda: flags)
    monkeypatch.setattr(kernels, "_module", None)
    kernels.ensure_compiled()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((7, 13), (100, 300)):
            weight = random_weight(*shape, 0.5, dtype)
            for tokens, index_dtype in itertools.product((1, 3, 40), INDEX_DTYPES):
                check(torch.randn(tokens, shape[1]).to(dtype), weight, torch.randn(shape[0]), index_dtype)


def test_unavailable_when_build_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(**_: object) -> None:
        raise OSError("no C++ compiler found")

    monkeypatch.setenv("JUPYTER_SPARSIFY_CACHE", str(tmp_path))  # an empty cache: the kernel must be built
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(cpp_extension, "load_inline", fail)
    with pytest.warns(UserWarning, match="could not build the sparse CPU kernel.*torch's CSR matmul is used instead"):
        assert not kernels.is_available()
    with pytest.raises(RuntimeError, match="could not build the sparse CPU kernel"):
        kernels.ensure_compiled()


def test_another_process_reuses_the_disk_cache_and_torch_openmp() -> None:
    """A fresh process loads the cached library without rebuilding it, and the kernel adds
    no second OpenMP runtime next to torch's."""
    kernels.ensure_compiled()
    library = Path(kernels._module.__file__)
    assert library.parent.parent == kernels.cache_dir() / "kernels"
    mtime = library.stat().st_mtime_ns
    code = (
        "import torch; from jupyter_sparsify import kernels; before = kernels._openmp_runtimes(); "
        "kernels.ensure_compiled(); print(kernels._module.__file__); print(before == kernels._openmp_runtimes())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path, same_runtimes = result.stdout.split()
    assert os.path.samefile(path, library)
    assert library.stat().st_mtime_ns == mtime
    assert same_runtimes == "True"


def test_the_kernel_builds_on_this_machine():
    """The project's machines have a compiler: the fast backend must be there, not silently skipped."""
    assert kernels.is_available()

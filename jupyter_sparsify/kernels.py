"""Sparse CPU kernels for pruned linear layers: CSR with compact column indices.

Column indices are stored as 8-bit deltas (the gap to the previous nonzero of the row) where
that is smallest, which is nearly always: a CSR nonzero then costs its value + 1 byte.

The kernel is a C++ torch extension compiled on first use (``torch.utils.cpp_extension``,
needs a C++ compiler and ``ninja``) and cached under ``$JUPYTER_SPARSIFY_CACHE/kernels``
(default ``~/.cache/jupyter_sparsify/kernels``). It runs on torch's own thread pool, so it
does not compete with the model's dense ops for cores. When it cannot be built,
:func:`is_available` returns False and callers fall back to torch's CSR matmul.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from .models import cache_dir

_SOURCE = Path(__file__).parent / "kernels_src" / "sparse_linear.cpp"
_module: ModuleType | None = None
_error: str | None = None


def index_dtype_for(in_features: int) -> torch.dtype:
    """Compact column-index dtype: int16 (holding uint16 bits) up to 65536 columns, else int32."""
    return torch.int16 if in_features <= 65536 else torch.int32


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _isa_cflags() -> list[str]:
    """Vector ISA flags this CPU supports (AVX-512 or AVX2), decided at compile time."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"} <= flags:
        vnni = ["-mavx512vnni"] if "avx512_vnni" in flags else []
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", *vnni]
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (torch's, once torch is imported)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in lines if "/lib" in line}
    return sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp5", "libomp")))


def _openmp_ldflags() -> list[str]:
    """Link against the OpenMP runtime torch already loaded, so no second thread pool appears."""
    runtimes = _openmp_runtimes()
    if len(runtimes) == 1:
        return [runtimes[0], f"-Wl,-rpath,{Path(runtimes[0]).parent}"]
    return ["-fopenmp"]


def ensure_compiled(verbose: bool = False) -> None:
    """Compile the kernel (or load it from the disk cache); raise RuntimeError on failure."""
    global _module, _error
    if _module is not None:
        return
    if _error is not None:
        raise RuntimeError(_error)
    from torch.utils import cpp_extension

    source = _SOURCE.read_text()
    cflags = ["-O3", "-fopenmp", *_isa_cflags()]
    ldflags = _openmp_ldflags()
    key = "\0".join([source, *cflags, *ldflags, torch.__version__, sys.version])
    name = "jupyter_sparsify_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    build_dir = cache_dir() / "kernels" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load_inline(
            name=name,
            cpp_sources=[source],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as exc:  # compiler, ninja or linker missing or failing
        _error = (
            f"jupyter_sparsify: could not build the sparse CPU kernel in {build_dir} "
            f"({type(exc).__name__}: {exc}). It needs a C++ compiler (g++/clang++) and the "
            "'ninja' package; torch's CSR matmul is used instead."
        )
        raise RuntimeError(_error) from exc


def is_available() -> bool:
    """True when the compiled kernel can be loaded (compiles on first call, cached on disk)."""
    try:
        ensure_compiled()
    except RuntimeError:
        return False
    return True


def compress(
    weight: torch.Tensor, index_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``[out, in]`` weight -> CSR ``(values, col_indices, row_ptr)`` without zeros.

    ``index_dtype`` picks the column-index format:

    * ``torch.uint8``: delta-coded, each entry's column minus the previous entry's column in
      its row (the first entry's minus 0). A gap over 255 is bridged by explicit zero entries
      (value 0, delta 255), so ``values`` may hold a few zeros; they are multiplied like any
      other entry and counted in the storage.
    * ``torch.int16`` (uint16 bit patterns, up to 65536 columns) or ``torch.int32``: absolute.
    * ``None`` (default): whichever of uint8 deltas and :func:`index_dtype_for` takes fewer bytes.

    Values keep the weight's dtype; row_ptr is int32 when the entry count fits, else int64.
    """
    if weight.dim() != 2:
        raise ValueError(f"compress expects a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    absolute = index_dtype_for(in_features)
    if index_dtype not in (None, torch.uint8, torch.int16, torch.int32):
        raise ValueError(f"index_dtype must be torch.uint8, torch.int16, torch.int32 or None, got {index_dtype}")
    if index_dtype == torch.int16 and in_features > 65536:
        raise ValueError(f"int16 column indices hold at most 65536 columns, got {in_features}")
    weight = weight.detach()
    mask = weight != 0
    counts = mask.sum(dim=1)
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, dim=0, out=row_ptr[1:])
    columns = _nonzero_columns(mask)
    values = weight[mask].contiguous()
    if index_dtype in (None, torch.uint8):
        gaps, padding = _gaps(columns, row_ptr)
        delta_bytes = (values.numel() + int(padding.sum())) * (values.element_size() + 1)
        if index_dtype == torch.uint8 or delta_bytes <= values.numel() * (values.element_size() + absolute.itemsize):
            return _delta_coded(values, gaps, padding, row_ptr)
    # int32 -> int16 keeps the low 16 bits, so columns above 32767 become their uint16 bit patterns.
    return values, columns.to(index_dtype or absolute), _row_ptr_dtype(row_ptr)


def _nonzero_columns(mask: torch.Tensor) -> torch.Tensor:
    """int32 column of every true entry, row by row; row blocks bound nonzero()'s int64 temporaries."""
    out_features, in_features = mask.shape
    step = max(1, 2**24 // max(1, in_features))
    blocks = [mask[r : r + step].nonzero()[:, 1].to(torch.int32) for r in range(0, out_features, step)]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int32, device=mask.device)


def _gaps(columns: torch.Tensor, row_ptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's column minus the previous one in its row (0 before a row), and the zero
    entries needed in front of it so that every delta fits in 8 bits."""
    previous = torch.zeros_like(columns)
    previous[1:] = columns[:-1]
    starts = row_ptr[:-1][row_ptr[:-1] < row_ptr[1:]]  # first entry of each non-empty row
    previous[starts] = 0
    gaps = columns - previous
    return gaps, (gaps - 1).clamp_(min=0) // 255


def _delta_coded(
    values: torch.Tensor, gaps: torch.Tensor, padding: torch.Tensor, row_ptr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uint8 delta layout: padding entries (value 0, delta 255) before long gaps."""
    padding = padding.long()
    slots = torch.cumsum(padding + 1, dim=0) - 1  # where each real entry lands
    total = int(slots[-1]) + 1 if len(slots) else 0
    deltas = torch.full((total,), 255, dtype=torch.uint8, device=values.device)
    deltas[slots] = (gaps - 255 * padding).to(torch.uint8)
    padded = torch.zeros(total, dtype=values.dtype, device=values.device)
    padded[slots] = values
    padding_before = torch.zeros(len(padding) + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(padding, dim=0, out=padding_before[1:])
    return padded, deltas, _row_ptr_dtype(row_ptr + padding_before[row_ptr])


def _row_ptr_dtype(row_ptr: torch.Tensor) -> torch.Tensor:
    return row_ptr.to(torch.int32) if int(row_ptr[-1]) < 2**31 else row_ptr


def column_positions(col_indices: torch.Tensor, row_ptr: torch.Tensor) -> torch.Tensor:
    """The int64 column of every stored entry, whatever the index format of :func:`compress`."""
    if col_indices.dtype == torch.int16:
        return col_indices.long() & 0xFFFF
    if col_indices.dtype != torch.uint8:
        return col_indices.long()
    running = torch.cumsum(col_indices, dim=0, dtype=torch.int64)
    before = torch.cat([running.new_zeros(1), running])[row_ptr[:-1].long()]  # running sum before each row
    counts = row_ptr.diff().long()
    return running - torch.repeat_interleave(before, counts)


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_ptr: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the CSR weight from :func:`compress`; x is ``[..., in]`` on CPU.

    Returns ``[..., out]`` in x's dtype, accumulating in fp32 (inference only: no autograd).
    Rows are split across torch's intra-op threads. One token streams the nonzeros once
    (vector gathers, or permutes for dense rows); several tokens are tiled so each nonzero
    is loaded once per tile of up to 64 tokens. The indices must be as :func:`compress`
    makes them (they are not bounds-checked per call).
    """
    if _module is None:
        ensure_compiled()
    return _module.sparse_linear(x, values, col_indices, row_ptr, bias, out_features, in_features)

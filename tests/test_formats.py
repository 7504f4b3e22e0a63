"""CSRLinear: round trips, dtypes, shapes, state_dict and deepcopy, for both backends."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.layers import weight_matrix

from helpers import assert_within_linear_bound

BACKENDS = ["torch", "fast"]


def pruned_linear(out_features=48, in_features=40, dtype=torch.float32, bias=True, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.6] = 0
    return layer.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_dense_for_every_dtype(backend, dtype):
    dense = pruned_linear(dtype=dtype)
    sparse = CSRLinear.from_dense(dense, backend)
    x = torch.randn(2, 5, 40).to(dtype)
    out = sparse(x)
    assert out.dtype == dtype and out.shape == (2, 5, 48)
    assert_within_linear_bound(out, x, dense.weight, dense.bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_no_bias(backend):
    dense = pruned_linear(bias=False)
    sparse = CSRLinear.from_dense(dense, backend)
    x = torch.randn(40, 6).t()  # [6, 40], not contiguous
    assert not x.is_contiguous()
    assert_within_linear_bound(sparse(x), x, dense.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_to_dense_is_exact(backend):
    dense = pruned_linear()
    back = CSRLinear.from_dense(dense, backend).to_dense()
    assert isinstance(back, torch.nn.Linear)
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)


def test_conv1d_round_trip_keeps_the_transposed_layout():
    conv = Conv1D(48, 40)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.5] = 0
    sparse = CSRLinear.from_dense(conv, "torch")
    x = torch.randn(3, 40)
    assert_within_linear_bound(sparse(x), x, weight_matrix(conv), conv.bias)
    back = sparse.to_dense()
    assert isinstance(back, Conv1D) and torch.equal(back.weight, conv.weight)
    assert torch.equal(sparse.dense_weight(), weight_matrix(conv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_saves_and_loads_into_a_layer_of_another_nnz(backend):
    source = CSRLinear.from_dense(pruned_linear(seed=1), backend)
    target = CSRLinear.from_dense(pruned_linear(seed=2), backend)
    assert source.nnz != target.nnz
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 40)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_is_independent(backend):
    sparse = CSRLinear.from_dense(pruned_linear(), backend)
    clone = copy.deepcopy(sparse)
    x = torch.randn(4, 40)
    assert torch.equal(clone(x), sparse(x))
    clone.values.zero_()
    assert not torch.equal(clone(x), sparse(x))


def test_storage_uses_compact_indices():
    dense = pruned_linear()
    fast = CSRLinear.from_dense(dense, "fast")
    reference = CSRLinear.from_dense(dense, "torch")
    assert fast.col_indices.dtype == torch.uint8 and reference.col_indices.dtype == torch.int32
    assert fast.crow_indices.dtype == torch.int32
    assert fast.nnz == reference.nnz == int(torch.count_nonzero(dense.weight))
    assert "bitmap" in repr(fast) and "int32" in repr(reference)


def test_fast_backend_round_trips_a_bitmap_layer():
    dense = torch.nn.Linear(700, 3)
    with torch.no_grad():
        dense.weight[0] = 0.0
        dense.weight[0, [3, 600]] = 1.0
    sparse = CSRLinear.from_dense(dense, "fast")
    assert sparse.col_indices.dtype == torch.uint8 and sparse.col_indices.numel() == 3 * 11 * 8  # 11 words per row
    assert sparse.nnz == 2 + 2 * 700 == torch.count_nonzero(sparse.values)
    assert torch.equal(sparse.to_dense().weight, dense.weight)
    x = torch.randn(5, 700)
    assert_within_linear_bound(sparse(x), x, dense.weight, dense.bias)

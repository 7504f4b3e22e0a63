"""Pure measurements of a model: storage, sparsity, compute, agreement, perplexity.

Every figure here is defined so that it is true of what the model really holds and runs:
sizes count every distinct tensor at its real dtype (sparse indices included, tied weights
once); compute counts the matmul work of the linear layers, the output head included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from .experts import active_shares
from .formats import CSRLinear
from .layers import is_linear_like

MIB = 2**20
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_COUNT_CHUNK = 1 << 18


def distinct_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of the model, a tensor shared by several modules once."""
    seen: set[tuple] = set()
    tensors = []
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key not in seen:
            seen.add(key)
            tensors.append(tensor)
    return tensors


def storage_bytes(model: nn.Module) -> int:
    """Bytes of all distinct parameters and buffers (CSR values and indices at their dtypes)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in distinct_tensors(model))


def size_mb(model: nn.Module) -> float:
    """:func:`storage_bytes` in MiB."""
    return storage_bytes(model) / MIB


class NonzeroCounts:
    """Nonzero count per tensor, each tensor counted once: one measurement reads the same
    weights through several metrics, and counting is a full pass over the model."""

    def __init__(self) -> None:
        self._counts: dict[tuple, int] = {}

    def __call__(self, tensor: torch.Tensor) -> int:
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in self._counts:
            self._counts[key] = count_nonzero(tensor)
        return self._counts[key]


def count_nonzero(tensor: torch.Tensor) -> int:
    """Entries of ``tensor`` that are not zero (``-0.0`` is zero).

    Float tensors on the CPU are read as same-width integers shifted left by one, which drops the
    sign bit: only ±0.0 become 0. That is 2-4x faster than ``torch.count_nonzero`` on floats.
    """
    as_int = _SAME_WIDTH_INT.get(tensor.dtype)
    if as_int is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return int(torch.count_nonzero(tensor))
    flat = tensor.reshape(-1).view(as_int)
    return sum(
        int(torch.count_nonzero(flat[start : start + _COUNT_CHUNK] << 1))
        for start in range(0, flat.numel(), _COUNT_CHUNK)
    )


@dataclass(frozen=True)
class WeightCount:
    """How many weights a set of layers has at its logical dense shape, and how many are zero."""

    total: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def count_weights(modules: Iterable[nn.Module], nonzeros: NonzeroCounts | None = None) -> WeightCount:
    """Zero count of the modules' weight matrices (dense, masked or CSR) at their logical shape."""
    nonzeros = nonzeros or NonzeroCounts()
    total = zeros = 0
    seen: set[int] = set()
    for module in modules:
        if isinstance(module, CSRLinear):
            logical = module.in_features * module.out_features
            total += logical
            zeros += logical - nonzeros(module.values)
        elif module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += module.weight.numel()
            zeros += module.weight.numel() - nonzeros(module.weight)
    return WeightCount(total, zeros)


def model_weight_count(model: nn.Module, nonzeros: NonzeroCounts | None = None) -> WeightCount:
    """Zeros among every parameter of the model, CSR layers counted at their dense shape."""
    nonzeros = nonzeros or NonzeroCounts()
    csr_modules = [module for module in model.modules() if isinstance(module, CSRLinear)]
    csr = count_weights(csr_modules, nonzeros)
    total, zeros = csr.total, csr.zeros
    for tensor in distinct_tensors(model):
        if isinstance(tensor, nn.Parameter):
            total += tensor.numel()
            zeros += tensor.numel() - nonzeros(tensor)
    return WeightCount(total, zeros)


@dataclass(frozen=True)
class LinearCompute:
    """Multiply-accumulates per token in the linear layers (head included, embeddings excluded); an MoE expert's
    layers count for the share of tokens that run them (top-k of n experts), so these may be fractional."""

    dense: float  # every weight of every linear layer
    nonzero: float  # only the nonzero weights: what a perfect sparse kernel would do
    executed: float  # what the kernels really multiply: dense layers all, CSR layers their nnz


def linear_compute(model: nn.Module, nonzeros: NonzeroCounts | None = None) -> LinearCompute:
    """MACs per token of the model's linear layers (attention score products are not included).

    In theory, for MoE models: each token runs only its top-k of the n experts of a block, so an expert's layers
    count k/n of their MACs (the average under uniform routing; a real router's load differs by expert).
    """
    nonzeros = nonzeros or NonzeroCounts()
    shares = active_shares(model)
    dense = nonzero = executed = 0
    for module in model.modules():
        share = shares.get(id(module), 1)
        if isinstance(module, CSRLinear):
            dense += share * module.in_features * module.out_features
            nonzero += share * nonzeros(module.values)
            executed += share * module.nnz
        elif is_linear_like(module):
            dense += share * module.weight.numel()
            nonzero += share * nonzeros(module.weight)
            executed += share * module.weight.numel()
    return LinearCompute(dense, nonzero, executed)


@dataclass(frozen=True)
class MatmulCoverage:
    """How many of a model's matmul weights a set of layers holds, and the owners of the rest."""

    covered: int
    uncovered: dict[str, int]  # weights outside the layers, by owner: "module type.parameter"

    @property
    def share(self) -> float:
        total = self.covered + sum(self.uncovered.values())
        return self.covered / total if total else 1.0


def matmul_coverage(model: nn.Module, modules: Iterable[nn.Module]) -> MatmulCoverage:
    """The share of the model's matmul weights held by ``modules`` (dense or CSR layers of the model).

    Matmul weights: every distinct parameter of 2 or more dimensions outside ``nn.Embedding`` modules (lookups,
    not matmuls; a head tied to the input embeddings is left out with them), CSR layers at their dense shape.
    A 2-D parameter used elementwise would count too; the supported models have none.
    """
    inside = {id(module) for module in modules}
    skip = {module.weight.data_ptr() for module in model.modules() if isinstance(module, nn.Embedding)}
    covered, uncovered = 0, {}
    for module in model.modules():
        for name, size in _matmul_weights(module, skip):
            if id(module) in inside:
                covered += size
            else:
                owner = f"{type(module).__name__}.{name}"
                uncovered[owner] = uncovered.get(owner, 0) + size
    return MatmulCoverage(covered, uncovered)


def _matmul_weights(module: nn.Module, skip: set[int]) -> Iterator[tuple[str, int]]:
    """``(parameter name, weights)`` of the module's own matmul weights whose data is not in ``skip`` (which
    then grows by them, so that a tied tensor counts once)."""
    if isinstance(module, CSRLinear):
        yield "weight", module.in_features * module.out_features
        return
    for name, tensor in module.named_parameters(recurse=False):
        if tensor.dim() >= 2 and tensor.data_ptr() not in skip:
            skip.add(tensor.data_ptr())
            yield name, tensor.numel()


def csr_break_even(value_dtype: torch.dtype, index_dtype: torch.dtype) -> float:
    """Sparsity above which a CSR layer is smaller than the dense one (row pointers neglected).

    Dense costs v bytes per weight. With an index of i bytes per nonzero CSR costs v + i per
    nonzero, so it wins when the density falls below v / (v + i): fp32 with int64 indices
    67 %, int32 50 %, uint16 33 %. ``torch.uint8`` means the bitmap of ``kernels.compress``:
    v per nonzero + 1/8 byte per weight, so CSR wins beyond 1 / (8 v) sparsity (fp32 3.1 %).
    """
    value_bytes = torch.empty(0, dtype=value_dtype).element_size()
    if index_dtype == torch.uint8:
        return 1.0 / (8 * value_bytes)
    index_bytes = torch.empty(0, dtype=index_dtype).element_size()
    return 1.0 - value_bytes / (value_bytes + index_bytes)


def top1_match(reference: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of real (mask 1) positions where two models' argmax tokens agree."""
    real = mask.bool()
    if not real.any():
        raise ValueError("the attention mask selects no token: the corpus is empty")
    return float((reference[real] == predicted[real]).float().mean())


def perplexity(nll_sum: float, token_count: int) -> float:
    """exp of the mean next-token negative log-likelihood."""
    if token_count == 0:
        raise ValueError("no next-token target in the corpus: texts need at least two tokens")
    return math.exp(nll_sum / token_count)

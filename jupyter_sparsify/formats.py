"""``CSRLinear``: a linear layer stored in compressed sparse row form, run with sparse kernels."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import kernels
from .layers import Conv1D, weight_matrix

BACKENDS = ("fast", "torch")
_BUFFERS = ("values", "col_indices", "crow_indices")
_INDEX_NAMES = {torch.uint8: "bitmap", torch.int16: "uint16", torch.int32: "int32", torch.int64: "int64"}


def default_backend(device: torch.device | str = "cpu") -> str:
    """``fast`` (this package's compiled CPU kernel) where it runs, else ``torch`` (torch's CSR)."""
    return "fast" if torch.device(device).type == "cpu" and kernels.is_available() else "torch"


def validate_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """Check a backend name (None picks :func:`default_backend`)."""
    if backend is None:
        return default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "fast":
        if torch.device(device).type != "cpu":
            raise ValueError("backend 'fast' runs on CPU only; use backend='torch' (cuSPARSE) on GPU")
        kernels.ensure_compiled()
    return backend


class CSRLinear(nn.Module):
    """A pruned ``nn.Linear`` (or GPT-2 ``Conv1D``) holding only its nonzero weights.

    Storage: ``values`` (the weight's dtype), ``col_indices`` and ``crow_indices``. The
    ``torch`` backend keeps int32 indices and runs ``torch.sparse.mm`` (fp16/bf16 are computed
    in fp32 on CPU, where torch has no half-precision CSR kernel); the ``fast`` backend stores
    the columns as a bitmap of one bit per weight (see :func:`~jupyter_sparsify.kernels.compress`;
    16- or 32-bit indices per nonzero where those are smaller) and runs this package's kernel.

    Example:
        >>> sparse = CSRLinear.from_dense(model.model.layers[0].mlp.up_proj)
        >>> dense_again = sparse.to_dense()
    """

    def __init__(
        self,
        values: torch.Tensor,
        col_indices: torch.Tensor,
        crow_indices: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
        *,
        backend: str = "torch",
        source_kind: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.source_kind = source_kind
        self.register_buffer("values", values)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("crow_indices", crow_indices)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_dense(cls, module: nn.Module, backend: str | None = None) -> "CSRLinear":
        """Compress an ``nn.Linear`` / ``Conv1D``; only nonzero weights are kept."""
        weight = weight_matrix(module).detach()
        backend = validate_backend(backend, weight.device)
        index_dtype = None if backend == "fast" else torch.int32  # torch's CSR needs int32/int64 indices
        values, col_indices, crow_indices = kernels.compress(weight, index_dtype)
        kind = "conv1d" if bool(Conv1D) and isinstance(module, Conv1D) else "linear"
        out_features, in_features = weight.shape
        return cls(
            values, col_indices, crow_indices, module.bias, in_features, out_features, backend=backend, source_kind=kind
        )

    @property
    def nnz(self) -> int:
        """Number of stored values."""
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device), self.crow_indices.diff().long()
        )
        dense[rows, kernels.column_positions(self.col_indices, self.in_features)] = self.values
        return dense

    def to_dense(self) -> nn.Module:
        """An equivalent ``nn.Linear`` (or ``Conv1D`` for a layer that came from one)."""
        weight = self.dense_weight()
        if self.source_kind == "conv1d":
            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return module.to(device=weight.device, dtype=weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "fast":
            # the dicts directly: nn.Module.__getattr__ costs more than the kernel on small decode layers
            buffers = self._buffers
            return kernels.sparse_linear(
                x,
                buffers["values"],
                buffers["col_indices"],
                buffers["crow_indices"],
                self._parameters.get("bias"),
                self.out_features,
                self.in_features,
            )
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.values.dtype
        if self.values.device.type == "cpu" and compute in (torch.float16, torch.bfloat16):
            compute = torch.float32  # torch has no fp16/bf16 CSR matmul on CPU
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
            weight = torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                self.values.to(compute),
                (self.out_features, self.in_features),
                check_invariants=False,
            )
        flat = x.reshape(-1, self.in_features).to(compute)
        out = torch.sparse.mm(weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias.to(compute)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _BUFFERS:  # nnz differs between checkpoints: take the saved sizes
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self._buffers[name] = torch.empty_like(saved, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
            f"({density:.1%} dense), values={str(self.values.dtype).replace('torch.', '')}, "
            f"indices={_INDEX_NAMES[self.col_indices.dtype]}, backend={self.backend!r}"
        )

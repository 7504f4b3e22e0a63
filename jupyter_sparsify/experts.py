"""Mixture-of-experts layers as one ``nn.Linear`` per expert matrix, so that every pruning path applies to them.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS (and the other models whose
experts module carries its ``@use_experts_implementation`` decorator with a layout handled here) as two fused 3-D
parameters per MoE block, ``gate_up_proj`` (the gate and up projections of every expert) and ``down_proj``, in the
layout the decorator's flags describe (:class:`Layout`): the standard one is [experts, 2 x intermediate, hidden]
(the gate's rows first, then the up projection's) and [experts, hidden, intermediate] without bias; GPT-OSS's is
transposed ([experts, hidden, 2 x intermediate], [experts, intermediate, hidden]), interleaved (gate and up rows
alternate) and biased. They are not ``nn.Linear``, so nothing would prune them. :func:`unfuse_experts` (run when a
``Session`` wraps the model) replaces each such module by an :class:`UnfusedExperts` that holds, per expert,
``gate_proj``, ``up_proj`` and ``down_proj`` as ``nn.Linear`` (``model.layers.0.mlp.experts.3.down_proj``, with
its bias where the layout has them) and computes the same function: the decorator's contract, which every
dispatched implementation (eager, ``grouped_mm``, ``batched_mm``) honours, is
``y_t = sum_k w_tk * down_e(gate(gate_up_e x_t))`` over the top-k experts e = top_k_index[t, k], with the module's
own ``_apply_gate`` (``act(gate) * up``, or GPT-OSS's clamped ``gate * sigmoid(alpha * gate) * (up + 1)``). The
forward below is transformers' eager loop with ``gate_up_proj``'s two halves as two matmuls whose outputs are put
back in the module's layout for its ``_apply_gate`` (the same dot products, so the same result up to the order of
summation; tests/test_moe.py bounds the difference).

Masks, every criterion, CSR, reset and undo then work on the experts unchanged. Calibration hooks on an expert's
layers see exactly the tokens the router sent to it. :func:`fuse_experts` (``forget_session``) and
:func:`fused_state_dict` (``Session.save``) give transformers back its own layout, bit for bit.

The routers (``gate``, GPT-OSS's ``router``) are left dense: they are tiny (experts x hidden) and decide which
experts each token runs, so pruning them reroutes tokens; transformers 5's routers are not ``nn.Linear`` and are
never candidates, and a linear router beside an experts module (Qwen2-MoE's ``shared_expert_gate``) is pruned
only when named in ``include``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layers import PrunableLayer, weight_matrix

_PARTS = ("gate_proj", "up_proj", "down_proj")
# The ``_apply_gate`` functions reproduced (elementwise in the gate and up outputs, given in the module's layout):
# transformers' default ``act_fn(gate) * up`` and GPT-OSS's clamped SwiGLU.
_GATES = (
    "transformers.integrations.moe._default_apply_gate",
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts._apply_gate",
)

Part = tuple[torch.Tensor, torch.Tensor | None]  # one expert matrix: weight [out, in] and bias [out] (or None)


@dataclass(frozen=True)
class Layout:
    """How a fused experts module stores its matrices: the flags of its ``@use_experts_implementation``."""

    concatenated: bool  # gate_up rows [gate; up], else interleaved [gate_0, up_0, gate_1, up_1, ...]
    transposed: bool  # matrices stored [in, out] (x @ W), else [out, in]
    bias: bool  # with gate_up_proj_bias [experts, 2 x intermediate] and down_proj_bias [experts, hidden]

    @classmethod
    def of(cls, module: nn.Module) -> Layout | None:
        """``module``'s layout if :class:`UnfusedExperts` reproduces it (see :func:`is_fused_experts`), else None."""
        gate = getattr(type(module), "_apply_gate", None)
        if f"{getattr(gate, '__module__', '')}.{getattr(gate, '__qualname__', '')}" not in _GATES:
            return None
        flags = [getattr(module, flag, None) for flag in ("is_concatenated", "is_transposed", "has_bias")]
        if not all(isinstance(flag, bool) for flag in flags):
            return None
        if getattr(module, "has_gate", None) is not True or getattr(module, "has_post_expert_norm", False):
            return None
        layout = cls(*flags)
        params = [getattr(module, name, None) for name in layout.names]
        if not all(isinstance(param, nn.Parameter) for param in params) or any(p.dim() != 3 for p in params[:2]):
            return None
        gate_up, down = (p.transpose(1, 2) if layout.transposed else p for p in params[:2])  # [E, out, in]
        experts, hidden, intermediate = down.shape
        shapes = [(experts, 2 * intermediate, hidden), (experts, hidden, intermediate)]
        shapes += [(experts, 2 * intermediate), (experts, hidden)] if layout.bias else []
        if [tuple(p.shape) for p in (gate_up, down, *params[2:])] != shapes:
            return None
        return layout

    @property
    def names(self) -> tuple[str, ...]:
        """The fused module's parameters that hold the experts."""
        return ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if self.bias else ())

    def join(self, gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``gate`` and ``up`` as one tensor along ``dim`` (0 or 1), concatenated or interleaved."""
        if self.concatenated:
            return torch.cat((gate, up), dim)
        return torch.stack((gate, up), dim + 1).flatten(dim, dim + 1)

    def halves(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up parts of ``gate_up`` along its first dimension (views): :meth:`join` reversed."""
        if self.concatenated:
            return gate_up[: len(gate_up) // 2], gate_up[len(gate_up) // 2 :]
        return gate_up[0::2], gate_up[1::2]

    def split(self, fused: Mapping[str, torch.Tensor], expert: int) -> list[Part]:
        """Expert ``expert``'s (gate, up, down) matrices from the fused tensors (views of them)."""
        gate_up, down = fused["gate_up_proj"][expert], fused["down_proj"][expert]
        if self.transposed:
            gate_up, down = gate_up.T, down.T
        gate, up = self.halves(gate_up)
        if not self.bias:
            return [(gate, None), (up, None), (down, None)]
        gate_bias, up_bias = self.halves(fused["gate_up_proj_bias"][expert])
        return [(gate, gate_bias), (up, up_bias), (down, fused["down_proj_bias"][expert])]

    def fuse(self, experts: Sequence[Sequence[Part]]) -> dict[str, torch.Tensor]:
        """The fused tensors (new, contiguous) of the experts' (gate, up, down) matrices: :meth:`split` reversed."""

        def stored(weight: torch.Tensor) -> torch.Tensor:
            return weight.T if self.transposed else weight

        fused = {
            "gate_up_proj": [stored(self.join(gate, up)) for (gate, _), (up, _), _ in experts],
            "down_proj": [stored(down) for _, _, (down, _) in experts],
        }
        if self.bias:
            fused["gate_up_proj_bias"] = [self.join(gate, up) for (_, gate), (_, up), _ in experts]
            fused["down_proj_bias"] = [down for _, _, (_, down) in experts]
        return {name: torch.stack(tensors) for name, tensors in fused.items()}


class ExpertMLP(nn.Module):
    """One expert's three matrices: ``gate_proj``, ``up_proj`` ([intermediate, hidden]) and ``down_proj``
    ([hidden, intermediate]), each an ``nn.Linear`` (with bias where the layout has them) or the ``CSRLinear``
    replacing it."""

    def __init__(self, parts: Sequence[Part], requires_grad: bool) -> None:
        super().__init__()
        for name, (weight, bias) in zip(_PARTS, parts):
            self.add_module(name, _linear(weight, bias, requires_grad))

    def parts(self) -> list[Part]:
        """The (weight, bias) of each matrix; refused while any is a CSR layer."""
        modules = [getattr(self, name) for name in _PARTS]
        if any(not isinstance(module, nn.Linear) for module in modules):
            raise ValueError("the experts hold CSR layers: reset the session (dense weights) before fusing them")
        return [(module.weight, module.bias) for module in modules]


class UnfusedExperts(nn.Module):
    """A transformers fused experts module with one ``nn.Linear`` per expert matrix (children ``0`` .. ``E-1``,
    each an :class:`ExpertMLP`); same forward signature and result. Build it with :meth:`from_fused`."""

    def __init__(self, experts: Sequence[ExpertMLP], layout: Layout, top_k: int) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.layout = layout
        self.top_k = top_k
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)

    @property
    def active_share(self) -> float:
        """Share of the experts each token runs: top-k of n."""
        return self.top_k / self.num_experts

    def expert(self, index: int) -> ExpertMLP:
        """Expert ``index``'s module."""
        return self._modules[str(index)]

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module) -> UnfusedExperts:
        """Take ``fused``'s weights into per-expert layers and empty it (kept to be refilled by :meth:`fused`).

        Each expert's matrices become tensors of their own, then the fused parameters are released: the memory
        peak is the model plus this one module's experts.
        """
        layout = Layout.of(fused)
        tensors = {name: getattr(fused, name) for name in layout.names}
        requires_grad = fused.gate_up_proj.requires_grad
        experts = [ExpertMLP(layout.split(tensors, e), requires_grad) for e in range(fused.gate_up_proj.shape[0])]
        unfused = cls(experts, layout, int(fused.config.num_experts_per_tok))
        for name, param in tensors.items():
            setattr(fused, name, nn.Parameter(torch.empty(0, dtype=param.dtype, device=param.device)))
        object.__setattr__(unfused, "_fused", fused)  # not a submodule: outside the model's tree
        return unfused

    @torch.no_grad()
    def fused(self) -> nn.Module:
        """The original fused module, refilled with the experts' current (dense) weights."""
        parts = [self.expert(e).parts() for e in range(self.num_experts)]
        requires_grad = parts[0][0][0].requires_grad
        for name, tensor in self.layout.fuse(parts).items():
            setattr(self._fused, name, nn.Parameter(tensor, requires_grad=requires_grad))
        return self._fused

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager experts loop: each expert runs once on the tokens routed to it (in token order),
        its output scaled by their routing weights and added into theirs. An index equal to the number of
        experts means "no expert" (as in transformers)."""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 0, 1)
            hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for index in hit:
            if index == self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(routed[index])
            expert = self.expert(index)
            for part in _PARTS:  # for calibration: which of the batch's positions this expert's layers see
                getattr(expert, part).routed_positions = token_idx
            current = hidden_states[token_idx]
            gate_up = self.layout.join(expert.gate_proj(current), expert.up_proj(current), dim=1)
            out = expert.down_proj(self._fused._apply_gate(gate_up))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def routed_positions(layer: nn.Module) -> torch.Tensor | None:
    """The flat batch positions (``batch * seq`` order) the last forward routed to this expert layer, whose input
    rows they are in order; None for a layer outside :class:`UnfusedExperts`."""
    return getattr(layer, "routed_positions", None)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module that :class:`UnfusedExperts` reproduces: gated,
    in a :class:`Layout` (concatenated or interleaved, transposed or not, with or without bias) whose parameters
    have consistent shapes, with transformers' default gate or GPT-OSS's, no norm after the experts, top-k routing
    given by ``config.num_experts_per_tok``."""
    return Layout.of(module) is not None and isinstance(
        getattr(getattr(module, "config", None), "num_experts_per_tok", None), int
    )


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` (see :func:`is_fused_experts`) by an equivalent
    :class:`UnfusedExperts`, one module at a time; returns their names. Idempotent."""
    names = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in names:
        model.set_submodule(name, UnfusedExperts.from_fused(model.get_submodule(name)))
    return names


def fuse_experts(model: nn.Module) -> list[str]:
    """Put transformers' fused experts modules back in place of every :class:`UnfusedExperts` (dense weights as
    they are now), one module at a time; returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).fused())
    return names


def fused_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's dense state dict) with each :class:`UnfusedExperts`' per-expert weights (and biases)
    stacked back into transformers' fused parameters (one new tensor each: saving holds one more copy of the
    expert weights while it writes)."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            parts = [
                [
                    (state.pop(f"{name}.{e}.{part}.weight"), state.pop(f"{name}.{e}.{part}.bias", None))
                    for part in _PARTS
                ]
                for e in range(module.num_experts)
            ]
            state.update({f"{name}.{key}": tensor for key, tensor in module.layout.fuse(parts).items()})
    return state


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Where ``save_pretrained`` writes each expert layer: ``{layer name: its key in the checkpoint without
    ".weight"}``. transformers saves fused experts in the checkpoint layout of the model's hub weights (one 2-D
    weight per expert matrix, e.g. Mixtral's ``block_sparse_moe.experts.3.w1``); the names come from
    transformers' own reverse conversion, run on small tensors (the fused layout of 1 x 1 matrices) that carry
    each matrix's (expert, part). Layers whose checkpoint keeps the experts fused (GPT-OSS) have no entry."""
    from transformers.core_model_loading import revert_weight_conversion

    markers, origin = {}, []
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            codes = torch.arange(len(origin), len(origin) + 3 * module.num_experts).view(module.num_experts, 3, 1, 1)
            unbiased = Layout(module.layout.concatenated, module.layout.transposed, bias=False)
            fused = unbiased.fuse([[(code, None) for code in expert] for expert in codes])
            markers.update({f"{name}.{key}": tensor for key, tensor in fused.items()})
            origin += [f"{name}.{expert}.{part}" for expert in range(module.num_experts) for part in _PARTS]
    reverted = revert_weight_conversion(model, markers) if markers else {}
    return {origin[int(code)]: key.removesuffix(".weight") for key, code in reverted.items() if code.numel() == 1}


def too_few_tokens(layer: PrunableLayer, tokens: int) -> bool:
    """Whether ``tokens`` calibration tokens are too few to calibrate the layer: fewer than its inputs. Its
    Hessian (1/N) sum x x^T then has rank <= N < inputs, so the data leave some input directions undetermined
    and SparseGPT / ADMM would fit the kept weights to those few tokens alone (held up only by the dampening);
    Wanda's input norms from so few tokens are equally unreliable. Such an expert is pruned by magnitude."""
    return tokens < weight_matrix(layer.module).shape[1]


@contextmanager
def count_routed_tokens(model: nn.Module) -> Iterator[dict[str, int]]:
    """Within this block, ``counts[name]`` is the number of tokens routed so far to the expert of each expert layer
    ``name`` (its gate, up and down projections alike), for every :class:`UnfusedExperts` module that ran (0 for
    its experts no token reached); hooks always removed."""
    counts: dict[str, int] = {}

    def counter(name: str):
        def hook(module: UnfusedExperts, args: tuple, kwargs: dict) -> None:
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            routed = torch.bincount(top_k_index.flatten(), minlength=module.num_experts + 1).tolist()
            for expert in range(module.num_experts):
                for part in _PARTS:
                    key = f"{name}.{expert}.{part}"
                    counts[key] = counts.get(key, 0) + routed[expert]

        return hook

    handles = [
        module.register_forward_pre_hook(counter(name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, UnfusedExperts)
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def active_shares(model: nn.Module) -> dict[int, float]:
    """``{id(module): share}`` for every expert layer module (dense or CSR) of the model: the share of tokens
    that run it under uniform routing, top-k of n experts."""
    return {
        id(layer): module.active_share
        for module in model.modules()
        if isinstance(module, UnfusedExperts)
        for expert in module.children()
        if isinstance(expert, ExpertMLP)
        for layer in expert.children()
    }


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` [out, in] and ``bias`` (None: without; no random init)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(
        weight.detach().clone(memory_format=torch.contiguous_format), requires_grad=requires_grad
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return layer

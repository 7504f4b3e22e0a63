"""Mixture-of-experts layers as one ``nn.Linear`` per expert matrix, so that every pruning path applies to them.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (and the other models whose experts
module carries its ``@use_experts_implementation`` decorator with the standard layout) as two fused 3-D
parameters per MoE block: ``gate_up_proj`` [experts, 2 x intermediate, hidden] (the gate's rows first, then the
up projection's) and ``down_proj`` [experts, hidden, intermediate]. They are not ``nn.Linear``, so nothing
would prune them. :func:`unfuse_experts` (run when a ``Session`` wraps the model) replaces each such module by an
:class:`UnfusedExperts` that holds, per expert, ``gate_proj``, ``up_proj`` and ``down_proj`` as ``nn.Linear``
(``model.layers.0.mlp.experts.3.down_proj``) and computes the same function: the decorator's contract, which
every dispatched implementation (eager, ``grouped_mm``, ``batched_mm``) honours, is
``y_t = sum_k w_tk * down_e(act(gate_e x_t) * up_e x_t)`` over the top-k experts e = top_k_index[t, k], and the
forward below is transformers' eager loop with the two halves of ``gate_up_proj`` as two matmuls (the same dot
products, so the same result up to the order of summation; tests/test_moe.py bounds the difference).

Masks, every criterion, CSR, reset and undo then work on the experts unchanged. Calibration hooks on an expert's
layers see exactly the tokens the router sent to it. :func:`fuse_experts` (``forget_session``) and
:func:`fused_state_dict` (``Session.save``) give transformers back its own layout.

The routers (``gate``) are left dense: they are tiny (experts x hidden) and decide which experts each token runs,
so pruning them reroutes tokens; transformers 5's routers are not ``nn.Linear`` and are never candidates, and a
linear router beside an experts module (Qwen2-MoE's ``shared_expert_gate``) is pruned only when named in
``include``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .layers import PrunableLayer, weight_matrix

try:  # transformers 5: the gate every standard experts module applies
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # pragma: no cover - transformers 4 has no fused experts
    _default_apply_gate = None

_PARTS = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert's three matrices: ``gate_proj``, ``up_proj`` ([intermediate, hidden]) and ``down_proj``
    ([hidden, intermediate]), each an ``nn.Linear`` without bias (or the ``CSRLinear`` replacing it)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, requires_grad: bool) -> None:
        super().__init__()
        for part, weight in zip(_PARTS, (gate, up, down)):
            self.add_module(part, _linear(weight, requires_grad))


class UnfusedExperts(nn.Module):
    """A transformers fused experts module with one ``nn.Linear`` per expert matrix (children ``0`` .. ``E-1``,
    each an :class:`ExpertMLP`); same forward signature and result. Build it with :meth:`from_fused`."""

    def __init__(self, experts: Sequence[ExpertMLP], act_fn: nn.Module, top_k: int) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.top_k = top_k
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)
        self.act_fn = act_fn

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
        gate_up, down = fused.gate_up_proj, fused.down_proj
        intermediate = down.shape[-1]
        requires_grad = gate_up.requires_grad
        experts = [
            ExpertMLP(gate_up[e, :intermediate], gate_up[e, intermediate:], down[e], requires_grad)
            for e in range(gate_up.shape[0])
        ]
        unfused = cls(experts, fused.act_fn, int(fused.config.num_experts_per_tok))
        for name in ("gate_up_proj", "down_proj"):
            setattr(fused, name, nn.Parameter(torch.empty(0, dtype=gate_up.dtype, device=gate_up.device)))
        object.__setattr__(unfused, "_fused", fused)  # not a submodule: outside the model's tree
        return unfused

    @torch.no_grad()
    def fused(self) -> nn.Module:
        """The original fused module, refilled with the experts' current (dense) weights."""
        parts = [[getattr(self.expert(e), part) for part in _PARTS] for e in range(self.num_experts)]
        if any(not isinstance(module, nn.Linear) for modules in parts for module in modules):
            raise ValueError("the experts hold CSR layers: reset the session (dense weights) before fusing them")
        fused = self._fused
        requires_grad = parts[0][0].weight.requires_grad
        gate_up = torch.stack([torch.cat([gate.weight, up.weight]) for gate, up, _ in parts])
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=requires_grad)
        fused.down_proj = nn.Parameter(torch.stack([down.weight for _, _, down in parts]), requires_grad=requires_grad)
        return fused

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
            out = expert.down_proj(self.act_fn(expert.gate_proj(current)) * expert.up_proj(current))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def routed_positions(layer: nn.Module) -> torch.Tensor | None:
    """The flat batch positions (``batch * seq`` order) the last forward routed to this expert layer, whose input
    rows they are in order; None for a layer outside :class:`UnfusedExperts`."""
    return getattr(layer, "routed_positions", None)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module in the standard layout that
    :class:`UnfusedExperts` reproduces: concatenated [gate; up], not transposed, no bias, the default gate
    ``act(gate) * up``, no norm after the experts, top-k routing given by ``config.num_experts_per_tok``."""
    if _default_apply_gate is None or getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return False
    layout = tuple(getattr(module, flag, None) for flag in ("has_gate", "is_concatenated", "has_bias", "is_transposed"))
    if layout != (True, True, False, False) or getattr(module, "has_post_expert_norm", False):
        return False
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3):
        return False
    experts, hidden, intermediate = down.shape
    return (
        tuple(gate_up.shape) == (experts, 2 * intermediate, hidden)
        and callable(getattr(module, "act_fn", None))
        and isinstance(getattr(getattr(module, "config", None), "num_experts_per_tok", None), int)
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
    """``state`` (the model's dense state dict) with each :class:`UnfusedExperts`' per-expert weights stacked
    back into transformers' ``gate_up_proj`` / ``down_proj`` (one new tensor per module: saving holds one more
    copy of the expert weights while it writes)."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            parts = [[state.pop(f"{name}.{e}.{part}.weight") for part in _PARTS] for e in range(module.num_experts)]
            state[f"{name}.gate_up_proj"] = torch.stack([torch.cat([gate, up]) for gate, up, _ in parts])
            state[f"{name}.down_proj"] = torch.stack([down for _, _, down in parts])
    return state


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Where ``save_pretrained`` writes each expert layer: ``{layer name: its key in the checkpoint without
    ".weight"}``. transformers saves fused experts in the checkpoint layout of the model's hub weights (one 2-D
    weight per expert matrix, e.g. Mixtral's ``block_sparse_moe.experts.3.w1``); the names come from
    transformers' own reverse conversion, run on small tensors that carry each matrix's (expert, part)."""
    from transformers.core_model_loading import revert_weight_conversion

    markers, origin = {}, []
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            codes = torch.arange(len(origin), len(origin) + 3 * module.num_experts).view(module.num_experts, 3, 1)
            markers[f"{name}.gate_up_proj"], markers[f"{name}.down_proj"] = codes[:, :2], codes[:, 2:]
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


def _linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` without bias holding a copy of ``weight`` [out, in] (no random initialisation)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    return layer

"""Which modules of a model are prunable: linear layers, minus the output head and tied weights."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

try:  # transformers' GPT-2 style linear layer: weight stored as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight matrix and where its module sits in the model."""

    name: str
    module: nn.Module
    parent: nn.Module
    attr: str

    @property
    def transposed(self) -> bool:
        """True for GPT-2's ``Conv1D``, whose weight is stored as [in, out]."""
        return bool(Conv1D) and isinstance(self.module, Conv1D)

    @property
    def block(self) -> int | None:
        """Index of the transformer block the layer belongs to (None outside the blocks)."""
        match = _BLOCK_INDEX.search(f".{self.name}.")
        return int(match.group(1)) if match else None

    @property
    def role(self) -> str:
        """The layer's own name inside its block, e.g. ``q_proj`` or ``mlp.c_fc``."""
        parts = self.name.split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        return ".".join(parts[numbered[-1] + 1 :]) if numbered else self.name


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out_features, in_features] (a view for ``Conv1D``)."""
    weight = module.weight
    return weight.t() if bool(Conv1D) and isinstance(module, Conv1D) else weight


def head_module_names(model: nn.Module) -> set[str]:
    """Names of the layers pruned only when named in ``include``: the output head(s) (``get_output_embeddings()``
    and any layer tied to the input embeddings) and the linear routers of MoE blocks (:func:`router_module_names`)."""
    names = router_module_names(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied_ptr = embeddings.weight.data_ptr() if embeddings is not None else None
    for name, module in model.named_modules():
        if module is head and head is not None:
            names.add(name)
        elif is_linear_like(module) and tied_ptr is not None and module.weight.data_ptr() == tied_ptr:
            names.add(name)
    return names


def router_module_names(model: nn.Module) -> set[str]:
    """Names of the linear layers beside an MoE block's ``experts`` module (the router ``gate`` where it is an
    ``nn.Linear``, Qwen2-MoE's ``shared_expert_gate``): tiny, and they decide how much each expert counts, so
    pruning them would reroute tokens."""
    return {
        f"{parent_name}.{attr}" if parent_name else attr
        for parent_name, parent in model.named_modules()
        if isinstance(getattr(parent, "experts", None), nn.Module)
        for attr, child in parent.named_children()
        if is_linear_like(child)
    }


def find_prunable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[PrunableLayer]:
    """The model's prunable layers, each weight once.

    Args:
        model: any ``nn.Module``.
        include: glob patterns on qualified names (``"*.mlp.*"``); only matching layers are kept.
            Naming the head here (``"lm_head"``) is the only way to prune it.
        exclude: glob patterns of layers to leave dense.

    Returns:
        The layers in model order. The output head, layers tied to the input embeddings and MoE
        routers are left out unless ``include`` names them; a weight shared by several modules appears once.

    Raises:
        TypeError: ``model`` is not a torch module.
        ValueError: a pattern matches no layer, or no prunable layer is left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return select_layers(linear_layers(model), head_module_names(model), include, exclude)


def select_layers(
    candidates: Sequence[PrunableLayer],
    heads: set[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[PrunableLayer]:
    """Filter ``candidates`` as :func:`find_prunable_layers` describes (heads by name)."""
    _check_patterns_match(include, candidates, "include")
    _check_patterns_match(exclude, candidates, "exclude")
    chosen = []
    seen: set[int] = set()
    for layer in candidates:
        if include and not _matches(layer.name, include):
            continue
        if layer.name in heads and not (include and layer.name in set(include)):
            continue
        if exclude and _matches(layer.name, exclude):
            continue
        pointer = layer.module.weight.data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        chosen.append(layer)
    if not chosen:
        raise ValueError(
            "no prunable layer left (nn.Linear / Conv1D outside the output head)"
            + (f" with include={list(include or [])} exclude={list(exclude or [])}" if include or exclude else "")
            + "; check the patterns or pass a model that has linear layers"
        )
    return chosen


def linear_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every ``nn.Linear`` / ``Conv1D`` of the model with its parent, in model order."""
    layers = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if is_linear_like(child):
                name = f"{parent_name}.{attr}" if parent_name else attr
                layers.append(PrunableLayer(name, child, parent, attr))
    return layers


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns_match(patterns, layers: list[PrunableLayer], what: str) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a list of glob patterns; got the string {patterns!r} (wrap it in a list)")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in layers):
            examples = ", ".join(layer.name for layer in layers[:3])
            raise ValueError(f"{what} pattern {pattern!r} matches no linear layer; names look like: {examples}")

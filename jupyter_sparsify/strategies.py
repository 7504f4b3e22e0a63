"""Criteria applied to a model's layers: magnitude, Wanda and SparseGPT, with their calibration."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .criteria import magnitude_scores, wanda_scores
from .layers import PrunableLayer, weight_matrix
from .progress import Progress
from .pruning import prune_in_place
from .sparsegpt import sparsegpt_prune

CRITERIA = ("magnitude", "wanda", "sparsegpt")
StatsFor = Callable[[str, list[PrunableLayer], Progress | None], dict[str, torch.Tensor]]


def validate_criterion(criterion: str, scope: str, pattern: tuple[int, int] | None) -> str:
    """Check the criterion name and that it can work with the scope."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if criterion == "sparsegpt" and scope == "global" and pattern is None:
        raise ValueError(
            "criterion 'sparsegpt' rebuilds each layer from its own Hessian, so one global threshold "
            "across layers does not apply: use scope='row' (or 'layer'), or a pattern such as 2:4"
        )
    return criterion


def prune_with_criterion(
    layers: Sequence[PrunableLayer],
    settings,
    report: Progress,
    stats_for: StatsFor,
) -> None:
    """Prune ``layers`` in place as ``settings`` (a ``PruneSettings``) says."""
    if settings.criterion == "sparsegpt":
        hessians = stats_for("hessians", list(layers), report)
        for index, layer in enumerate(layers):
            weight = weight_matrix(layer.module)
            pruned = sparsegpt_prune(weight.detach(), hessians[layer.name], settings.amount, nm=settings.pattern)
            with torch.no_grad():
                weight.copy_(pruned)
            report(index + 1, len(layers), f"SparseGPT {layer.name}")
        return
    if settings.criterion == "wanda":
        norms = stats_for("norms", list(layers), report)

        def score_of(layer: PrunableLayer) -> torch.Tensor:
            return wanda_scores(weight_matrix(layer.module), norms[layer.name])
    else:

        def score_of(layer: PrunableLayer) -> torch.Tensor:
            return magnitude_scores(weight_matrix(layer.module))

    prune_in_place(layers, score_of, amount=settings.amount, scope=settings.scope, pattern=settings.pattern, progress=report)

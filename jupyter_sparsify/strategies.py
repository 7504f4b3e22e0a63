"""Criteria applied to a model's layers: magnitude, Wanda, SparseGPT and ADMM, with their calibration.

Wanda, SparseGPT and ADMM (on SparseGPT's Hessians) run as in their papers, block by block: the
statistics of block i are taken on the outputs of blocks < i *after* those were pruned, so later
layers see (and, for SparseGPT and ADMM, compensate) the errors of earlier ones. Wanda with the
global scope compares all layers at once, so it takes its input norms from the dense model in one
pass instead. With ``reconstruct``, each block is tuned after it is pruned (:mod:`.reconstruction`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .admm import admm_prune
from .calibration import Calibrator
from .criteria import magnitude_scores, wanda_scores
from .layers import PrunableLayer, weight_matrix
from .progress import Progress
from .pruning import prune_in_place
from .sparsegpt import sparsegpt_prune

CRITERIA = ("magnitude", "wanda", "sparsegpt", "admm")
_FROM_HESSIANS = {"sparsegpt": sparsegpt_prune, "admm": admm_prune}  # per-layer algorithms on Hessians


def validate_criterion(criterion: str, scope: str, pattern: tuple[int, int] | None, reconstruct: bool = False) -> str:
    """Check the criterion name, that it can work with the scope, and with block reconstruction."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if criterion in _FROM_HESSIANS and scope == "global" and pattern is None:
        raise ValueError(
            f"criterion {criterion!r} rebuilds each layer from its own Hessian, so one global threshold "
            "across layers does not apply: use scope='row' (or 'layer'), or a pattern such as 2:4"
        )
    if reconstruct and not _block_by_block(criterion, scope, pattern):
        raise ValueError(
            f"reconstruct tunes each block after it is pruned, which needs a criterion that calibrates block "
            f"by block: wanda (scope 'row' or 'layer', or a pattern), sparsegpt or admm; not {criterion!r} "
            f"with scope {scope!r}"
        )
    return criterion


def _block_by_block(criterion: str, scope: str, pattern: tuple[int, int] | None) -> bool:
    """Whether the criterion prunes the model block by block on calibration data."""
    if criterion == "magnitude":
        return False
    return not (criterion == "wanda" and scope == "global" and pattern is None)


def prune_with_criterion(
    layers: Sequence[PrunableLayer],
    settings,
    report: Progress,
    calibrator: Calibrator,
) -> None:
    """Prune ``layers`` of the (dense) model in place as ``settings`` (a ``PruneSettings``) says."""
    if settings.criterion == "magnitude":
        prune_in_place(layers, lambda layer: magnitude_scores(weight_matrix(layer.module)), amount=settings.amount,
                       scope=settings.scope, pattern=settings.pattern, progress=report)
    elif not _block_by_block(settings.criterion, settings.scope, settings.pattern):  # Wanda, one global threshold
        norms = calibrator.norms([(layer.name, layer.module) for layer in layers], report)
        prune_in_place(layers, lambda layer: wanda_scores(weight_matrix(layer.module), norms[layer.name]),
                       amount=settings.amount, scope="global", progress=report)
    else:
        prune, by_name = _pruner(settings), {layer.name: layer for layer in layers}

        def on_block(index: int, stats: dict[str, torch.Tensor]) -> None:
            for name, statistic in stats.items():
                prune(by_name[name], statistic)

        want = "hessians" if settings.criterion in _FROM_HESSIANS else "norms"
        calibrator.sequential([(layer.name, layer.module) for layer in layers], want, on_block, report,
                              reconstruct=settings.reconstruct)


def _pruner(settings):
    """How one layer is pruned from its calibration statistic (Wanda's norms or a Hessian)."""

    def wanda(layer: PrunableLayer, norm: torch.Tensor) -> None:
        prune_in_place([layer], lambda _: wanda_scores(weight_matrix(layer.module), norm), amount=settings.amount,
                       scope=settings.scope, pattern=settings.pattern)

    def from_hessian(layer: PrunableLayer, hessian: torch.Tensor) -> None:
        weight = weight_matrix(layer.module)
        scope = "row" if settings.pattern else settings.scope  # a pattern fixes every row's count
        algorithm = _FROM_HESSIANS[settings.criterion]
        pruned = algorithm(weight.detach(), hessian, settings.amount, nm=settings.pattern, scope=scope)
        with torch.no_grad():
            weight.copy_(pruned)

    return wanda if settings.criterion == "wanda" else from_hessian

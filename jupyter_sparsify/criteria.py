"""Criteria applied to a model's layers: magnitude, Wanda, SparseGPT and ADMM, with their calibration.

Two calibrations for the data-aware criteria (Wanda, SparseGPT, ADMM on SparseGPT's Hessians):

* ``once`` (the default): every layer's statistics come from the *dense* model in one pass, are kept
  by the session's :class:`~jupyter_sparsify.calibration.Calibrator`, and every later apply, at any
  amount, scope or pattern, reuses them: only the per-layer algorithm runs.
* ``sequential`` (as in the papers): block by block, the statistics of block i are taken on the
  outputs of blocks < i *after* those were pruned, so later layers see (and, for SparseGPT and ADMM,
  compensate) the errors of earlier ones. It depends on the pruning, so it runs at every apply. Block
  reconstruction (``reconstruct``, :mod:`.reconstruction`) needs it.

Wanda with the global scope compares all layers at once, so it always takes the dense model's norms.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .admm import admm_prune
from .calibration import Calibrator
from .experts import count_routed_tokens, too_few_tokens
from .layers import PrunableLayer, weight_matrix
from .memory import available_memory_bytes
from .progress import Progress
from .pruning import prune_in_place
from .scores import magnitude_scores, wanda_scores
from .sparsegpt import sparsegpt_prune

CRITERIA = ("magnitude", "wanda", "sparsegpt", "admm")
CALIBRATIONS = ("once", "sequential")
DEFAULT_SCOPES = {"magnitude": "global", "wanda": "row", "sparsegpt": "row", "admm": "row"}  # each one's good form
SCOPES_OF = {
    "magnitude": ("global", "layer", "row"),
    "wanda": ("row", "layer", "global"),
    "sparsegpt": ("row", "layer"),
    "admm": ("row", "layer"),
}
_FROM_HESSIANS = {"sparsegpt": sparsegpt_prune, "admm": admm_prune}  # per-layer algorithms on Hessians
_ROUTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Calibrator -> {expert layer: tokens routed}


@dataclass(frozen=True)
class PruneSettings:
    """What ``Session.apply`` was asked to do, validated."""

    amount: float
    mode: str
    criterion: str = "magnitude"
    scope: str = "global"
    pattern: tuple[int, int] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    backend: str | None = None
    reconstruct: bool = False
    calibration: str = "once"

    @property
    def label(self) -> str:
        """A short name for tables and charts, e.g. ``CSR 30%`` or ``Masked 2:4 wanda``."""
        if self.mode == "dense":
            return "Dense"
        level = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.amount:.0%}"
        extras = [] if self.criterion == "magnitude" else [self.criterion]
        if self.scope != "global" and not self.pattern:
            extras.append(self.scope)
        if self.reconstruct:
            extras.append("+recon")
        elif self.calibration == "sequential" and self.criterion != "magnitude":
            extras.append("sequential")
        if self.include:  # a part of the model is its own variant in tables and charts
            extras.append("include " + ",".join(self.include))
        if self.exclude:
            extras.append("exclude " + ",".join(self.exclude))
        return " ".join([{"masked": "Masked", "csr": "CSR"}[self.mode], level, *extras])


DENSE = PruneSettings(amount=0.0, mode="dense")


def default_scope(criterion: str) -> str:
    """The scope a criterion uses when none is given: global for magnitude (the course notebook's), row otherwise."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    return DEFAULT_SCOPES[criterion]


def validate_calibration(calibration: str | None, reconstruct: bool) -> str:
    """``once`` or ``sequential``; ``None`` means ``sequential`` with reconstruction, else ``once``."""
    if calibration is None:
        return "sequential" if reconstruct else "once"
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}")
    if reconstruct and calibration == "once":
        raise ValueError(
            "reconstruct tunes each block on the outputs of the already pruned blocks before it, which needs "
            "calibration='sequential' (--calibration sequential); calibration='once' takes every statistic "
            "from the dense model"
        )
    return calibration


def validate_criterion(criterion: str, scope: str, pattern: tuple[int, int] | None, reconstruct: bool = False) -> str:
    """Check the criterion name, that it can work with the scope, and with block reconstruction."""
    default_scope(criterion)  # raises for an unknown criterion name
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
    settings: PruneSettings,
    report: Progress,
    calibrator: Calibrator,
) -> None:
    """Prune ``layers`` of the (dense) model in place as ``settings`` says."""
    modules = [(layer.name, layer.module) for layer in layers]
    if settings.criterion == "magnitude":
        _prune_by_magnitude(layers, settings, report)
    elif settings.criterion == "wanda" and (
        settings.calibration == "once" or not _block_by_block(settings.criterion, settings.scope, settings.pattern)
    ):
        with _routed_tokens(calibrator, layers) as routed:
            norms = calibrator.norms(modules, report)
        layers = _prune_starved_by_magnitude(layers, routed, settings, warn=True)
        prune_in_place(
            layers,
            lambda layer: wanda_scores(weight_matrix(layer.module), norms[layer.name]),
            amount=settings.amount,
            scope=settings.scope,
            pattern=settings.pattern,
            progress=report,
        )
    elif settings.calibration == "once" and _hessians_fit(calibrator, modules):
        with _routed_tokens(calibrator, layers) as routed:
            hessians, done = calibrator.hessians(modules, report), 0
        layers = _prune_starved_by_magnitude(layers, routed, settings, warn=True)
        for group in _sharing_a_hessian(layers, hessians, settings):
            _prune_rows_together(group, hessians[group[0].name], settings)
            done += len(group)
            report(done, len(layers), f"{settings.criterion} {group[-1].name}")
    else:
        prune, by_name, starved = _pruner(settings), {layer.name: layer for layer in layers}, []

        def on_block(index: int, stats: dict[str, torch.Tensor]) -> None:
            block = [by_name[name] for name in stats]
            for layer in _prune_starved_by_magnitude(block, routed, settings, starved=starved):
                prune(layer, stats[layer.name])

        want = "hessians" if settings.criterion in _FROM_HESSIANS else "norms"
        with count_routed_tokens(calibrator.model) as routed:
            calibrator.sequential(modules, want, on_block, report, reconstruct=settings.reconstruct)
        _warn_starved(starved, settings.criterion)


def _prune_by_magnitude(
    layers: Sequence[PrunableLayer], settings: PruneSettings, report: Progress | None = None
) -> None:
    """Prune ``layers`` by weight magnitude with the amount, scope and pattern of ``settings``."""
    prune_in_place(
        layers,
        lambda layer: magnitude_scores(weight_matrix(layer.module)),
        amount=settings.amount,
        scope=settings.scope,
        pattern=settings.pattern,
        progress=report,
    )


@contextmanager
def _routed_tokens(calibrator: Calibrator, layers: Sequence[PrunableLayer]) -> Iterator[dict[str, int]]:
    """Around the calibrator's once-pass: yields ``{expert layer name: calibration tokens routed to it}``, filled
    when the block ends for the expert layers of ``layers`` whose statistics that pass collected, and kept with
    the calibrator (as its statistics are) for later applies, which do not run the pass again."""
    known = _ROUTED.setdefault(calibrator, {})
    with count_routed_tokens(calibrator.model) as fresh:
        yield known
    for layer in layers:
        if layer.name in fresh and layer.name not in known:
            known[layer.name] = fresh[layer.name]


def _prune_starved_by_magnitude(
    layers: Sequence[PrunableLayer],
    routed: dict[str, int],
    settings: PruneSettings,
    *,
    warn: bool = False,
    starved: list[str] | None = None,
) -> list[PrunableLayer]:
    """Prune by magnitude (same amount, scope and pattern) the expert layers too few calibration tokens were routed
    to (:func:`~jupyter_sparsify.experts.too_few_tokens`); return the other layers. Their names are added to
    ``starved``, or with ``warn`` said in one warning. (With the global scope they share one magnitude threshold,
    the others one of the criterion, so the total count may differ from a single threshold's by one weight.)"""
    hungry = [layer for layer in layers if _starved(layer, routed)]
    if hungry:
        _prune_by_magnitude(hungry, settings)
    names = [layer.name for layer in hungry]
    if starved is not None:
        starved.extend(names)
    if warn:
        _warn_starved(names, settings.criterion)
    return [layer for layer in layers if layer not in hungry]


def pruned_by_magnitude(calibrator: Calibrator, layer: PrunableLayer) -> bool:
    """Whether the calibrate-once statistics of ``calibrator`` had too few tokens routed to this expert layer, so that
    the data-aware criteria prune it by magnitude (False for a layer that is not an expert, or not yet calibrated)."""
    return _starved(layer, _ROUTED.get(calibrator, {}))


def _starved(layer: PrunableLayer, routed: dict[str, int]) -> bool:
    return layer.name in routed and too_few_tokens(layer, routed[layer.name])


def _warn_starved(names: list[str], criterion: str, shown: int = 6) -> None:
    """One line naming the expert layers pruned by magnitude because too few calibration tokens reached them."""
    if not names:
        return
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    warnings.warn(
        f"jupyter_sparsify: {len(names)} expert layer(s) were routed fewer calibration tokens than they have inputs, "
        f"too few for {criterion}, and were pruned by magnitude instead: {listed}; more calibration text "
        "(session.set_calibration_texts) gives them statistics",
        stacklevel=4,
    )


def _hessians_fit(calibrator: Calibrator, modules: list) -> bool:
    """Whether the Hessians to cache fit half of the memory available now; if not, say so (sequential instead)."""
    needed, available = calibrator.hessian_bytes(modules), available_memory_bytes()
    if available is None or needed <= available // 2:
        return True
    warnings.warn(
        f"jupyter_sparsify: the Hessians for calibration='once' need up to {needed / 2**30:.1f} GiB and "
        f"{available / 2**30:.1f} GiB is free; calibrating block by block instead (calibration='sequential')",
        stacklevel=2,
    )
    return False


def _sharing_a_hessian(
    layers: Sequence[PrunableLayer], hessians: dict[str, torch.Tensor], settings: PruneSettings
) -> list[list[PrunableLayer]]:
    """Layers that can be pruned as one matrix: those reading the same input (q/k/v, gate/up) share a Hessian,
    and with every row pruned on its own (scope ``row`` or a pattern) their rows can be stacked, so that one
    factorisation and one sweep serve them all. With scope ``layer`` each layer keeps its own quota."""
    if settings.scope == "layer" and not settings.pattern:
        return [[layer] for layer in layers]
    groups: dict[int, list[PrunableLayer]] = {}
    for layer in layers:
        groups.setdefault(id(hessians[layer.name]), []).append(layer)
    return list(groups.values())


def _prune_rows_together(group: list[PrunableLayer], hessian: torch.Tensor, settings: PruneSettings) -> None:
    """Run SparseGPT / ADMM once on the rows of every layer in ``group`` stacked, and write each layer's rows back."""
    weights = [weight_matrix(layer.module) for layer in group]
    scope = "row" if settings.pattern else settings.scope  # a pattern fixes every row's count
    stacked = torch.cat([weight.detach() for weight in weights]) if len(weights) > 1 else weights[0].detach()
    pruned = _FROM_HESSIANS[settings.criterion](stacked, hessian, settings.amount, nm=settings.pattern, scope=scope)
    with torch.no_grad():
        for weight, rows in zip(weights, pruned.split([w.shape[0] for w in weights])):
            weight.copy_(rows)


def _pruner(settings: PruneSettings):
    """How one layer is pruned from its calibration statistic (Wanda's norms or a Hessian)."""

    def wanda(layer: PrunableLayer, norm: torch.Tensor) -> None:
        prune_in_place(
            [layer],
            lambda _: wanda_scores(weight_matrix(layer.module), norm),
            amount=settings.amount,
            scope=settings.scope,
            pattern=settings.pattern,
        )

    def from_hessian(layer: PrunableLayer, hessian: torch.Tensor) -> None:
        _prune_rows_together([layer], hessian, settings)

    return wanda if settings.criterion == "wanda" else from_hessian

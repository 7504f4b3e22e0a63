"""Masks from scores: which weights to zero, by scope (global / layer / row) or N:M pattern.

A criterion gives every weight a score (higher = more important); this module zeroes the
lowest-scoring weights in place, exactly as many as asked, with no copies of the whole model.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Sequence

import torch

from .layers import PrunableLayer, weight_matrix
from .masks import layer_keep_mask, mark_ties, nm_keep_mask, prune_count, row_keep_mask
from .memory import release_freed_memory
from .progress import Progress

SCOPES = ("global", "layer", "row")
ScoreFn = Callable[[PrunableLayer], torch.Tensor]
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_SAMPLE_SIZE = 1 << 22  # scores sampled to bracket the global threshold: the bracket holds ~0.5 % of them


def validate_amount(amount: object) -> float:
    """The fraction of weights to prune, checked: a number in [0, 1)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):  # numpy and torch scalars are Real too
        raise TypeError(f"amount must be a number in [0, 1), e.g. 0.3 for 30 %; got {amount!r}")
    value = float(amount)
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ValueError(f"amount must be in [0, 1) (0.3 prunes 30 %); got {amount!r}")
    return value + 0.0  # -0.0 becomes 0.0 (no "Masked -0%")


def validate_scope(scope: str) -> str:
    """``global``, ``layer`` or ``row``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    return scope


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: keep N weights of every M consecutive inputs (None: unstructured)."""
    if pattern is None or pattern in ("", "unstructured"):
        return None
    if isinstance(pattern, (tuple, list)):
        if len(pattern) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern):
            raise ValueError(f"pattern must be two whole numbers (N, M) or a string N:M such as 2:4; got {pattern!r}")
        n, m = pattern
    else:
        match = _PATTERN.match(str(pattern))
        if not match:
            raise ValueError(f"pattern must look like N:M (e.g. 2:4 keeps 2 of every 4 weights); got {pattern!r}")
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M (2:4 keeps 2 of every 4); got {n}:{m}")
    return n, m


def prune_in_place(
    layers: Sequence[PrunableLayer],
    score_of: ScoreFn,
    *,
    amount: float,
    scope: str = "global",
    pattern: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> None:
    """Zero the lowest-scoring weights of ``layers`` in place.

    Args:
        layers: from :func:`~jupyter_sparsify.layers.find_prunable_layers`.
        score_of: a layer's scores as [out, in] float32 (higher = keep).
        amount: fraction to prune; ignored when ``pattern`` is given.
        scope: ``global`` (one threshold for all layers), ``layer`` (the same fraction in
            every layer) or ``row`` (the same fraction in every output row).
        pattern: ``(n, m)`` keeps n of every m consecutive weights along the input dimension.
        progress: called as ``progress(done, total, message)``.
    """
    raw_score_of = score_of

    def score_of(layer: PrunableLayer) -> torch.Tensor:
        return raw_score_of(layer).float().contiguous()

    if pattern is not None:
        _apply_per_layer(layers, score_of, lambda scores: nm_keep_mask(scores, *pattern), progress)
    elif scope == "row":
        _apply_per_layer(layers, score_of, lambda scores: row_keep_mask(scores, amount), progress)
    elif scope == "layer":
        _apply_per_layer(layers, score_of, lambda scores: layer_keep_mask(scores, amount), progress)
    else:
        _apply_global(layers, score_of, amount, progress)


def _apply_per_layer(layers, score_of: ScoreFn, keep_of, progress: Progress | None) -> None:
    for index, layer in enumerate(layers):
        weight = weight_matrix(layer.module)
        with torch.no_grad():
            weight.masked_fill_(~keep_of(score_of(layer)), 0)
        _report(progress, index + 1, len(layers), layer.name)


def _apply_global(layers, score_of: ScoreFn, amount: float, progress: Progress | None) -> None:
    total = sum(layer.module.weight.numel() for layer in layers)
    k = prune_count(total, amount)
    if k == 0:
        return
    threshold, ties = _global_cutoff(layers, score_of, k, total)
    for index, (layer, (take, present)) in enumerate(zip(layers, ties)):
        scores = score_of(layer)
        with torch.no_grad():
            weight = weight_matrix(layer.module)
            if take in (0, present):  # no tie to break here: one comparison, and mul_ is twice as fast as masked_fill_
                weight.mul_(scores > threshold if take else scores >= threshold)
            else:
                prune = scores < threshold
                mark_ties(scores.reshape(-1), threshold, take, prune.view(-1))
                weight.masked_fill_(prune, 0)
        del scores
        release_freed_memory()  # glibc keeps freed layer-sized buffers in its heaps otherwise (a 7B model's peak)
        _report(progress, index + 1, len(layers), layer.name)


def _global_cutoff(layers, score_of: ScoreFn, k: int, total: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The exact k-th lowest score over all layers and, per layer, how many scores equal to it
    to prune and how many there are (ties go to the earliest layers).

    A random sample brackets the threshold; one pass then counts the scores below the bracket
    and keeps only those inside it, so no full copy of the scores is ever made. If the
    bracket missed (rare), it is widened and the pass repeated.
    """
    low, high = _sample_bracket(layers, score_of, k / total, total)
    while True:
        below, inside = 0, []
        for layer in layers:
            scores = score_of(layer).reshape(-1)
            below += int(torch.count_nonzero(scores < low))  # 4x a bool sum
            inside.append(scores[(scores >= low) & (scores <= high)])
            del scores
            release_freed_memory()
        candidates = torch.cat(inside)
        if below < k <= below + candidates.numel():
            threshold = candidates.kthvalue(k - below).values
            to_take = k - below - int(torch.count_nonzero(candidates < threshold))
            ties = []
            for part in inside:
                present = int(torch.count_nonzero(part == threshold))
                ties.append((min(to_take, present), present))
                to_take -= ties[-1][0]
            return threshold, ties
        if k <= below:
            low = torch.tensor(-math.inf)
        else:
            high = torch.tensor(math.inf)


def _sample_bracket(layers, score_of: ScoreFn, fraction: float, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for layer in layers:
        scores = score_of(layer).reshape(-1)
        count = max(1, round(scores.numel() * min(1.0, _SAMPLE_SIZE / total)))
        samples.append(scores[torch.randint(scores.numel(), (count,), generator=generator)])
    sample = torch.cat(samples).float()
    margin = 5.0 / math.sqrt(sample.numel()) + 1e-4
    quantiles = torch.tensor([max(0.0, fraction - margin), min(1.0, fraction + margin)])
    low, high = torch.quantile(sample, quantiles)
    return low, high


def _report(progress: Progress | None, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)

"""Keep-masks: bool tensors with ``True`` = *keep*, as ``torch.nn.utils.prune``'s ``compute_mask``.

One polarity for every criterion and scope: a mask is applied as ``weight * mask`` (or
``weight.masked_fill(~mask, 0)``). Counts are exact: :func:`prune_count` rounds half up, and ties
are broken the same way everywhere (the lower index is kept).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prune_count(weights: int, sparsity: float) -> int:
    """How many of ``weights`` weights (a row, a layer, a model) to prune: ``sparsity * weights`` rounded half up."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    return math.floor(sparsity * weights + 0.5)


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """Bool mask keeping the ``keep`` highest scores along the last dim (ties: lower index).

    One ``kthvalue`` per row instead of a sort: the scores above the keep-th highest, then as
    many of those equal to it as are still needed, lowest index first.
    """
    width = scores.shape[-1]
    if keep <= 0 or keep >= width:
        return torch.full(scores.shape, keep > 0, dtype=torch.bool, device=scores.device)
    cutoff = scores.kthvalue(width - keep + 1, dim=-1, keepdim=True).values
    above = scores > cutoff
    ties = scores == cutoff
    needed = keep - above.sum(dim=-1, keepdim=True)
    if bool((ties.sum(dim=-1, keepdim=True) == needed).all()):  # the usual case: every tie is kept, no order needed
        return above | ties
    return above | (ties & (ties.cumsum(dim=-1) <= needed))


def row_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning the :func:`prune_count` lowest scores of every row (Wanda's grouping)."""
    pruned = prune_count(scores.shape[-1], sparsity)
    return keep_top(scores, scores.shape[-1] - pruned)


def nm_keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M keep-mask: exactly ``n`` kept (the highest scores) in every ``m`` consecutive inputs.

    ``"2:4"`` keeps 2 of every 4 (50% sparsity, NVIDIA semantics); ``"4:8"`` keeps 4 of 8.
    """
    check_nm(scores.shape[-1], n, m)
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    return keep_top(groups, n).reshape(scores.shape)


def check_nm(in_features: int, n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n < m`` (as :func:`~jupyter_sparsify.pruning.parse_pattern`) and ``m``
    divides ``in_features``."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M (2:4 keeps 2 of every 4); got {n}:{m}")
    if in_features % m:
        raise ValueError(
            f"N:M sparsity {n}:{m} needs the layer width (in_features={in_features}) to be a "
            f"multiple of {m}; skip this layer or use unstructured sparsity for it"
        )


def layer_keep_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask pruning :func:`prune_count` ``(scores.numel(), sparsity)`` lowest scores with one threshold."""
    return keep_all_but_lowest(scores, prune_count(scores.numel(), sparsity))


def keep_all_but_lowest(scores: Tensor, count: int) -> Tensor:
    """Keep-mask pruning exactly the ``count`` lowest scores of the whole tensor; ties are pruned at the
    earliest positions first."""
    flat = scores.reshape(-1)
    prune = torch.zeros_like(flat, dtype=torch.bool)
    if count >= flat.numel():
        return prune.view_as(scores)
    if count > 0:
        threshold = flat.kthvalue(count).values
        prune |= flat < threshold
        mark_ties(flat, threshold, count - int(prune.sum()), prune)
    return ~prune.view_as(scores)


def mark_ties(flat: Tensor, threshold: Tensor, count: int, marks: Tensor) -> None:
    """Set ``marks`` (flat, in place) at the first ``count`` positions where ``flat`` equals ``threshold``."""
    if count > 0:
        marks[(flat == threshold).nonzero().reshape(-1)[:count]] = True

"""Pruning criteria for one layer: magnitude, Wanda and N:M keep-masks.

Every function takes a weight in the ``nn.Linear`` orientation ``[out_features, in_features]``
(callers transpose GPT-2's ``Conv1D`` weight first). Scores are float32; masks are bool with
``True`` meaning *kept*. Ties are always broken the same way: the lower input index is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def magnitude_scores(weight: Tensor) -> Tensor:
    """Importance ``|W|`` (float32)."""
    return weight.detach().abs().float()


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` where ``input_norm[j]`` is the L2 norm of input j.

    ``input_norm`` has shape ``[in_features]`` (see :class:`InputNormAccumulator`).
    """
    if input_norm.shape != (weight.shape[-1],):
        raise ValueError(
            f"input_norm must have shape [{weight.shape[-1]}] (one norm per input column); got {list(input_norm.shape)}"
        )
    return magnitude_scores(weight) * input_norm.detach().float().to(weight.device)


def prune_count(in_features: int, sparsity: float) -> int:
    """Weights to prune per output row: ``sparsity * in_features`` rounded half up."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    return math.floor(sparsity * in_features + 0.5)


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


def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten inputs ``[..., in]`` to ``[tokens, in]``, keeping only positions where mask is true.

    The mask (e.g. an attention mask ``[batch, seq]``) is applied when it has one entry per
    position, also when the layer sees the positions flattened (OPT feeds ``[batch * seq, in]``);
    otherwise (or when ``None``) every position counts.
    """
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    return rows


class InputNormAccumulator:
    """Accumulates ``||X_j||_2`` over calibration tokens for one layer (Wanda's input norms)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Add inputs ``[..., in]``; positions where ``mask`` is false (padding) are skipped."""
        rows = token_rows(x, mask)
        self.sum_squares += rows.double().square().sum(dim=0).to(self.sum_squares.device)
        self.tokens += rows.shape[0]

    def result(self) -> Tensor:
        """The per-input-column L2 norms, float32 ``[in]``."""
        return self.sum_squares.sqrt().float()


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
    return above | (ties & (ties.cumsum(dim=-1) <= needed))

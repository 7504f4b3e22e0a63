"""Scores of one layer's weights: magnitude and Wanda (higher = keep; masks are in :mod:`.masks`).

Every function takes a weight in the ``nn.Linear`` orientation ``[out_features, in_features]``
(callers transpose GPT-2's ``Conv1D`` weight first).
"""

from __future__ import annotations

from torch import Tensor


def magnitude_scores(weight: Tensor) -> Tensor:
    """Importance ``|W|``, in the weight's own floating dtype: ``abs`` is exact, so a bf16 / fp16 weight ranks as it
    would in float32, at a half or a third of the memory traffic (what a global prune of a 7B model is made of)."""
    return weight.detach().abs()


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (float32) where ``input_norm[j]`` is the L2 norm of input j.

    ``input_norm`` has shape ``[in_features]`` (see :class:`InputNormAccumulator`).
    """
    if input_norm.shape != (weight.shape[-1],):
        raise ValueError(
            f"input_norm must have shape [{weight.shape[-1]}] (one norm per input column); got {list(input_norm.shape)}"
        )
    return magnitude_scores(weight) * input_norm.detach().float().to(weight.device)

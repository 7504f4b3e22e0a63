"""Scores: magnitude and Wanda's |W| * ||X||."""

from __future__ import annotations

import math

import pytest
import torch

from jupyter_sparsify.input_stats import InputNormAccumulator
from jupyter_sparsify.scores import magnitude_scores, wanda_scores

from helpers import UNIT_ROUNDOFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_magnitude_scores_are_exact_absolute_values_in_the_weight_dtype(dtype):
    torch.manual_seed(0)
    weight = torch.randn(64, 64).to(dtype)
    scores = magnitude_scores(weight)
    assert scores.dtype == dtype
    assert torch.equal(scores.float(), weight.float().abs())  # so the ranking is float32's


def test_wanda_scores_match_a_hand_computation():
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    x = torch.randn(2, 5, 4)  # [batch, seq, in]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    accumulator = InputNormAccumulator(4)
    accumulator.add_batch(x, mask)
    scores = wanda_scores(weight, accumulator.result())
    for i in range(3):
        for j in range(4):
            squares = sum(float(x[b, t, j]) ** 2 for b in range(2) for t in range(5) if mask[b, t])
            exact = abs(float(weight[i, j])) * math.sqrt(squares)  # in float64
            # two fp32 roundings (the norm, the product): at most 2u + u^2 relative
            assert scores[i, j].item() == pytest.approx(exact, rel=3 * UNIT_ROUNDOFF[torch.float32], abs=0)
    assert accumulator.tokens == 8


def test_wanda_scores_reject_a_wrong_norm_shape():
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        wanda_scores(torch.ones(3, 4), torch.ones(3))

"""What calibration measures of a layer's inputs: padding never counts."""

from __future__ import annotations

import torch

from jupyter_sparsify.input_stats import HessianAccumulator

from helpers import UNIT_ROUNDOFF, linear_error_bound


def test_hessian_accumulator_skips_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    accumulator = HessianAccumulator(5)
    accumulator.add_batch(x, mask)
    real = torch.cat([x[0, :4], x[1]])
    exact = real.T.double() @ real.double() / 10
    # any fp32 order of the 10-term sums (linear_error_bound holds two of them), then one rounding of the division
    bound = linear_error_bound(real.T, real.T) / 10 + UNIT_ROUNDOFF[torch.float32] * exact.abs()
    assert bool(((accumulator.result().double() - exact).abs() <= bound).all())

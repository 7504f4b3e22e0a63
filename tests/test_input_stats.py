"""What calibration measures of a layer's inputs: padding never counts; the Hessian is exact up to rounding."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.input_stats import HESSIAN_BLOCK, HessianAccumulator

from helpers import UNIT_ROUNDOFF, linear_error_bound


@pytest.mark.parametrize("width", [5, 2 * HESSIAN_BLOCK + 37])  # one block; several, the last one partial
def test_hessian_accumulator_skips_padding(width):
    torch.manual_seed(0)
    x = torch.randn(2, 6, width)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    accumulator = HessianAccumulator(width)
    accumulator.add_batch(x, mask)
    accumulator.add_batch(x[1:], None)  # a second batch, no mask: every position counts
    real = torch.cat([x[0, :4], x[1], x[1]])
    exact = real.T.double() @ real.double() / 16
    result = accumulator.result()
    assert torch.equal(result, result.T)  # the lower triangle, mirrored
    # any fp32 order of the 16-term sums (linear_error_bound holds two of them), then one rounding of the division
    bound = linear_error_bound(real.T, real.T) / 16 + UNIT_ROUNDOFF[torch.float32] * exact.abs()
    assert bool(((result.double() - exact).abs() <= bound).all())

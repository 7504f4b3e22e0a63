"""Metrics: nonzero counts that treat -0.0 as zero, in every dtype and layout."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.metrics import count_nonzero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8])
def test_count_nonzero_treats_negative_zero_as_zero(dtype):
    values = (
        torch.tensor([-0.0, 0.0, 1.0, -2.0, float("nan"), float("-inf"), 1e-40, -1e-40]).to(dtype)
        if dtype.is_floating_point
        else torch.tensor([0, 1, -1, 0], dtype=dtype)
    )
    big = values.repeat(70_000)  # several chunks, the last one partial
    assert count_nonzero(values) == int(torch.count_nonzero(values))
    assert count_nonzero(big) == int(torch.count_nonzero(big))
    assert count_nonzero(big.view(-1, 4).t()) == int(torch.count_nonzero(big)), "non-contiguous"

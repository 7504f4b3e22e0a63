"""Pruning in place with one global threshold: exact counts, ties to the earliest layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jupyter_sparsify.masks import prune_count
from jupyter_sparsify.scores import magnitude_scores


@pytest.mark.parametrize("values", [None, 4])
def test_global_magnitude_prunes_exactly_k_with_and_without_ties(values):
    """One global threshold: exactly round(amount * total) zeros, whether the weights are all
    distinct or quantised to a few magnitudes (ties then go to the earliest layers and positions)."""
    from jupyter_sparsify.layers import PrunableLayer
    from jupyter_sparsify.pruning import prune_in_place

    gen = torch.Generator().manual_seed(3)
    modules = [nn.Linear(37, 11, bias=False), nn.Linear(11, 29, bias=False)]
    with torch.no_grad():
        for module in modules:
            weight = torch.randn(module.weight.shape, generator=gen) + 5  # no zeros before pruning
            module.weight.copy_(weight if values is None else weight.round().clamp(4, 4 + values - 1))
    before = [m.weight.detach().clone() for m in modules]
    layers = [PrunableLayer(f"l{i}", m, m, "weight") for i, m in enumerate(modules)]
    prune_in_place(layers, lambda layer: magnitude_scores(layer.module.weight), amount=0.3)
    total = sum(m.weight.numel() for m in modules)
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    assert zeros == prune_count(total, 0.3)
    flat_before = torch.cat([b.reshape(-1) for b in before])
    flat_after = torch.cat([m.weight.detach().reshape(-1) for m in modules])
    pruned = flat_after == 0
    assert flat_before[pruned].max() <= flat_before[~pruned].min()  # only the smallest went
    if values is not None:
        ties = (flat_before == flat_before[pruned].max()).nonzero().reshape(-1)
        assert pruned[ties].tolist() == sorted(pruned[ties].tolist(), reverse=True)  # earliest ties first

"""ADMM pruning on a small layer with correlated inputs: exact counts, patterns, and a lower
reconstruction error than SparseGPT's (which it is meant to improve on)."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.admm import admm_prune
from jupyter_sparsify.input_stats import HessianAccumulator
from jupyter_sparsify.masks import nm_keep_mask, prune_count
from jupyter_sparsify.scores import magnitude_scores
from jupyter_sparsify.sparsegpt import sparsegpt_prune

from helpers import correlated_layer, reconstruction_error


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_admm_beats_sparsegpt_at_half_sparsity(scope):
    weight, x, hessian = correlated_layer(11)
    admm = admm_prune(weight, hessian, 0.5, scope=scope)
    sparsegpt = sparsegpt_prune(weight, hessian, 0.5, scope=scope)
    assert reconstruction_error(weight, admm, x) < reconstruction_error(weight, sparsegpt, x)


@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.7])
def test_admm_counts_are_exact_per_row_and_per_layer(sparsity):
    weight, _, hessian = correlated_layer(12)
    row = admm_prune(weight, hessian, sparsity, scope="row")
    assert ((row == 0).sum(dim=1) == prune_count(128, sparsity)).all()
    layer = admm_prune(weight, hessian, sparsity, scope="layer")
    assert int((layer == 0).sum()) == prune_count(64 * 128, sparsity)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_admm_nm_pattern_and_quality(nm):
    weight, x, hessian = correlated_layer(13)
    pruned = admm_prune(weight, hessian, 0.5, nm=nm)
    n, m = nm
    assert ((pruned.reshape(64, -1, m) != 0).sum(dim=-1) == n).all()
    magnitude = weight * nm_keep_mask(magnitude_scores(weight), n, m)
    assert reconstruction_error(weight, pruned, x) < reconstruction_error(weight, magnitude, x)


def test_admm_keeps_dtype_leaves_the_input_alone_and_prunes_dead_inputs_first():
    weight, x, _ = correlated_layer(14)
    x[:, :8] = 0  # inputs 0..7 never fire
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    weight = weight.to(torch.bfloat16)
    original = weight.clone()
    pruned = admm_prune(weight, accumulator.result(), 0.5)
    assert pruned.dtype == torch.bfloat16 and torch.equal(weight, original)
    assert torch.isfinite(pruned.float()).all() and (pruned[:, :8] == 0).all()
    assert ((pruned == 0).sum(dim=1) == 64).all()


def test_admm_rejects_bad_arguments():
    weight, _, hessian = correlated_layer(0)
    with pytest.raises(ValueError, match="'row' or 'layer'"):
        admm_prune(weight, hessian, 0.5, scope="global")
    with pytest.raises(ValueError, match="iterations"):
        admm_prune(weight, hessian, 0.5, iterations=0)
    with pytest.raises(ValueError, match="hessian must be"):
        admm_prune(weight, hessian[:4, :4], 0.5)
    with pytest.raises(ValueError, match="no calibration token"):
        admm_prune(weight, torch.zeros(128, 128), 0.5)

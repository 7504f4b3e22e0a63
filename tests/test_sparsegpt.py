"""SparseGPT on a small layer with correlated inputs: quality, exact counts, patterns, the refit."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.input_stats import HessianAccumulator
from jupyter_sparsify.masks import layer_keep_mask, nm_keep_mask, prune_count, row_keep_mask
from jupyter_sparsify.scores import magnitude_scores, wanda_scores
from jupyter_sparsify.sparsegpt import sparsegpt_prune

from helpers import UNIT_ROUNDOFF, correlated_layer, gamma, reconstruction_error


def test_sparsegpt_beats_magnitude_and_wanda_at_half_sparsity():
    weight, x, hessian = correlated_layer()
    pruned = sparsegpt_prune(weight, hessian, 0.5)
    magnitude = weight * row_keep_mask(magnitude_scores(weight), 0.5)
    wanda = weight * row_keep_mask(wanda_scores(weight, x.norm(dim=0)), 0.5)
    assert (
        reconstruction_error(weight, pruned, x)
        < reconstruction_error(weight, wanda, x)
        < reconstruction_error(weight, magnitude, x)
    )
    assert ((pruned == 0).sum(dim=1) == 64).all()


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.3, 32), (0.7, 128), (0.55, 48)])
def test_sparsegpt_zero_count_per_row_is_exact(sparsity, blocksize):
    weight, _, hessian = correlated_layer(1)
    pruned = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    assert ((pruned == 0).sum(dim=1) == prune_count(128, sparsity)).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_sparsegpt_nm_pattern_and_quality(nm):
    weight, x, hessian = correlated_layer(2)
    pruned = sparsegpt_prune(weight, hessian, 0.5, nm=nm, blocksize=100)
    n, m = nm
    assert ((pruned.reshape(64, -1, m) != 0).sum(dim=-1) == n).all()
    magnitude = weight * nm_keep_mask(magnitude_scores(weight), n, m)
    assert reconstruction_error(weight, pruned, x) < reconstruction_error(weight, magnitude, x)


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.5, 128), (0.3, 32), (0.55, 48)])
def test_sparsegpt_layer_scope_prunes_the_exact_layer_count_with_uneven_rows(sparsity, blocksize):
    weight, x, hessian = correlated_layer(5)
    weight = weight * torch.linspace(0.2, 2.0, 64)[:, None]  # rows of very different scale
    pruned = sparsegpt_prune(weight, hessian, sparsity, scope="layer", blocksize=blocksize)
    per_row = (pruned == 0).sum(dim=1)
    assert int(per_row.sum()) == prune_count(64 * 128, sparsity)
    assert per_row[:8].float().mean() > per_row[-8:].float().mean()  # small rows lose more
    magnitude = weight * layer_keep_mask(magnitude_scores(weight), sparsity)
    assert reconstruction_error(weight, pruned, x) < reconstruction_error(weight, magnitude, x)


def test_sparsegpt_layer_scope_beats_row_scope_on_uneven_rows():
    weight, x, hessian = correlated_layer(6)
    weight = weight * torch.linspace(0.2, 2.0, 64)[:, None]
    row = sparsegpt_prune(weight, hessian, 0.5, scope="row")
    layer = sparsegpt_prune(weight, hessian, 0.5, scope="layer")
    assert reconstruction_error(weight, layer, x) < reconstruction_error(weight, row, x)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_refit_keeps_the_mask_and_reaches_the_least_squares_optimum(nm):
    """The refit changes only kept weights, lowers the reconstruction error below the paper's
    sweep, and with enough steps lands on the exact per-row least-squares solution for the mask."""
    weight, x, hessian = correlated_layer(7)
    paper = sparsegpt_prune(weight, hessian, 0.5, nm=nm, refit_steps=0)
    refit = sparsegpt_prune(weight, hessian, 0.5, nm=nm)
    assert torch.equal(refit == 0, paper == 0)
    assert reconstruction_error(weight, refit, x) < 0.97 * reconstruction_error(weight, paper, x)
    converged = sparsegpt_prune(weight, hessian, 0.5, nm=nm, refit_steps=300).double()
    damped = hessian.double() + 0.01 * hessian.diagonal().mean().double() * torch.eye(128, dtype=torch.float64)
    for row in range(0, 64, 9):  # w_S + H_SS^-1 H_S,Sc w_Sc
        kept = paper[row] != 0
        w, system = weight[row].double(), damped[kept][:, kept]
        exact = w[kept] + torch.linalg.solve(system, damped[kept][:, ~kept] @ w[~kept])
        # In exact arithmetic CG ends at the solution within n = |S| steps (here 64 < 300). In fp32 it reaches
        # the attainable accuracy instead: a relative error of about kappa(H_SS) n u (Greenbaum, Iterative
        # Methods for Solving Linear Systems, 1997, ch. 7). The default's few steps are far from it: the bound notices.
        eigenvalues = torch.linalg.eigvalsh(system)
        bound = float(eigenvalues[-1] / eigenvalues[0]) * len(exact) * UNIT_ROUNDOFF[torch.float32]
        assert float((converged[row, kept] - exact).norm() / exact.norm()) <= bound
        assert float((refit[row, kept].double() - exact).norm() / exact.norm()) > bound


@pytest.mark.parametrize(
    ("nm", "scope", "blocksize"), [(None, "row", 32), (None, "layer", 48), ((2, 4), "row", 128), ((4, 8), "row", 40)]
)
def test_sparsegpt_sweep_is_the_papers_obs_sweep_within_rounding(nm, scope, blocksize):
    """The paper's sweep visits the columns in order, zeroes each pruned one and moves its scaled error
    e_i = w_i / U_ii onto the later columns through row i of U (the upper Cholesky factor of H^-1). Given the
    final mask S of a row, that is one triangular system, e_S U_SS = w0_S, and the result is w0 - e U: solved
    here in float64 and compared with the fp32 result, however it was computed (sub-blocks, lazy products)."""
    weight, _, hessian = correlated_layer(8)
    pruned = sparsegpt_prune(weight, hessian, 0.5, nm=nm, scope=scope, blocksize=blocksize, refit_steps=0)
    damped = hessian.double() + 0.01 * hessian.diagonal().double().mean() * torch.eye(128, dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # U, U^T U = H^-1
    u, n = UNIT_ROUNDOFF[torch.float32], 128
    eigenvalues = torch.linalg.eigvalsh(damped)
    # The fp32 U used by the sweep is within 2u|U| of this one: one rounding, plus the float64 computation's own
    # error, about n kappa(H) u_64 relative, which is below u here
    assert n * float(eigenvalues[-1] / eigenvalues[0]) * 2.0**-53 < u
    # Each e_i is the fp32 result of one sum of at most n + 1 terms divided by U_ii, so the computed e solves
    # e (U_SS + dU) = w0_S with |dU| <= c |U_SS| (Higham, ch. 8: substitution is backward stable); c covers the sum,
    # the division, the rounding of the scale p_i / U_ii, and U's 2u.
    c = gamma(n + 4) + 2 * u
    for row in range(0, 64, 7):
        pruned_columns = pruned[row] == 0
        system = factor[pruned_columns][:, pruned_columns]
        w0 = weight[row].double()
        errors = torch.zeros(n, dtype=torch.float64)
        errors[pruned_columns] = torch.linalg.solve_triangular(system.T, w0[pruned_columns, None], upper=False)[:, 0]
        expected = w0 - errors @ factor
        # |e_hat - e| <= c |e_hat| |U_SS| |U_SS^-1|, then w = w0 - e U is one more dot product of at most n + 1 terms
        inverse = torch.linalg.inv(system)
        errors_bound = torch.zeros(n, dtype=torch.float64)
        errors_bound[pruned_columns] = c * (errors[pruned_columns].abs() @ system.abs() @ inverse.abs())
        magnitude = (errors.abs() + errors_bound) @ factor.abs()
        bound = errors_bound @ factor.abs() + 2 * u * magnitude + gamma(n + 1) * (w0.abs() + magnitude)
        kept = ~pruned_columns
        assert bool(((pruned[row].double() - expected).abs()[kept] <= bound[kept]).all())


def test_sparsegpt_rejects_an_unknown_scope():
    weight, _, hessian = correlated_layer(0)
    with pytest.raises(ValueError, match="'row' or 'layer'"):
        sparsegpt_prune(weight, hessian, 0.5, scope="global")


def test_sparsegpt_keeps_input_dtype_and_does_not_modify_the_input():
    weight, _, hessian = correlated_layer(3)
    weight = weight.to(torch.bfloat16)
    original = weight.clone()
    pruned = sparsegpt_prune(weight, hessian, 0.5)
    assert pruned.dtype == torch.bfloat16 and pruned.shape == weight.shape
    assert torch.equal(weight, original)
    assert ((pruned == 0).sum(dim=1) == 64).all()


def test_sparsegpt_handles_dead_inputs():
    weight, x, _ = correlated_layer(4)
    x[:, :8] = 0  # inputs 0..7 never fire
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    pruned = sparsegpt_prune(weight, accumulator.result(), 0.5)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, :8] == 0).all()  # free to prune: chosen first
    assert ((pruned == 0).sum(dim=1) == 64).all()
    with pytest.raises(ValueError, match="no calibration token"):
        sparsegpt_prune(weight, torch.zeros(128, 128), 0.5)

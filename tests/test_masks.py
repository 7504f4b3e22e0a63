"""Keep-masks: exact counts per row, N:M groups, ties to the lower index."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.masks import keep_top, nm_keep_mask, prune_count, row_keep_mask


def test_row_keep_mask_prunes_the_rounded_count_per_row():
    scores = torch.rand(5, 10)
    mask = row_keep_mask(scores, 0.35)  # 3.5 -> 4 pruned (half up)
    assert prune_count(10, 0.35) == 4
    assert (mask.sum(dim=1) == 6).all()
    kept_min = torch.where(mask, scores, torch.inf).min(dim=1).values
    pruned_max = torch.where(mask, -torch.inf, scores).max(dim=1).values
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_keep_mask_keeps_exactly_n_of_every_m(n, m):
    scores = torch.rand(16, 64)
    mask = nm_keep_mask(scores, n, m)
    groups = mask.reshape(16, -1, m)
    assert (groups.sum(dim=-1) == n).all()
    grouped_scores = scores.reshape(16, -1, m)
    kept_min = torch.where(groups, grouped_scores, torch.inf).min(dim=-1).values
    pruned_max = torch.where(groups, -torch.inf, grouped_scores).max(dim=-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_keep_mask_breaks_ties_deterministically():
    mask = nm_keep_mask(torch.ones(2, 8), 2, 4)
    assert mask.tolist() == [[True, True, False, False] * 2] * 2


@pytest.mark.parametrize("levels", [None, 3])
def test_keep_top_keeps_the_highest_and_gives_ties_to_the_lower_index(levels):
    """The same mask as a stable descending sort: distinct scores, or only 3 distinct values (many ties)."""
    g = torch.Generator().manual_seed(levels or 0)
    if levels is None:
        scores = torch.randn(40, 3, 37, generator=g)
    else:
        scores = torch.randint(levels, (40, 3, 37), generator=g).float()
    for keep in (0, 1, 18, 36, 37):
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        expected = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order[..., :keep], True)
        assert torch.equal(keep_top(scores, keep), expected), keep


def test_nm_keep_mask_rejects_bad_widths_and_patterns():
    with pytest.raises(ValueError, match="in_features=6"):
        nm_keep_mask(torch.rand(3, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_keep_mask(torch.rand(3, 8), 5, 4)

"""Tests for the pruning criteria (magnitude, Wanda, N:M), SparseGPT and the calibration pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jupyter_sparsify.calibration import (
    collect_input_stats,
    collect_sequential,
    decoder_layers,
    default_calibration_texts,
)
from jupyter_sparsify.input_stats import HessianAccumulator, InputNormAccumulator
from jupyter_sparsify.masks import keep_top, layer_keep_mask, nm_keep_mask, prune_count, row_keep_mask
from jupyter_sparsify.scores import magnitude_scores, wanda_scores
from jupyter_sparsify.sparsegpt import sparsegpt_prune

from helpers import tiny_model

TEXTS = [
    "the cat sat on the warm mat near the door",
    "a quick brown fox jumps over the lazy dog again and again while the old farmer watches",
    "bread needs flour water salt and time",
    "she opened the window",
    "we walked along the quiet road to the old mill and back before the rain came down",
]


# ---------------------------------------------------------------- criteria


def test_magnitude_scores_are_float32_absolute_values():
    weight = torch.tensor([[-1.5, 2.0], [0.0, -0.25]], dtype=torch.float16)
    scores = magnitude_scores(weight)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, torch.tensor([[1.5, 2.0], [0.0, 0.25]]))


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
            assert scores[i, j].item() == pytest.approx(abs(float(weight[i, j])) * math.sqrt(squares), rel=1e-5)
    assert accumulator.tokens == 8


def test_wanda_scores_reject_a_wrong_norm_shape():
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        wanda_scores(torch.ones(3, 4), torch.ones(3))


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


# ---------------------------------------------------------------- SparseGPT


def _correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64x128 weight, correlated inputs X [tokens, 128] with uneven scales, and H."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=g)
    mixing = torch.randn(128, 128, generator=g) / math.sqrt(128)
    x = torch.randn(2048, 128, generator=g) @ mixing + 0.1 * torch.randn(2048, 128, generator=g)
    x = x * torch.exp(torch.randn(128, generator=g))
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    return weight, x, accumulator.result()


def _relative_error(weight, pruned, x) -> float:
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()


def test_sparsegpt_beats_magnitude_and_wanda_at_half_sparsity():
    weight, x, hessian = _correlated_layer()
    pruned = sparsegpt_prune(weight, hessian, 0.5)
    magnitude = weight * row_keep_mask(magnitude_scores(weight), 0.5)
    wanda = weight * row_keep_mask(wanda_scores(weight, x.norm(dim=0)), 0.5)
    assert (
        _relative_error(weight, pruned, x) < _relative_error(weight, wanda, x) < _relative_error(weight, magnitude, x)
    )
    assert ((pruned == 0).sum(dim=1) == 64).all()


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.3, 32), (0.7, 128), (0.55, 48)])
def test_sparsegpt_zero_count_per_row_is_exact(sparsity, blocksize):
    weight, _, hessian = _correlated_layer(1)
    pruned = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    assert ((pruned == 0).sum(dim=1) == prune_count(128, sparsity)).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_sparsegpt_nm_pattern_and_quality(nm):
    weight, x, hessian = _correlated_layer(2)
    pruned = sparsegpt_prune(weight, hessian, 0.5, nm=nm, blocksize=100)
    n, m = nm
    assert ((pruned.reshape(64, -1, m) != 0).sum(dim=-1) == n).all()
    magnitude = weight * nm_keep_mask(magnitude_scores(weight), n, m)
    assert _relative_error(weight, pruned, x) < _relative_error(weight, magnitude, x)


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.5, 128), (0.3, 32), (0.55, 48)])
def test_sparsegpt_layer_scope_prunes_the_exact_layer_count_with_uneven_rows(sparsity, blocksize):
    weight, x, hessian = _correlated_layer(5)
    weight = weight * torch.linspace(0.2, 2.0, 64)[:, None]  # rows of very different scale
    pruned = sparsegpt_prune(weight, hessian, sparsity, scope="layer", blocksize=blocksize)
    per_row = (pruned == 0).sum(dim=1)
    assert int(per_row.sum()) == prune_count(64 * 128, sparsity)
    assert per_row[:8].float().mean() > per_row[-8:].float().mean()  # small rows lose more
    magnitude = weight * layer_keep_mask(magnitude_scores(weight), sparsity)
    assert _relative_error(weight, pruned, x) < _relative_error(weight, magnitude, x)


def test_sparsegpt_layer_scope_beats_row_scope_on_uneven_rows():
    weight, x, hessian = _correlated_layer(6)
    weight = weight * torch.linspace(0.2, 2.0, 64)[:, None]
    row = sparsegpt_prune(weight, hessian, 0.5, scope="row")
    layer = sparsegpt_prune(weight, hessian, 0.5, scope="layer")
    assert _relative_error(weight, layer, x) < _relative_error(weight, row, x)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_refit_keeps_the_mask_and_reaches_the_least_squares_optimum(nm):
    """The refit changes only kept weights, lowers the reconstruction error below the paper's
    sweep, and with enough steps lands on the exact per-row least-squares solution for the mask."""
    weight, x, hessian = _correlated_layer(7)
    paper = sparsegpt_prune(weight, hessian, 0.5, nm=nm, refit_steps=0)
    refit = sparsegpt_prune(weight, hessian, 0.5, nm=nm)
    assert torch.equal(refit == 0, paper == 0)
    assert _relative_error(weight, refit, x) < 0.97 * _relative_error(weight, paper, x)
    converged = sparsegpt_prune(weight, hessian, 0.5, nm=nm, refit_steps=300).double()
    damped = hessian.double() + 0.01 * hessian.diagonal().mean().double() * torch.eye(128, dtype=torch.float64)
    for row in range(0, 64, 9):  # w_S + H_SS^-1 H_S,Sc w_Sc
        kept = paper[row] != 0
        w = weight[row].double()
        exact = w[kept] + torch.linalg.solve(damped[kept][:, kept], damped[kept][:, ~kept] @ w[~kept])
        torch.testing.assert_close(converged[row, kept], exact, rtol=1e-3, atol=1e-3)


def test_sparsegpt_rejects_an_unknown_scope():
    weight, _, hessian = _correlated_layer(0)
    with pytest.raises(ValueError, match="'row' or 'layer'"):
        sparsegpt_prune(weight, hessian, 0.5, scope="global")


def test_sparsegpt_keeps_input_dtype_and_does_not_modify_the_input():
    weight, _, hessian = _correlated_layer(3)
    weight = weight.to(torch.bfloat16)
    original = weight.clone()
    pruned = sparsegpt_prune(weight, hessian, 0.5)
    assert pruned.dtype == torch.bfloat16 and pruned.shape == weight.shape
    assert torch.equal(weight, original)
    assert ((pruned == 0).sum(dim=1) == 64).all()


def test_sparsegpt_handles_dead_inputs():
    weight, x, _ = _correlated_layer(4)
    x[:, :8] = 0  # inputs 0..7 never fire
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    pruned = sparsegpt_prune(weight, accumulator.result(), 0.5)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, :8] == 0).all()  # free to prune: chosen first
    assert ((pruned == 0).sum(dim=1) == 64).all()
    with pytest.raises(ValueError, match="no calibration token"):
        sparsegpt_prune(weight, torch.zeros(128, 128), 0.5)


def test_hessian_accumulator_skips_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    accumulator = HessianAccumulator(5)
    accumulator.add_batch(x, mask)
    real = torch.cat([x[0, :4], x[1]])
    torch.testing.assert_close(accumulator.result(), real.T @ real / 10)


# ---------------------------------------------------------------- calibration


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in TEXTS for word in text.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = decoder_layers(model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] != "lm_head"
        and any(module is sub for sub in layers.modules())
        and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
    ]


@pytest.fixture(params=["llama", "gpt2", "opt"])  # OPT feeds its MLP flattened [batch * seq, hidden] inputs
def model(request):
    return tiny_model(request.param, vocab_size=1000)


@pytest.mark.parametrize("want", ["norms", "hessians"])
def test_padding_does_not_change_the_statistics(model, want):
    tokenizer, modules = _word_tokenizer(), _prunable(model)
    padded = collect_input_stats(model, tokenizer, TEXTS, modules, want=want, batch_size=len(TEXTS))
    alone = collect_input_stats(model, tokenizer, TEXTS, modules, want=want, batch_size=1)
    assert padded.keys() == alone.keys() == {name for name, _ in modules}
    for name, module in modules:
        width = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features
        assert padded[name].shape == ((width,) if want == "norms" else (width, width))
        torch.testing.assert_close(padded[name], alone[name], rtol=1e-4, atol=1e-5)


def test_statistics_match_the_module_inputs():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    name, module = "model.layers.1.mlp.down_proj", model.model.layers[1].mlp.down_proj
    stats = collect_input_stats(model, tokenizer, TEXTS, [(name, module)], want="hessians")
    inputs = []
    handle = module.register_forward_pre_hook(lambda mod, args: inputs.append(args[0][0]))
    with torch.no_grad():
        for text in TEXTS:
            model(**tokenizer(text, return_tensors="pt"))
    handle.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(stats[name], x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_hessian_groups_give_the_same_statistics():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    modules = _prunable(model)
    together = collect_input_stats(model, tokenizer, TEXTS, modules, want="hessians")
    grouped = collect_input_stats(model, tokenizer, TEXTS, modules, want="hessians", group_size=3)
    for name in together:
        torch.testing.assert_close(together[name], grouped[name])


def test_calibration_argument_edge_cases():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    assert collect_input_stats(model, tokenizer, TEXTS, [], want="hessians") == {}
    with pytest.raises(ValueError, match="group_size"):
        collect_input_stats(model, tokenizer, TEXTS, _prunable(model), want="hessians", group_size=0)
    with pytest.raises(ValueError, match="want"):
        collect_input_stats(model, tokenizer, TEXTS, _prunable(model), want="grads")
    with pytest.raises(ValueError, match="empty"):
        collect_input_stats(model, tokenizer, ["", ""], _prunable(model))


def test_calibration_leaves_no_hooks_and_no_weight_changes(model):
    tokenizer, modules = _word_tokenizer(), _prunable(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    calls = []
    collect_input_stats(
        model,
        tokenizer,
        TEXTS,
        modules,
        want="hessians",
        group_size=4,
        progress=lambda done, total, message: calls.append((done, total)),
    )
    assert calls[-1][0] == calls[-1][1] == math.ceil(len(modules) / 4) * 1  # one batch per pass
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert not any(module._forward_pre_hooks for module in model.modules())

    def interrupt(done, total, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_input_stats(model, tokenizer, TEXTS, modules, progress=interrupt)
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_sequential_matches_one_shot_when_nothing_is_pruned(model):
    tokenizer, modules = _word_tokenizer(), _prunable(model)
    one_shot = collect_input_stats(model, tokenizer, TEXTS, modules, want="hessians", batch_size=2)
    seen: dict[int, dict] = {}
    collect_sequential(
        model,
        tokenizer,
        TEXTS,
        decoder_layers(model),
        modules,
        lambda index, stats: seen.setdefault(index, stats),
        batch_size=2,
    )
    assert sorted(seen) == [0, 1]
    sequential = {name: stat for stats in seen.values() for name, stat in stats.items()}
    assert sequential.keys() == one_shot.keys()
    for name in one_shot:
        torch.testing.assert_close(sequential[name], one_shot[name], rtol=1e-4, atol=1e-5)
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_sequential_sees_the_pruned_earlier_blocks():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    modules = _prunable(model)
    one_shot = collect_input_stats(model, tokenizer, TEXTS, modules, want="norms")

    def prune_block(index, stats):
        for name, module in modules:
            if name in stats:
                module.weight.mul_(row_keep_mask(wanda_scores(module.weight, stats[name]), 0.5))

    sequential = {}
    collect_sequential(
        model,
        tokenizer,
        TEXTS,
        decoder_layers(model),
        modules,
        lambda index, stats: (sequential.update(stats), prune_block(index, stats)),
        want="norms",
    )
    first = "model.layers.0.self_attn.q_proj"
    second = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(sequential[first], one_shot[first])
    assert not torch.allclose(sequential[second], one_shot[second])


def test_sequential_rejects_modules_outside_the_blocks():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    with pytest.raises(ValueError, match="lm_head"):
        collect_sequential(
            model, tokenizer, TEXTS, decoder_layers(model), [("lm_head", model.lm_head)], lambda index, stats: None
        )


def test_default_calibration_texts_are_shipped():
    texts = default_calibration_texts()
    assert len(texts) > 100
    joined = " ".join(texts).lower()
    assert sum(len(text.split()) for text in texts) > 15000
    for evaluation_topic in ("perplexity", "http 429", "thermal throttling", "sparsity"):
        assert evaluation_topic not in joined


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

"""The calibration pass: statistics of every prunable layer's inputs, one-shot and block by block."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jupyter_sparsify.calibration import (
    collect_input_stats,
    collect_sequential,
    decoder_blocks,
)
from jupyter_sparsify.masks import row_keep_mask
from jupyter_sparsify.scores import wanda_scores

from helpers import tiny_model, within_statistic_bound

TEXTS = [
    "the cat sat on the warm mat near the door",
    "a quick brown fox jumps over the lazy dog again and again while the old farmer watches",
    "bread needs flour water salt and time",
    "she opened the window",
    "we walked along the quiet road to the old mill and back before the rain came down",
]


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
    layers = decoder_blocks(model)
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
        assert within_statistic_bound(padded[name], alone[name], model, _tokens(tokenizer, TEXTS)), name
    one_text_less = collect_input_stats(model, tokenizer, TEXTS[1:], modules, want=want, batch_size=1)
    for name, _ in modules:  # the bound is tight enough to notice a text missing from any layer's statistic
        assert not within_statistic_bound(one_text_less[name], alone[name], model, _tokens(tokenizer, TEXTS)), name


def _tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(text)["input_ids"]) for text in texts)


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
    assert within_statistic_bound(stats[name], x.T @ x / len(x), model, len(x))


def test_hessian_groups_give_the_same_statistics():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    modules = _prunable(model)
    together = collect_input_stats(model, tokenizer, TEXTS, modules, want="hessians")
    grouped = collect_input_stats(model, tokenizer, TEXTS, modules, want="hessians", group_size=3)
    for name in together:
        assert torch.equal(together[name], grouped[name])  # the same forward passes, other hooks


def test_calibration_argument_edge_cases():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    assert collect_input_stats(model, tokenizer, TEXTS, [], want="hessians") == {}
    with pytest.raises(ValueError, match="group_size"):
        collect_input_stats(model, tokenizer, TEXTS, _prunable(model), want="hessians", group_size=0)
    with pytest.raises(ValueError, match="want"):
        collect_input_stats(model, tokenizer, TEXTS, _prunable(model), want="grads")
    with pytest.raises(ValueError, match="needs want='hessians'"):
        collect_input_stats(model, tokenizer, TEXTS, _prunable(model), want="norms", norms={})
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
        decoder_blocks(model),
        modules,
        lambda index, stats: seen.setdefault(index, stats),
        batch_size=2,
    )
    assert sorted(seen) == [0, 1]
    sequential = {name: stat for stats in seen.values() for name, stat in stats.items()}
    assert sequential.keys() == one_shot.keys()
    for name in one_shot:
        assert within_statistic_bound(sequential[name], one_shot[name], model, _tokens(tokenizer, TEXTS)), name
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
        decoder_blocks(model),
        modules,
        lambda index, stats: (sequential.update(stats), prune_block(index, stats)),
        want="norms",
    )
    first = "model.layers.0.self_attn.q_proj"
    second = "model.layers.1.self_attn.q_proj"
    assert within_statistic_bound(sequential[first], one_shot[first], model, _tokens(tokenizer, TEXTS))
    assert not within_statistic_bound(sequential[second], one_shot[second], model, _tokens(tokenizer, TEXTS))


def test_sequential_rejects_modules_outside_the_blocks():
    model, tokenizer = tiny_model("llama", vocab_size=1000), _word_tokenizer()
    with pytest.raises(ValueError, match="lm_head"):
        collect_sequential(
            model, tokenizer, TEXTS, decoder_blocks(model), [("lm_head", model.lm_head)], lambda index, stats: None
        )

"""Bad input gets a clear error naming the value and the fix, and leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.layers import find_prunable_layers
from jupyter_sparsify.session import Session

from helpers import state_checksum, tiny_model, word_tokenizer


@pytest.fixture
def pruned_session(tokenizer):
    session = Session(tiny_model("llama"), tokenizer)
    session.apply(0.3, mode="csr", progress=lambda *a: None)
    return session


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"amount": 1.5}, ValueError, "amount must be in [0, 1)"),
        ({"amount": -0.1}, ValueError, "amount must be in [0, 1)"),
        ({"amount": float("nan")}, ValueError, "amount must be in [0, 1)"),
        ({"amount": "0.3"}, TypeError, "amount must be a number"),
        ({"amount": None}, ValueError, "amount is required"),
        ({"amount": 0.3, "mode": "sparse"}, ValueError, "mode must be one of"),
        ({"amount": 0.3, "criterion": "random"}, ValueError, "criterion must be one of"),
        ({"amount": 0.3, "scope": "block"}, ValueError, "scope must be one of"),
        ({"amount": 0.3, "pattern": "2-4"}, ValueError, "pattern must look like N:M"),
        ({"amount": 0.3, "pattern": "4:2"}, ValueError, "0 < N < M"),
        ({"amount": 0.3, "pattern": "2:4"}, ValueError, "prunes exactly 50%"),
        ({"amount": 0.3, "include": ["*.nothing.*"]}, ValueError, "matches no linear layer"),
        ({"amount": 0.3, "exclude": ["*"]}, ValueError, "no prunable layer left"),
        ({"amount": 0.3, "include": "*.mlp.*"}, TypeError, "list of glob patterns"),
        ({"amount": 0.3, "mode": "csr", "backend": "cusparse"}, ValueError, "backend must be one of"),
        ({"amount": 0.3, "criterion": "sparsegpt", "scope": "global"}, ValueError, "scope='row'"),
        ({"amount": 0.3, "criterion": "admm", "scope": "global"}, ValueError, "scope='row'"),
        ({"amount": 0.3, "reconstruct": True}, ValueError, "calibrates block by block"),
        (
            {"amount": 0.3, "criterion": "wanda", "scope": "global", "reconstruct": True},
            ValueError,
            "calibrates block by block",
        ),
        ({"amount": 0.3, "include": []}, ValueError, "include is an empty list"),
        ({"pattern": (2, 4, 8)}, ValueError, "two whole numbers (N, M)"),
        ({"pattern": (2.5, 4)}, ValueError, "two whole numbers (N, M)"),
        ({"amount": 0.3, "criterion": "wanda", "calibration": "daily"}, ValueError, "calibration must be one of"),
    ],
)
def test_bad_apply_arguments_change_nothing(pruned_session, kwargs, error, words):
    before = state_checksum(pruned_session.model)
    settings = pruned_session.settings
    with pytest.raises(error) as caught:
        pruned_session.apply(**kwargs)
    assert words in str(caught.value)
    assert state_checksum(pruned_session.model) == before
    assert pruned_session.settings == settings


def test_numpy_and_negative_zero_amounts_are_plain_numbers(tokenizer):
    import numpy as np

    session = Session(tiny_model("llama"), tokenizer)
    assert session.apply(np.float32(0.25), progress=lambda *a: None).amount == 0.25
    assert session.apply(-0.0, progress=lambda *a: None).label == "Masked 0%"


def test_not_a_model():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Session("model", word_tokenizer())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_prunable_layers(object())


def test_model_without_prunable_layers(tokenizer):
    class OnlyEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="no prunable layer"):
        find_prunable_layers(OnlyEmbeddings())


def test_tokenizer_that_does_not_fit_the_model():
    model = tiny_model("llama", vocab_size=64)
    before = state_checksum(model)
    with pytest.raises(ValueError, match="pass the tokenizer that belongs to this model"):
        Session(model, word_tokenizer(vocab_size=256))
    assert state_checksum(model) == before


def test_bad_texts(tokenizer):
    session = Session(tiny_model("opt"), tokenizer)
    with pytest.raises(TypeError, match="list of strings"):
        session.set_texts("one string")
    with pytest.raises(ValueError, match="empty"):
        session.set_texts(["", "  "])


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_interrupted_apply_leaves_the_model_as_it_was(pruned_session, monkeypatch, fault):
    """A fault after some layers were already pruned and converted puts back the previous state."""
    import jupyter_sparsify.formats as formats

    before = state_checksum(pruned_session.model)
    calls = {"n": 0}
    real = formats.CSRLinear.from_dense.__func__

    def failing_from_dense(cls, module, backend=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise fault("interrupted")
        return real(cls, module, backend)

    monkeypatch.setattr(formats.CSRLinear, "from_dense", classmethod(failing_from_dense))
    with pytest.raises(fault):
        pruned_session.apply(0.6, mode="csr", progress=lambda *a: None)
    monkeypatch.undo()
    assert calls["n"] == 3  # failed at the third layer; the previous CSR 30 % was put back, not rebuilt
    assert state_checksum(pruned_session.model) == before
    assert pruned_session.settings.label == "CSR 30%"


@pytest.mark.parametrize(
    "texts, words",
    [
        (["Hello", "World"], "is a single token"),
        (["The valley is quiet.", "bad \ud800 text"], "not valid Unicode"),
    ],
)
def test_corpora_that_give_nothing_to_measure_are_refused_up_front(tokenizer, texts, words):
    session = Session(tiny_model("llama"), tokenizer)
    before = list(session.texts)
    with pytest.raises(ValueError, match=words):
        session.set_texts(texts)
    assert session.texts == before and session.measure()["eval_tokens"] > 0


def test_a_second_interrupt_during_the_rollback_still_puts_the_previous_variant_back(pruned_session, monkeypatch):
    """Ctrl-C during a CSR apply, and again while the previous CSR 30 % is being put back: the rollback holds the
    second interrupt until it is done, so the model is CSR 30 % again (bit-exact) and the settings say so."""
    import jupyter_sparsify.formats as formats

    before, sparsity = state_checksum(pruned_session.model), pruned_session.measure()["sparsity_prunable"]
    real_from_dense, real_restore = formats.CSRLinear.from_dense.__func__, type(pruned_session)._restore_layer
    calls = {"from_dense": 0, "restore": 0}

    def interrupted_apply(cls, module, backend=None):
        calls["from_dense"] += 1
        if calls["from_dense"] == 3:
            raise KeyboardInterrupt
        return real_from_dense(cls, module, backend)

    def interrupted_rollback(self, layer):
        calls["restore"] += 1
        if calls["from_dense"] == 3 and calls["restore"] == len(self.candidate_layers) + 1:  # the rollback's first
            raise KeyboardInterrupt
        return real_restore(self, layer)

    monkeypatch.setattr(formats.CSRLinear, "from_dense", classmethod(interrupted_apply))
    monkeypatch.setattr(type(pruned_session), "_restore_layer", interrupted_rollback)
    with pytest.raises(KeyboardInterrupt):
        pruned_session.apply(0.5, mode="csr", progress=lambda *a: None)
    monkeypatch.undo()
    assert calls["restore"] > len(pruned_session.candidate_layers) + 1  # the rollback went on after the interrupt
    assert pruned_session.settings.label == "CSR 30%" and state_checksum(pruned_session.model) == before
    assert pruned_session.measure()["sparsity_prunable"] == sparsity


def test_an_interrupted_reset_still_restores_every_layer(pruned_session, monkeypatch):
    dense_session_layers = len(pruned_session.candidate_layers)
    calls = {"n": 0}
    real = type(pruned_session)._restore_layer

    def interrupted_once(self, layer):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, layer)

    monkeypatch.setattr(type(pruned_session), "_restore_layer", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        pruned_session.reset()
    monkeypatch.undo()
    assert calls["n"] == dense_session_layers + 1  # the interrupted layer was done again, then the rest
    assert pruned_session.settings.label == "Dense"
    assert not any(type(m).__name__ == "CSRLinear" for m in pruned_session.model.modules())
    row = pruned_session.measure()  # no 0-element weight left behind
    assert row["sparsity_prunable"] == 0.0 and row["top1_match"] == 1.0


def test_a_model_with_a_short_context_is_measured_and_calibrated_within_it(tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    session = Session(model.eval(), tokenizer)  # the seed texts are longer than 16 tokens
    assert max(batch["input_ids"].shape[1] for batch in session._corpus.batches) == 16
    session.apply(0.5, criterion="wanda", progress=lambda *a: None)
    assert abs(session.measure()["sparsity_prunable"] - 0.5) < 1e-6


def test_a_cache_setting_that_names_a_file_is_refused_at_once(tmp_path, monkeypatch):
    from jupyter_sparsify.models import ModelLoadError, load_model

    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("")
    monkeypatch.setenv("JUPYTER_SPARSIFY_CACHE", str(not_a_folder))
    with pytest.raises(ModelLoadError, match="which is a file: point it at a folder"):
        load_model()


def test_a_part_of_the_model_is_a_variant_of_its_own(tokenizer):
    session = Session(tiny_model("llama"), tokenizer)
    whole = session.apply(pattern="2:4", progress=lambda *a: None).label
    part = session.apply(pattern="2:4", include=["*.mlp.*"], progress=lambda *a: None).label
    assert whole == "Masked 2:4" and part == "Masked 2:4 include *.mlp.*"

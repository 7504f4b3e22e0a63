"""Small random OPT, GPT-NeoX, GPT-2 (Conv1D, tied head) and Llama models: every scope, both modes."""

from __future__ import annotations

import math

import pytest
import torch

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.layers import find_prunable_layers, weight_matrix
from jupyter_sparsify.masks import prune_count
from jupyter_sparsify.session import Session

from helpers import ARCHITECTURES, assert_same_function, corpus_logits, gamma, state_checksum, tiny_model

HEADS = {"opt": "lm_head", "gpt_neox": "embed_out", "gpt2": "lm_head", "llama": "lm_head"}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_head_is_never_a_prunable_layer(architecture):
    model = tiny_model(architecture)
    names = {layer.name for layer in find_prunable_layers(model)}
    assert HEADS[architecture] not in names and names


def test_gpt2_uses_conv1d_and_a_tied_head():
    model = tiny_model("gpt2")
    layers = find_prunable_layers(model)
    assert all(layer.transposed for layer in layers)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("scope", ["global", "layer", "row"])
@pytest.mark.parametrize("mode", ["masked", "csr"])
def test_half_pruned_counts_are_exact(architecture, scope, mode, tokenizer):
    model = tiny_model(architecture)
    head = model.get_output_embeddings().weight.detach().clone()
    before = state_checksum(model)
    session = Session(model, tokenizer)
    session.apply(0.5, mode=mode, scope=scope, progress=lambda *a: None)
    table = session.layer_table()
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in table["shape"]]
    if scope == "global":
        total = sum(o * i for o, i in shapes)
        assert table["nnz"].sum() == total - prune_count(total, 0.5)
    elif scope == "layer":
        assert list(table["nnz"]) == [o * i - prune_count(o * i, 0.5) for o, i in shapes]
    else:
        for layer in session.default_layers:
            module = getattr(layer.parent, layer.attr)
            weight = module.dense_weight() if isinstance(module, CSRLinear) else weight_matrix(module)
            zeros_per_row = (weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == prune_count(weight.shape[1], 0.5))
    assert set(table["format"]) == {"csr" if mode == "csr" else "dense"}
    assert torch.equal(model.get_output_embeddings().weight, head)
    row = session.measure()
    assert abs(row["sparsity_prunable"] - 0.5) < 0.01
    session.reset()
    assert state_checksum(model) == before


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_masked_and_csr_agree(architecture, tokenizer):
    session = Session(tiny_model(architecture), tokenizer)
    session.apply(0.5, mode="masked")
    masked, masked_logits = session.measure(), corpus_logits(session)
    session.apply(0.5, mode="csr")
    csr, csr_logits = session.measure(), corpus_logits(session)
    ties = assert_same_function(masked_logits, csr_logits, session.model)  # within the fp bound of helpers.py
    assert abs(masked["top1_match"] - csr["top1_match"]) * masked["eval_tokens"] <= ties
    # log-softmax moves by at most twice the largest logit difference, so the mean NLL does too; each run's mean NLL
    # also carries its own rounding: a log-softmax over V logits and a float32 sum over at most T tokens, relative
    # error γ_{V+T} of per-token terms bounded by 2·max|z| + log V
    vocab, tokens = masked_logits.shape[-1], masked["eval_tokens"]
    term = 2 * float(torch.maximum(masked_logits.abs().max(), csr_logits.abs().max())) + math.log(vocab)
    bound = 2 * float((csr_logits - masked_logits).abs().max()) + 2 * gamma(vocab + tokens) * term
    assert abs(math.log(masked["perplexity"]) - math.log(csr["perplexity"])) <= bound


def test_a_tied_head_is_pruned_once_when_named(tokenizer):
    model = tiny_model("gpt2")
    session = Session(model, tokenizer)
    session.apply(0.5, mode="masked", scope="layer", include=["lm_head"])
    # the head and the input embeddings are one tensor: pruned once, zeros visible in both
    assert list(session.layer_table()["name"]) == ["lm_head"]
    assert abs(float((model.transformer.wte.weight == 0).float().mean()) - 0.5) < 1e-3
    with pytest.raises(ValueError, match="tied"):
        session.apply(0.5, mode="csr", include=["lm_head"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_half_precision_csr_runs_on_cpu(dtype, backend, tokenizer):
    """The seed crashed here: "addmm_out_sparse_csr_impl_mkl not implemented for 'Half'"."""
    session = Session(tiny_model("opt").to(dtype), tokenizer)
    session.apply(0.3, mode="masked")
    masked = session.measure()
    session.apply(0.3, mode="csr", backend=backend)
    csr = session.measure()
    assert csr["top1_match"] > 0.9 * masked["top1_match"]
    assert isinstance(session.model.model.decoder.layers[0].fc1, CSRLinear)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt", "admm"])
@pytest.mark.parametrize("mode", ["masked", "csr"])
def test_every_criterion_in_both_modes_then_reset_bit_exact(architecture, criterion, mode, tokenizer):
    model = tiny_model(architecture)
    before = state_checksum(model)
    session = Session(model, tokenizer)
    session.set_calibration_texts(["The valley is quiet and the river bends.", "Sparse kernels need real zeros."] * 4)
    for scope, pattern in (("row", None), ("layer", "2:4")):
        session.apply(
            None if pattern else 0.5,
            mode=mode,
            criterion=criterion,
            scope=scope,
            pattern=pattern,
            progress=lambda *a: None,
        )
        table = session.layer_table()
        assert (table["sparsity"] - 0.5).abs().max() < 1e-9, table
        assert session.measure()["setup"].startswith("CSR" if mode == "csr" else "Masked")
    session.reset()
    assert state_checksum(model) == before


def test_sparsegpt_changes_the_kept_weights_and_reset_still_restores_them(tokenizer):
    model = tiny_model("llama")
    before = state_checksum(model)
    original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    session = Session(model, tokenizer)
    session.apply(0.5, criterion="sparsegpt", scope="row", progress=lambda *a: None)
    pruned = model.model.layers[0].mlp.down_proj.weight
    kept = pruned != 0
    assert not torch.equal(pruned[kept], original[kept])  # the OBS update compensates
    session.reset()
    assert state_checksum(model) == before


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sparsegpt_layer_scope_prunes_the_exact_count_of_every_layer(architecture, tokenizer):
    model = tiny_model(architecture)
    before = state_checksum(model)
    session = Session(model, tokenizer)
    session.set_calibration_texts(["The valley is quiet and the river bends.", "Sparse kernels need real zeros."] * 4)
    session.apply(0.45, criterion="sparsegpt", scope="layer", progress=lambda *a: None)
    table = session.layer_table()
    total = table["shape"].map(lambda shape: math.prod(int(d) for d in shape.split("x")))
    assert (total - table["nnz"] == total.map(lambda n: prune_count(n, 0.45))).all(), table
    session.reset()
    assert state_checksum(model) == before

"""The user's story on the real embedded SmolLM2-135M: Dense / Masked 30 % / CSR 30 %."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jupyter_sparsify.formats import CSRLinear

from helpers import assert_same_function, assert_within_linear_bound, corpus_logits, state_checksum


def test_the_seed_table_tells_the_truth(smol):
    dense = smol.measure()
    smol.apply(0.3, mode="masked")
    masked = smol.measure()
    masked_logits = corpus_logits(smol)
    smol.apply(0.3, mode="csr", backend="torch")
    csr = smol.measure()
    csr_logits = corpus_logits(smol)

    assert dense["top1_match"] == 1.0 and dense["compute_ratio"] == 1.0
    assert masked["size_mb"] == dense["size_mb"]  # masking removes nothing
    assert csr["size_mb"] > dense["size_mb"]  # the truth the seed hid: int32 indices + values > dense at 30 %
    assert abs(masked["sparsity_prunable"] - 0.3) < 1e-6 and abs(csr["sparsity_prunable"] - 0.3) < 1e-6
    assert masked["compute_ratio"] == csr["compute_ratio"] < 0.8
    assert masked["executed_ratio"] == 1.0 and csr["executed_ratio"] < 0.8
    # masked and CSR are one function summed in two orders: logits within the fp bound, and the top-1
    # agreement equal but for near-ties (9 of the 246 positions have top two logits within 0.05, 24 within 0.1)
    ties = assert_same_function(masked_logits, csr_logits, smol.model)
    assert abs(masked["top1_match"] - csr["top1_match"]) * masked["eval_tokens"] <= ties < 0.5 * masked["eval_tokens"]
    assert csr["top1_match"] < 1.0
    assert [dense["setup"], masked["setup"], csr["setup"]] == ["Dense", "Masked 30%", "CSR 30%"]
    assert list(smol.history["setup"])[-3:] == ["Dense", "Masked 30%", "CSR 30%"]
    smol.apply(0.3, mode="csr")  # the fast backend: a bitmap, 1/8 byte per weight + 4 per nonzero
    fast = smol.measure()
    assert fast["size_mb"] < dense["size_mb"] < csr["size_mb"]
    ties = assert_same_function(masked_logits, corpus_logits(smol), smol.model)
    assert abs(masked["top1_match"] - fast["top1_match"]) * masked["eval_tokens"] <= ties


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_every_csr_layer_computes_its_masked_weight(smol, backend):
    """On the model's real activations, each CSR layer's output is within the fp bound of F.linear with the
    masked weight; a kernel that drops one weight or shifts one row is caught by the same check."""
    smol.apply(0.3, mode="csr", backend=backend)
    calls = _layer_calls(smol)
    assert len(calls) == len(smol.default_layers)
    for module, x, y in calls:
        assert_within_linear_bound(y, x, module.dense_weight(), module.bias)
    module, x, _ = calls[len(calls) // 2]
    weight = module.dense_weight()
    kept = weight.nonzero()
    row, column = kept[len(kept) // 2].tolist()  # an ordinary kept weight
    dropped = weight.clone()
    dropped[row, column] = 0
    with pytest.raises(AssertionError, match="beyond the fp error bound"):
        assert_within_linear_bound(F.linear(x, dropped, module.bias), x, weight, module.bias)
    with pytest.raises(AssertionError, match="beyond the fp error bound"):
        assert_within_linear_bound(module(x).roll(1, dims=-1), x, weight, module.bias)


def test_a_wrong_csr_layer_fails_the_whole_model_bound(smol):
    """The model-level bound is tight enough that one CSR layer with its rows shifted fails it."""
    smol.apply(0.3, mode="masked")
    masked_logits = corpus_logits(smol)
    smol.apply(0.3, mode="csr")
    module = getattr(smol.default_layers[-1].parent, smol.default_layers[-1].attr)
    handle = module.register_forward_hook(lambda _module, _args, output: output.roll(1, dims=-1))
    try:
        with pytest.raises(AssertionError, match="beyond the fp error bound"):
            assert_same_function(masked_logits, corpus_logits(smol), smol.model)
    finally:
        handle.remove()


def test_reset_is_bit_exact_and_restores_module_types(smol):
    before = state_checksum(smol.model)
    smol.apply(0.5, mode="csr")
    assert any(isinstance(m, CSRLinear) for m in smol.model.modules())
    smol.reset()
    assert not any(isinstance(m, CSRLinear) for m in smol.model.modules())
    assert state_checksum(smol.model) == before


def test_amount_can_go_down_and_modes_switch(smol):
    smol.apply(0.7, mode="masked")
    smol.apply(0.2, mode="csr")
    assert abs(smol.measure()["sparsity_prunable"] - 0.2) < 1e-6
    smol.apply(0.4, mode="masked")
    row = smol.measure()
    assert abs(row["sparsity_prunable"] - 0.4) < 1e-6 and row["executed_ratio"] == 1.0


def test_generate_after_csr(smol):
    smol.apply(0.3, mode="csr")
    prompt = smol.tokenizer("The capital of France is", return_tensors="pt")
    out = smol.model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5


def test_head_and_embeddings_untouched(smol):
    head = smol.model.lm_head.weight.detach().clone()
    smol.apply(0.5, mode="masked")
    assert torch.equal(smol.model.lm_head.weight, head)
    assert "lm_head" not in set(smol.layer_table()["name"])


def test_latency_is_measured_against_dense_in_the_same_run(smol):
    smol.apply(0.5, mode="csr")
    row = smol.measure(latency=True, repeats=1)
    for key in ("prefill_ms", "decode_ms", "dense_prefill_ms", "dense_decode_ms"):
        assert row[key] > 0
    assert abs(row["decode_speedup"] - row["dense_decode_ms"] / row["decode_ms"]) < 1e-9


def _layer_calls(session, tokens: int = 24) -> list[tuple[CSRLinear, torch.Tensor, torch.Tensor]]:
    """(layer, input, output) of every CSR layer on the first corpus batch (its first ``tokens`` positions)."""
    calls = []

    def record(module, args, output):
        calls.append(
            (
                module,
                args[0].reshape(-1, module.in_features)[:tokens].clone(),
                output.reshape(-1, module.out_features)[:tokens].clone(),
            )
        )

    handles = [m.register_forward_hook(record) for m in session.model.modules() if isinstance(m, CSRLinear)]
    try:
        with torch.inference_mode():
            session.model(**session._corpus.batches[0])
    finally:
        for handle in handles:
            handle.remove()
    return calls

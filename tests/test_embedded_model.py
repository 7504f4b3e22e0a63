"""The user's story on the real embedded SmolLM2-135M: Dense / Masked 30 % / CSR 30 %."""

from __future__ import annotations

import torch

from jupyter_sparsify.formats import CSRLinear

from conftest import state_checksum


def test_the_seed_table_tells_the_truth(smol):
    dense = smol.measure()
    smol.apply(0.3, mode="masked")
    masked = smol.measure()
    masked_logits = torch.cat([l.reshape(-1) for l in _logits(smol)])
    smol.apply(0.3, mode="csr", backend="torch")
    csr = smol.measure()
    csr_logits = torch.cat([l.reshape(-1) for l in _logits(smol)])

    assert dense["top1_match"] == 1.0 and dense["compute_ratio"] == 1.0
    assert masked["size_mb"] == dense["size_mb"]  # masking removes nothing
    assert csr["size_mb"] > dense["size_mb"]  # the truth the seed hid: int32 indices + values > dense at 30 %
    assert abs(masked["sparsity_prunable"] - 0.3) < 1e-6 and abs(csr["sparsity_prunable"] - 0.3) < 1e-6
    assert masked["compute_ratio"] == csr["compute_ratio"] < 0.8
    assert masked["executed_ratio"] == 1.0 and csr["executed_ratio"] < 0.8
    assert masked["top1_match"] == csr["top1_match"] < 1.0
    torch.testing.assert_close(csr_logits, masked_logits, rtol=1e-3, atol=1e-2)  # fp32 sums in another order, 30 layers deep
    assert [dense["setup"], masked["setup"], csr["setup"]] == ["Dense", "Masked 30%", "CSR 30%"]
    assert list(smol.history["setup"])[-3:] == ["Dense", "Masked 30%", "CSR 30%"]
    smol.apply(0.3, mode="csr")  # the fast backend: a bitmap, 1/8 byte per weight + 4 per nonzero
    fast = smol.measure()
    assert fast["size_mb"] < dense["size_mb"] < csr["size_mb"]
    assert fast["top1_match"] == masked["top1_match"]


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


def _logits(session):
    with torch.inference_mode():
        return [session.model(**batch).logits for batch in session._corpus.batches]

"""Texts: the shipped calibration corpus; batches with every text once, right-padded, little padding."""

from __future__ import annotations

import pytest
import torch

from jupyter_sparsify.corpus import SEED_TEXTS, calibration_documents, default_calibration_texts, padded_batches


def test_every_text_once_right_padded_and_no_batch_too_large(tokenizer):
    texts = [*SEED_TEXTS, "short", "x " * 40]
    batches = padded_batches(tokenizer, texts, max_length=32, max_batch=4)
    rows = []
    for ids, mask in batches:
        assert ids.shape == mask.shape and ids.shape[0] <= 4
        lengths = mask.sum(dim=1)
        assert lengths.max() == ids.shape[1], "a batch is as wide as its longest text, no wider"
        for row, length in zip(ids, lengths):
            assert torch.all(row[length:] == tokenizer.pad_token_id)
            rows.append(row[:length].tolist())
    expected = [ids[:32] for ids in tokenizer(texts)["input_ids"]]
    assert sorted(rows) == sorted(expected)


def test_less_padding_than_batches_in_text_order(tokenizer):
    texts = [text for pair in zip(SEED_TEXTS, [t + " " + t + " " + t for t in SEED_TEXTS]) for text in pair]
    order_padded = sum(
        len(texts[start : start + 8]) * max(len(ids) for ids in tokenizer(texts[start : start + 8])["input_ids"])
        for start in range(0, len(texts), 8)
    )
    padded = sum(ids.numel() for ids, _ in padded_batches(tokenizer, texts, max_length=128, max_batch=8))
    assert padded < order_padded


def test_empty_texts_are_dropped_and_max_batch_checked(tokenizer):
    assert padded_batches(tokenizer, [""], max_length=8, max_batch=2) == []
    with pytest.raises(ValueError, match="max_batch"):
        padded_batches(tokenizer, ["a"], max_length=8, max_batch=0)


def test_default_calibration_texts_are_shipped():
    texts = calibration_documents()
    assert len(texts) > 200
    assert default_calibration_texts() == texts[::2]
    joined = " ".join(texts).lower()
    assert sum(len(text.split()) for text in texts) > 15000
    for evaluation_topic in ("perplexity", "http 429", "thermal throttling", "sparsity"):
        assert evaluation_topic not in joined

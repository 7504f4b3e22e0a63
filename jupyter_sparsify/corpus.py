"""Texts: the shipped corpora (the course notebook's 15 evaluation texts, the calibration documents), their
validation, and their tokenization into right-padded batches of similar length."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

MAX_LENGTH = 128
BATCH_SIZE = 8

SEED_TEXTS: tuple[str, ...] = (
    "In a quiet valley, the river bends slowly around the last farm before the hills.",
    "Sparse pruning zeroes weights but needs a sparse kernel to speed up compute.",
    "A small batch size can distort latency because of cache and warmup effects.",
    "Causal LM perplexity is averaged per token over sliding blocks.",
    "Version 1.2.0 fixes: stability on CPU, deterministic seeds, better logging.",
    '"Hello?" — "Hi; can you hear me?" — "Loud and clear."',
    "HTTP 429 means rate limiting; use exponential backoff with jitter.",
    "Compute follows memory: fewer bytes moved often means fewer milliseconds.",
    "Numbers: 3.14159, 2.71828, 0.57721 show up in odd places.",
    "Keep the same corpus when comparing Dense vs Masked vs CSR.",
    "If latency jumps, check power limits, thermal throttling, governors.",
    "We log mean, median, and p95 latency because tails matter.",
    "One batch isn’t enough: run multiple iterations with warmup.",
    "Tiny masking mistakes can create NaNs; clamp logits if needed.",
    "When in doubt, profile with both synthetic and real inputs.",
)


def validate_texts(texts: object) -> list[str]:
    """A non-empty list of non-empty strings (blank entries dropped)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string; wrap it in a list or split it into lines")
    try:
        cleaned = [text.strip() for text in texts if text.strip()]  # type: ignore[union-attr]
    except (TypeError, AttributeError):
        raise TypeError(f"texts must be a list of strings; got {type(texts).__name__}") from None
    if not cleaned:
        raise ValueError("texts is empty: give at least one non-blank evaluation text")
    for number, text in enumerate(cleaned, start=1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"text {number} is not valid Unicode ({error.reason} at character {error.start}): remove that "
                "character (a lone surrogate often comes from a badly decoded file)"
            ) from None
    return cleaned


def check_next_token_targets(tokenizer, texts: list[str]) -> None:
    """Refuse texts of fewer than two tokens: they give no next token to predict, so nothing to measure."""
    for number, (text, ids) in enumerate(zip(texts, tokenizer(texts)["input_ids"]), start=1):
        if len(ids) < 2:
            raise ValueError(
                f"text {number} ({text[:40]!r}) is a single token, which leaves no next token to predict: "
                "give texts of at least two tokens (a sentence or more)"
            )


def calibration_documents() -> list[str]:
    """The calibration corpus shipped with the package: one document per paragraph.

    205 original documents written for this package (history, science, cooking, travel,
    instructions, dialogue, news, fiction, Q&A, and Python/JS/SQL/shell snippets), about 24k
    tokens with the SmolLM2 tokenizer; none is longer than 256 tokens. Its topics avoid those of
    the default evaluation texts.
    """
    text = resources.files("jupyter_sparsify").joinpath("data/calibration.txt").read_text("utf-8")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def default_calibration_texts() -> list[str]:
    """What a session calibrates on unless given other texts: every other shipped document (103, about 12k tokens).

    Enough for the Hessian of the embedded model's widest input (1 536) eight times over, and a calibrate-once
    pass of about 22-25 s on a 2-core CPU, where all 205 documents take about 42 s. What the other half would add,
    measured on held-out text, is in ``docs/benchmarks.md``; ``Session.set_calibration_texts(calibration_documents())``
    takes them all.
    """
    return calibration_documents()[::2]


@dataclass(frozen=True)
class EncodedCorpus:
    """Token ids and attention masks of the corpus, in padded batches."""

    batches: tuple[dict[str, torch.Tensor], ...]

    @property
    def token_count(self) -> int:
        return int(sum(batch["attention_mask"].sum() for batch in self.batches))


def encode_corpus(
    tokenizer, texts: list[str], *, max_length: int = MAX_LENGTH, batch_size: int = BATCH_SIZE
) -> EncodedCorpus:
    """Tokenize ``texts`` into right-padded batches of similar length (the mask keeps padding out of every metric)."""
    batches = padded_batches(tokenizer, texts, max_length=max_length, max_batch=batch_size)
    return EncodedCorpus(tuple({"input_ids": ids, "attention_mask": mask} for ids, mask in batches))


Batch = tuple[Tensor, Tensor]  # input_ids [batch, seq], attention_mask [batch, seq]

# A forward pass costs about as much in fixed overhead (reading every weight once, Python) as this
# many extra padded positions on the embedded model (~55 ms vs ~1.6 ms per position, 2 threads).
BATCH_OVERHEAD_TOKENS = 40


def padded_batches(tokenizer, texts: list[str], *, max_length: int, max_batch: int) -> list[Batch]:
    """Tokenize ``texts`` (each truncated to ``max_length`` tokens, empty ones dropped) into batches.

    Texts are sorted by length and split where the padded positions plus a fixed cost per batch
    are fewest (at most ``max_batch`` texts per batch); padding sits on the right, mask 0.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1; got {max_batch}")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    encoded = sorted((ids for ids in encoded if ids), key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start, stop in _cheapest_split([len(ids) for ids in encoded], max_batch):
        chunk = encoded[start:stop]
        width = len(chunk[-1])
        ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in chunk])
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in chunk])
        batches.append((ids, mask))
    return batches


def _cheapest_split(lengths: list[int], max_batch: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges over ascending ``lengths`` minimizing Σ (count · longest + overhead)."""
    best = [0.0] + [float("inf")] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for stop in range(1, len(lengths) + 1):
        for start in range(max(0, stop - max_batch), stop):
            cost = best[start] + (stop - start) * lengths[stop - 1] + BATCH_OVERHEAD_TOKENS
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    ranges, stop = [], len(lengths)
    while stop:
        ranges.append((cut[stop], stop))
        stop = cut[stop]
    return ranges[::-1]

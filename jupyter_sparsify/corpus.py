"""The default evaluation corpus: the course notebook's 15 texts."""

from __future__ import annotations

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
    for number, text in enumerate(texts, start=1):
        if len(tokenizer(text)["input_ids"]) < 2:
            raise ValueError(
                f"text {number} ({text[:40]!r}) is a single token, which leaves no next token to predict: "
                "give texts of at least two tokens (a sentence or more)"
            )

"""Wall-clock latency of prefill and decode, for a variant and dense measured in the same run."""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .corpus import EncodedCorpus
from .models import model_device

DECODE_TOKENS = 16


@dataclass(frozen=True)
class Latency:
    """Median milliseconds: one forward over the corpus (prefill) and one generated token (decode)."""

    prefill_ms: float
    decode_ms: float


@torch.inference_mode()
def prefill_seconds(model: nn.Module, corpus: EncodedCorpus) -> float:
    """Seconds for one forward pass over every batch of the corpus."""
    device = model_device(model)
    _synchronize(device)
    start = time.perf_counter()
    for batch in corpus.batches:
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    _synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_seconds_per_token(model: nn.Module, prompt: torch.Tensor, new_tokens: int = DECODE_TOKENS) -> float:
    """Seconds per generated token with the KV cache (greedy), prompt processing subtracted."""
    from transformers import GenerationConfig

    def generate(count: int) -> float:
        config = GenerationConfig(
            max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        _synchronize(prompt.device)
        start = time.perf_counter()
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        _synchronize(prompt.device)
        return time.perf_counter() - start

    return max(0.0, generate(new_tokens + 1) - generate(1)) / new_tokens


def measure_against_dense(
    model: nn.Module,
    dense_view: Callable[[], AbstractContextManager],
    corpus: EncodedCorpus,
    *,
    repeats: int = 5,
    new_tokens: int = DECODE_TOKENS,
) -> tuple[Latency, Latency]:
    """(variant, dense) latencies, alternating the two so that machine noise hits both alike.

    ``dense_view()`` is a context manager under which the model runs as the dense original.
    One warm-up of each comes first; each figure is the median of ``repeats``.
    """
    device = model_device(model)
    prompt = corpus.batches[0]["input_ids"][:1].to(device)
    prompt = prompt[:, : int(corpus.batches[0]["attention_mask"][0].sum())]
    timings: dict[str, list[tuple[float, float]]] = {"variant": [], "dense": []}

    def once() -> tuple[float, float]:
        return prefill_seconds(model, corpus), decode_seconds_per_token(model, prompt, new_tokens)

    for round_index in range(repeats + 1):
        variant = once()
        with dense_view():
            dense = once()
        if round_index:  # the first round is the warm-up
            timings["variant"].append(variant)
            timings["dense"].append(dense)
    return _median(timings["variant"]), _median(timings["dense"])


def _median(samples: list[tuple[float, float]]) -> Latency:
    return Latency(
        prefill_ms=1000 * statistics.median(s[0] for s in samples),
        decode_ms=1000 * statistics.median(s[1] for s in samples),
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: the clock must not stop at the launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

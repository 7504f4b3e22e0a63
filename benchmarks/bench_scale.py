"""Pruning at scale: a global magnitude apply on a ~1B-parameter Llama (random weights, bf16).

Prints the apply time and the peak resident memory above the model's own size, for the
session (dense reference + undo snapshot) and for the apply itself.

    .venv/bin/python benchmarks/bench_scale.py [--layers 22] [--amount 0.5]
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from jupyter_sparsify.metrics import storage_bytes
from jupyter_sparsify.models import load_model
from jupyter_sparsify.progress import silent
from jupyter_sparsify.session import Session

GIB = 2**30


class PeakRSS:
    """Samples this process's resident memory every 5 ms while active."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)


def build_model(layers: int) -> torch.nn.Module:
    """A TinyLlama-1.1B-shaped model (hidden 2048, MLP 5632) with random bf16 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--amount", type=float, default=0.5)
    args = parser.parse_args()
    _, tokenizer = load_model()  # only its tokenizer: the vocabulary matches the config
    model = build_model(args.layers)
    model_bytes = storage_bytes(model)
    rss = psutil.Process().memory_info().rss
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{model_bytes / GIB:.2f} GiB (bf16); process RSS {rss / GIB:.2f} GiB; torch threads {torch.get_num_threads()}"
    )
    with PeakRSS() as peak:
        start = time.perf_counter()
        session = Session(model, tokenizer)
        session_s = time.perf_counter() - start
    print(
        f"Session (dense reference + undo snapshot {session.undo_bytes / GIB:.2f} GiB): {session_s:.1f} s, "
        f"peak RSS +{(peak.peak - rss) / GIB:.2f} GiB over the model"
    )
    rss_after_session = psutil.Process().memory_info().rss
    for label in ("first", "second"):
        with PeakRSS() as peak:
            start = time.perf_counter()
            session.apply(args.amount, mode="masked", scope="global", progress=silent)
            apply_s = time.perf_counter() - start
        print(
            f"global magnitude apply {args.amount:.0%} ({label}): {apply_s:.1f} s, peak RSS "
            f"+{(peak.peak - rss_after_session) / GIB:.2f} GiB over model + session"
        )
    row = session.measure()
    print(f"after apply: sparsity of prunable weights {row['sparsity_prunable']:.4f}, size {row['size_mb']:.0f} MiB")


if __name__ == "__main__":
    main()

"""Pruning at scale: a ~1B-parameter Llama built in memory, or a 7B-class one loaded from disk (random bf16 weights).

1B (default): the apply time and the peak resident memory above the model's own size, for the session (dense
reference + undo copy: the model was built in memory, so there is no checkpoint to read back from) and the apply.

7B (``--7b``): a Llama-2-7B-shaped model written once as a safetensors folder in the cache (~13.8 GB; skipped
with a message when the disk lacks room), loaded as a user would, then session creation, global magnitude 50 %,
measure, reset, Wanda row 50 % (calibrate once on a short calibration set), measure, reset: wall time and peak
RSS of each, against the model's size. Undo reads the dense original back from the folder.

    .venv/bin/python benchmarks/bench_scale.py [--layers 22] [--amount 0.5]
    .venv/bin/python benchmarks/bench_scale.py --7b
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import torch

from jupyter_sparsify.corpus import SEED_TEXTS, calibration_documents
from jupyter_sparsify.memory import release_freed_memory
from jupyter_sparsify.metrics import storage_bytes
from jupyter_sparsify.models import cache_dir, load_model
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


SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
SHARD_BYTES = 2 * GIB


def write_7b(folder: Path, tokenizer) -> float:
    """Write the 7B-class model's config, tokenizer and random bf16 weights (N(0, 0.02), norms 1) shard by shard,
    never holding more than one shard in memory; returns the seconds it took."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.perf_counter()
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, dtype="bfloat16", **SEVEN_B)
    with init_empty_weights():
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator, shard, index, total = torch.Generator().manual_seed(0), {}, {}, 0

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(staging / name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        shard[name] = tensor
        total += tensor.numel() * 2
        if sum(t.numel() * 2 for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return time.perf_counter() - start


def step(label: str, action, model_bytes: int) -> object:
    """Run ``action`` and print its wall time and the process's peak RSS during it, against the model's size."""
    gc.collect()
    release_freed_memory()
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - start
    print(
        f"{label}: {seconds:.1f} s, peak RSS {peak.peak / GIB:.2f} GiB = {peak.peak / model_bytes:.2f}x the model",
        flush=True,
    )
    return result


def run_7b() -> None:
    _, tokenizer = load_model()  # the embedded model's tokenizer: its vocabulary sizes the model
    folder = cache_dir() / "bench" / "llama-7b-shaped-random-bf16"
    if not (folder / "model.safetensors.index.json").is_file():
        free = shutil.disk_usage(cache_dir().parent if not cache_dir().exists() else cache_dir()).free
        if free < 15 * GIB:
            print(
                f"skipped: writing the 7B-class model needs ~14 GB on disk, {free / GIB:.1f} GiB free in {cache_dir()}"
            )
            return
        print(f"wrote {folder} in {write_7b(folder, tokenizer):.0f} s", flush=True)
    del tokenizer
    gc.collect()
    weights = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    print(f"model: {weights / GIB:.2f} GiB of bf16 weights; torch threads {torch.get_num_threads()}", flush=True)
    model, tokenizer = step("load_model", lambda: load_model(folder, dtype="bfloat16"), weights)
    texts, calibration = SEED_TEXTS[:4], calibration_documents()[:4]
    session = step("Session (dense reference on 4 texts)", lambda: Session(model, tokenizer, texts=texts), weights)
    print(f"undo: {session.undo_bytes.ram / GIB:.2f} GiB in RAM, {session.undo_bytes.disk / GIB:.2f} GiB from files")
    session.set_calibration_texts(calibration)
    for label, options in (
        ("global magnitude 50 %", dict(amount=0.5, scope="global")),
        ("Wanda row 50 % (calibrates once, 4 texts)", dict(amount=0.5, criterion="wanda")),
    ):
        step(label, lambda: session.apply(progress=silent, **options), weights)
        row = step("measure", session.measure, weights)
        print(f"  top-1 {row['top1_match']:.3f}, sparsity of prunable weights {row['sparsity_prunable']:.4f}")
        step("reset", session.reset, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--7b", dest="seven_b", action="store_true", help="the 7B-class run (see above)")
    args = parser.parse_args()
    if args.seven_b:
        run_7b()
        return
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
        f"Session (dense reference + undo copy {session.undo_bytes.ram / GIB:.2f} GiB): {session_s:.1f} s, "
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

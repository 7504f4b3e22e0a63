"""Whole-model speed on the embedded SmolLM2-135M: load, apply, panel update, and CSR vs dense latency.

Every latency is measured against dense in the same run (alternating, median of repeats),
and reported as a ratio; absolute milliseconds depend on the machine and its load.

    .venv/bin/python benchmarks/bench_model.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from jupyter_sparsify.models import load_model
from jupyter_sparsify.progress import silent
from jupyter_sparsify.session import Session


def median_seconds(action, repeats: int) -> float:
    """Median wall time of ``action()`` over ``repeats`` runs (after one warm-up run)."""
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer settings and repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    load_model()  # make sure the converted cache exists: what follows is a warm load
    warm_load = median_seconds(load_model, 3)
    model, tokenizer = load_model()
    session = Session(model, tokenizer)
    apply_s = median_seconds(lambda: session.apply(0.5, mode="masked", progress=silent), repeats)

    def panel_update() -> None:
        session.apply(0.5, mode="masked", progress=silent)
        session.measure()

    update_s = median_seconds(panel_update, repeats)
    print(
        pd.DataFrame(
            [
                {"what": "warm load of the embedded model", "seconds": warm_load, "target": "<= 3 s"},
                {"what": "global magnitude apply, 50 %", "seconds": apply_s, "target": "<= 1 s"},
                {"what": "panel update (apply 50 % + top-1 on the corpus)", "seconds": update_s, "target": "<= 2 s"},
            ]
        ).to_string(index=False, float_format=lambda v: f"{v:.2f}")
    )

    settings = (
        [(0.5, "fast"), (0.7, "fast")] if args.quick else [(0.3, "fast"), (0.5, "fast"), (0.7, "fast"), (0.5, "torch")]
    )
    rows = []
    for amount, backend in settings:
        session.apply(amount, mode="csr", backend=backend, progress=silent)
        row = session.measure(latency=True, repeats=repeats)
        rows.append(
            {
                "setup": f"CSR {amount:.0%} ({backend})",
                "size_mb": row["size_mb"],
                "dense decode ms/token": row["dense_decode_ms"],
                "decode ms/token": row["decode_ms"],
                "decode speedup": row["decode_speedup"],
                "dense prefill ms": row["dense_prefill_ms"],
                "prefill ms": row["prefill_ms"],
                "prefill speedup": row["prefill_speedup"],
                "compute_ratio": row["compute_ratio"],
            }
        )
    session.reset()
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()

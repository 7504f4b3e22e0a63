"""Layer benchmark: the sparse CSR kernel and torch's CSR matmul against dense ``F.linear``.

Shapes are the embedded SmolLM2-135M's linear layers (out x in) plus 3072x768. All methods
are timed in the same run, taking turns call by call in a new random order each round, with
torch's default thread settings (printed; ``--threads`` overrides them). Two cache regimes:

* ``stream``: each call uses another copy of the weights (a working set of ``--stream-mb``),
  as when decoding a model whose weights do not fit in cache;
* ``hot``: one weight reused, so it stays in the cores' L2 cache (the best case for dense).

Times are medians of per-call samples after warm-up. On a shared machine another process
taking a core stalls torch's thread pool for milliseconds; samples slower than
``--stall-factor`` x their method's 10th percentile are counted as stalled and left out of
the median (the ``stalled`` columns say how many; rerun when they are high).

Run: ``.venv/bin/python benchmarks/bench_layers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from jupyter_sparsify import kernels

MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
EXTRA_SHAPES = [(3072, 768)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def robust_median(samples: list[float], stall_factor: float) -> tuple[float, float]:
    """Median of the samples that were not stalled, and the stalled fraction."""
    ordered = sorted(samples)
    limit = ordered[len(ordered) // 10] * stall_factor
    kept = [s for s in ordered if s <= limit]
    return statistics.median(kept), 1 - len(kept) / len(ordered)


def time_calls(
    fns: dict[str, Callable[[int], object]], copies: int, calls: int, stall_factor: float, warmup: int = 5
) -> dict[str, tuple[float, float]]:
    """(median seconds, stalled fraction) per function; call number n uses copy n % copies.

    An untimed pass first calls every function on every copy, so that no method starts with
    its copies still in cache because they were created last. Each round the functions take
    turns in a new (seeded) random order: a call measures slower right after some others (the
    same kernel build ran 3-8 % slower in the slot that mostly followed dense ``F.linear``).
    """
    names = list(fns)
    for n in range(max(warmup, copies)):
        for name in names:
            fns[name](n % copies)
    rng = random.Random(0)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for n in range(calls):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name](n % copies)
            samples[name].append(time.perf_counter() - start)
    return {name: robust_median(times, stall_factor) for name, times in samples.items()}


def bench_case(
    out_f: int, in_f: int, sparsity: float, tokens: list[int], dtype: torch.dtype, regime: str, args: argparse.Namespace
) -> list[dict]:
    """Time dense, our kernel and torch CSR for one weight at several token counts."""
    gen = torch.Generator().manual_seed(out_f * 7919 + in_f)
    weight = torch.randn(out_f, in_f, generator=gen)
    weight = (weight * (torch.rand(out_f, in_f, generator=gen) >= sparsity)).to(dtype)
    values, cols, row_ptr = kernels.compress(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = weight.to_sparse_csr()
    dense_bytes = weight.numel() * weight.element_size()
    copies = max(1, int(args.stream_mb * 2**20 / dense_bytes)) if regime == "stream" else 1
    dense_w = [weight.clone() for _ in range(copies)]
    sparse_w = [(values.clone(), cols.clone(), row_ptr.clone()) for _ in range(copies)]
    csr_w = [csr.clone() for _ in range(copies)]
    rows = []
    for t in tokens:
        x = torch.randn(t, in_f, generator=gen).to(dtype)
        fns = {
            "dense": lambda i: F.linear(x, dense_w[i]),
            "ours": lambda i: kernels.sparse_linear(x, *sparse_w[i], None, out_f, in_f),
            "csr": lambda i: torch.sparse.mm(csr_w[i], x.t()).t(),
        }
        try:
            fns["csr"](0)
        except RuntimeError:  # torch's CSR matmul lacks this dtype on CPU
            del fns["csr"]
        times = time_calls(fns, copies, max(args.repeats, min(copies, 4 * args.repeats)), args.stall_factor)
        (dense, dense_stalled), (mine, mine_stalled) = times["dense"], times["ours"]
        theirs = times.get("csr", (math.nan, math.nan))[0]
        rows.append(
            {
                "regime": regime,
                "dtype": str(dtype).replace("torch.", ""),
                "shape": f"{out_f}x{in_f}",
                "model_shape": (out_f, in_f) in MODEL_SHAPES,
                "tokens": t,
                "sparsity": sparsity,
                "dense_us": dense * 1e6,
                "ours_us": mine * 1e6,
                "csr_us": theirs * 1e6,
                "ours_x": dense / mine,
                "csr_x": dense / theirs,
                "stalled_dense": dense_stalled,
                "stalled_ours": mine_stalled,
            }
        )
    return rows


def dense_interference(args: argparse.Namespace) -> tuple[pd.DataFrame, float]:
    """Dense F.linear before the kernel is loaded, after loading and running it, and when
    every dense call directly follows a sparse one; also returns the kernel's load time."""
    cases = [(576, 1536, 1), (1536, 576, 1), (576, 576, 16), (576, 576, 128)]
    inputs = [(torch.randn(o, i), torch.randn(t, i)) for o, i, t in cases]

    def dense_times() -> list[float]:
        fns = {str(n): (lambda _, w=w, x=x: F.linear(x, w)) for n, (w, x) in enumerate(inputs)}
        return [t * 1e6 for t, _ in time_calls(fns, 1, args.repeats, args.stall_factor).values()]

    before = dense_times()
    start = time.perf_counter()
    kernels.ensure_compiled()
    load_s = time.perf_counter() - start
    interleaved = []
    for w, x in inputs:
        csr = kernels.compress(w * (torch.rand_like(w) > 0.5))
        samples = []
        for _ in range(args.repeats):
            kernels.sparse_linear(x, *csr, None, w.shape[0], w.shape[1])
            start = time.perf_counter()
            F.linear(x, w)
            samples.append(time.perf_counter() - start)
        interleaved.append(robust_median(samples, args.stall_factor)[0] * 1e6)
    after = dense_times()
    table = pd.DataFrame(
        {
            "case": [f"{o}x{i} T={t}" for o, i, t in cases],
            "before_load_us": before,
            "after_load_us": after,
            "right_after_sparse_us": interleaved,
        }
    )
    table["after/before"] = table.after_load_us / table.before_load_us
    return table, load_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, sparsities and shapes; fp32 only")
    parser.add_argument("--regimes", default="stream,hot", help="comma list of stream,hot")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16 (values and x)")
    parser.add_argument("--stream-mb", type=float, default=256.0, help="weights working set for 'stream'")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per method (at least)")
    parser.add_argument("--stall-factor", type=float, default=3.0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, sparsities, shapes = [1, 16, 128], [0.3, 0.5, 0.7, 0.9], MODEL_SHAPES + EXTRA_SHAPES
    if args.quick:
        args.repeats, args.stream_mb, args.dtypes, sparsities, shapes = 60, 64.0, "fp32", [0.5, 0.7], MODEL_SHAPES

    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op threads; {torch.backends.cpu.get_cpu_capability()}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    interference, load_s = dense_interference(args)
    print(f"sparse kernel compiled or loaded from the disk cache in {load_s:.2f} s")
    rows = []
    for regime in args.regimes.split(","):
        for dtype in (DTYPES[d] for d in args.dtypes.split(",")):
            for out_f, in_f in shapes:
                print(f"  {regime} {dtype} {out_f}x{in_f} ...", file=sys.stderr, flush=True)
                for sparsity in sparsities:
                    rows += bench_case(out_f, in_f, sparsity, tokens, dtype, regime, args)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200, "display.max_rows", 1000, "display.precision", 2)
    print(table.drop(columns="model_shape").to_string(index=False))
    model = table[table.model_shape]
    geo = (
        model.groupby(["regime", "dtype", "tokens", "sparsity"])[["ours_x", "csr_x"]]
        .agg(lambda s: math.exp(s.map(math.log).mean()))
        .unstack("sparsity")
    )
    print("\nGeometric mean speedup vs dense F.linear over the model's 4 shapes:")
    print(geo.to_string())
    print("\nDense F.linear before vs after loading and running the sparse kernel:")
    print(interference.to_string(index=False))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()

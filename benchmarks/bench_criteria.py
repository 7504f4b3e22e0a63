"""Which criterion keeps the model's behaviour: top-1 agreement and perplexity on the evaluation corpus.

Runs on the embedded SmolLM2-135M: magnitude (global, the course notebook's method, and per row),
Wanda (per row), SparseGPT and ADMM (per row, and per layer), and ADMM per row with block
reconstruction, at 30 / 50 / 70 % and 2:4, in one run, with the time each apply took (Wanda,
SparseGPT and ADMM calibrate block by block at every apply). With a pattern the scope does not
matter, so SparseGPT's and ADMM's 2:4 run once each.

    .venv/bin/python benchmarks/bench_criteria.py [--amounts 0.3 0.5 0.7] [--no-nm] [--methods sparsegpt:row]

A method ``admm+recon:row`` adds block reconstruction (``reconstruct=True``) to the criterion.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from jupyter_sparsify.models import load_model
from jupyter_sparsify.progress import silent
from jupyter_sparsify.session import Session

METHODS = (
    ("magnitude", "global"), ("magnitude", "row"), ("wanda", "row"), ("sparsegpt", "row"), ("sparsegpt", "layer"),
    ("admm", "row"), ("admm", "layer"), ("admm+recon", "row"),
)
SAME_UNDER_PATTERN = {("sparsegpt", "layer"), ("admm", "layer")}  # a pattern fixes every row's count: same as row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--no-nm", action="store_true", help="skip the 2:4 pattern")
    parser.add_argument("--methods", nargs="+", default=[f"{c}:{s}" for c, s in METHODS],
                        help="criterion:scope pairs to run (default: all); criterion+recon adds block reconstruction")
    args = parser.parse_args()
    methods = [tuple(method.split(":")) for method in args.methods]
    model, tokenizer = load_model()
    session = Session(model, tokenizer)
    print(f"calibration: {len(session.calibration_texts)} texts; evaluation: {len(session.texts)} texts, "
          f"{session.measure()['eval_tokens']} tokens")
    levels = [(amount, None) for amount in args.amounts] + ([] if args.no_nm else [(None, "2:4")])
    rows = []
    for method, scope in methods:
        criterion, _, extra = method.partition("+")
        for amount, pattern in levels:
            if pattern and (criterion, scope) in SAME_UNDER_PATTERN:
                continue
            start = time.perf_counter()
            session.apply(amount, mode="masked", criterion=criterion, scope=scope, pattern=pattern,
                          reconstruct=extra == "recon", progress=silent)
            seconds = time.perf_counter() - start
            row = session.measure()
            rows.append({"criterion": method, "scope": scope if not pattern else "",
                         "level": pattern or f"{amount:.0%}", "top1_match": row["top1_match"],
                         "perplexity": row["perplexity"], "apply_s": seconds})
            print(rows[-1], flush=True)
    session.reset()
    dense = session.measure()
    table = pd.DataFrame(rows)
    print(f"\ndense perplexity {dense['perplexity']:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

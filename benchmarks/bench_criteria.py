"""Which criterion keeps the model's behaviour: top-1 agreement and perplexity on the evaluation corpus.

Runs on the embedded SmolLM2-135M: magnitude (global, the course notebook's method, and per row),
Wanda, SparseGPT and ADMM per row with both calibrations (``once``: dense statistics collected at the
first apply and reused; ``sequential``: block by block at every apply, as in the papers), SparseGPT and
ADMM per layer, and ADMM per row with block reconstruction, at 30 / 50 / 70 % and 2:4, in one run. Each
row gives the apply's time and the panel update's (apply + measure). For the ``once`` path the one-off
calibration is timed separately: the first apply that needs a statistic runs twice, and the
difference is reported as ``calibrate_s``. With a pattern the scope does not matter, so SparseGPT's
and ADMM's 2:4 run once per calibration.

    .venv/bin/python benchmarks/bench_criteria.py [--amounts 0.3 0.5 0.7] [--no-nm] [--methods wanda:row:once]

A method is ``criterion[+recon]:scope[:once|sequential]``; ``admm+recon:row`` adds block reconstruction
(``reconstruct=True``, always sequential). ``--held-out``: calibrate on two thirds of the shipped documents and
evaluate on the other third (about 8 000 tokens, a steadier yardstick than the 246 of the default corpus).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from jupyter_sparsify.corpus import default_calibration_texts
from jupyter_sparsify.models import load_model
from jupyter_sparsify.progress import silent
from jupyter_sparsify.session import Session

METHODS = (
    "magnitude:global",
    "magnitude:row",
    "wanda:row:once",
    "wanda:row:sequential",
    "sparsegpt:row:once",
    "sparsegpt:row:sequential",
    "sparsegpt:layer:once",
    "admm:row:once",
    "admm:row:sequential",
    "admm:layer:once",
    "admm+recon:row",
)
SAME_UNDER_PATTERN = {("sparsegpt", "layer"), ("admm", "layer")}  # a pattern fixes every row's count: same as row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--no-nm", action="store_true", help="skip the 2:4 pattern")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="criterion[+recon]:scope[:once|sequential] to run (default: all)",
    )
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="calibrate on two thirds of the shipped documents and evaluate on the other third (~8 000 tokens)",
    )
    args = parser.parse_args()
    methods = [(method.split(":") + [None])[:3] for method in args.methods]
    model, tokenizer = load_model()
    session = Session(model, tokenizer)
    if args.held_out:
        documents = default_calibration_texts()
        session.set_calibration_texts([text for index, text in enumerate(documents) if index % 3])
        session.set_texts(documents[::3])
    print(
        f"calibration: {len(session.calibration_texts)} texts; evaluation: {len(session.texts)} texts, "
        f"{session.measure()['eval_tokens']} tokens"
    )
    levels = [(amount, None) for amount in args.amounts] + ([] if args.no_nm else [(None, "2:4")])
    rows, calibrated = [], set()
    for method, scope, calibration in methods:
        criterion, _, extra = method.partition("+")
        for amount, pattern in levels:
            if pattern and (criterion, scope) in SAME_UNDER_PATTERN:
                continue
            settings = dict(
                mode="masked",
                criterion=criterion,
                scope=scope,
                pattern=pattern,
                reconstruct=extra == "recon",
                calibration=calibration,
                progress=silent,
            )
            statistic = {"wanda": "norms", "sparsegpt": "hessians", "admm": "hessians"}.get(criterion)
            apply = lambda: session.apply(amount, **settings)  # noqa: E731
            calibrate_s = float("nan")
            if calibration == "once" and statistic not in calibrated:  # the one-off pass, timed on its own
                first, apply_s = _timed(apply), _timed(apply)
                calibrate_s = first - apply_s
                calibrated.add(statistic)
            else:
                apply_s = _timed(apply)
            start = time.perf_counter()
            row = session.measure()
            measure_s = time.perf_counter() - start
            rows.append(
                {
                    "criterion": method,
                    "scope": scope if not pattern else "",
                    "calibration": calibration or "",
                    "level": pattern or f"{amount:.0%}",
                    "top1_match": row["top1_match"],
                    "perplexity": row["perplexity"],
                    "calibrate_s": calibrate_s,
                    "apply_s": apply_s,
                    "panel_update_s": apply_s + measure_s,
                }
            )
            print(rows[-1], flush=True)
    session.reset()
    dense = session.measure()
    table = pd.DataFrame(rows)
    print(f"\ndense perplexity {dense['perplexity']:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

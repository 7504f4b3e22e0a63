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

``--against REV`` times the per-layer solvers instead: the calibrate-once pass (the Hessians), then SparseGPT and
ADMM row applies at 50 % and 2:4, each with this checkout's ``input_stats`` / ``sparsegpt`` / ``admm`` and with
those of git revision ``REV``, alternating in one process (``--repeats`` rounds), so that a busy machine slows
both alike; it prints both times, their ratio, and each apply's top-1 / perplexity.

    .venv/bin/python benchmarks/bench_criteria.py --against HEAD [--repeats 2] [--held-out]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd

from jupyter_sparsify import calibration as calibrating
from jupyter_sparsify import criteria
from jupyter_sparsify.corpus import calibration_documents
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
    parser.add_argument(
        "--calibration-every",
        type=int,
        default=1,
        metavar="K",
        help="calibrate on every K-th of the calibration documents (default 1: all)",
    )
    parser.add_argument("--against", metavar="REV", help="time the solvers against those of git revision REV")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of --against (default 1)")
    args = parser.parse_args()
    methods = [(method.split(":") + [None])[:3] for method in args.methods]
    model, tokenizer = load_model()
    session = Session(model, tokenizer)
    if args.held_out:
        documents = calibration_documents()
        session.set_calibration_texts([text for index, text in enumerate(documents) if index % 3])
        session.set_texts(documents[::3])
    session.set_calibration_texts(session.calibration_texts[:: args.calibration_every])
    print(
        f"calibration: {len(session.calibration_texts)} texts; evaluation: {len(session.texts)} texts, "
        f"{session.measure()['eval_tokens']} tokens"
    )
    if args.against:
        solver_timing(session, args.against, args.repeats)
        return
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


def solver_timing(session: Session, revision: str, repeats: int) -> None:
    """Calibrate-once pass and SparseGPT / ADMM row applies, this checkout's solvers against ``revision``'s."""
    old = _solvers_at(revision)
    implementations = {
        "this checkout": (calibrating.HessianAccumulator, dict(criteria._FROM_HESSIANS)),
        revision: (
            old["input_stats"].HessianAccumulator,
            {"sparsegpt": old["sparsegpt"].sparsegpt_prune, "admm": old["admm"].admm_prune},
        ),
    }
    applies = [("sparsegpt", None), ("sparsegpt", "2:4"), ("admm", None), ("admm", "2:4")]
    times: dict[tuple[str, str], list[float]] = {}
    quality: dict[tuple[str, str], str] = {}
    try:
        for repeat in range(repeats):
            labels = list(implementations)[:: 1 if repeat % 2 == 0 else -1]  # alternate which goes first
            for label in labels:
                calibrating.HessianAccumulator, solvers = implementations[label]
                criteria._FROM_HESSIANS.update(solvers)
                session.set_calibration_texts(session.calibration_texts)  # drops the cached Hessians
                first = _timed(lambda: session.apply(0.5, mode="masked", criterion="sparsegpt", progress=silent))
                for criterion, pattern in applies:
                    what = f"{criterion} row {pattern or '50%'} apply"
                    settings = dict(mode="masked", criterion=criterion, pattern=pattern, progress=silent)
                    times.setdefault((what, label), []).append(_timed(lambda: session.apply(0.5, **settings)))
                    row = session.measure()
                    quality[(what, label)] = f"{row['top1_match']:.4f} / {row['perplexity']:.2f}"
                calibrate = first - times[("sparsegpt row 50% apply", label)][-1]
                times.setdefault(("calibration once (Hessians)", label), []).append(calibrate)
                done = [f"{what} {seconds[-1]:.1f} s" for (what, which), seconds in times.items() if which == label]
                print(f"round {repeat + 1}, {label}: " + ", ".join(done), flush=True)
    finally:
        calibrating.HessianAccumulator, solvers = implementations["this checkout"]
        criteria._FROM_HESSIANS.update(solvers)
    rows = []
    for what in dict.fromkeys(what for what, _ in times):
        new, old_s = min(times[(what, "this checkout")]), min(times[(what, revision)])
        rows.append(
            {
                "what": what,
                "this checkout s": new,
                f"{revision} s": old_s,
                "speed-up": old_s / new,
                "top-1 / ppl (this checkout)": quality.get((what, "this checkout"), ""),
                f"top-1 / ppl ({revision})": quality.get((what, revision), ""),
            }
        )
    print(f"\nbest of {repeats} round(s) each, alternating in one process")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


def _solvers_at(revision: str) -> dict[str, types.ModuleType]:
    """``input_stats``, ``sparsegpt`` and ``admm`` as they are at git ``revision``, imported beside this checkout's
    (as ``jupyter_sparsify.baseline_*``, each one's imports of the others redirected to the baseline's)."""
    root, modules = Path(__file__).resolve().parent.parent, {}
    for name in ("input_stats", "sparsegpt", "admm"):
        path = f"jupyter_sparsify/{name}.py"
        show = ["git", "show", f"{revision}:{path}"]
        source = subprocess.run(show, cwd=root, capture_output=True, text=True, check=True).stdout
        for other in modules:
            source = source.replace(f"from .{other} import", f"from .baseline_{other} import")
        module = types.ModuleType(f"jupyter_sparsify.baseline_{name}")
        module.__package__ = "jupyter_sparsify"
        sys.modules[module.__name__] = module
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
        modules[name] = module
    return modules


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

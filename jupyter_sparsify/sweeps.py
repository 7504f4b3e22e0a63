"""Sweeps: many variants measured in one call, from Python, the magics or the panel. The model is left as it was.

* :func:`compare`: dense, then every amount x mode (the course notebook's comparison in one call);
* :func:`sensitivity`: each prunable layer pruned alone, ranked by how much top-1 agreement it costs.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .progress import Progress, silent, tqdm_progress
from .pruning import validate_amount
from .session import Session


def compare(
    session: Session,
    amounts: Sequence[float] = (0.3, 0.5, 0.7),
    modes: Sequence[str] = ("masked", "csr"),
    *,
    latency: bool = False,
    repeats: int = 5,
    progress: Progress | None = None,
    **settings,
) -> pd.DataFrame:
    """Measure dense, then every ``amount`` (above 0) in every ``mode``; each row also goes to the history.

    Args:
        amounts / modes: the grid (``0`` is dense, measured once first).
        latency / repeats: as in :meth:`Session.measure`.
        settings: the rest of :meth:`Session.apply`'s keywords (criterion, scope, pattern, calibration, ...).

    Returns:
        One row per variant, dense first. The model is put back as it was before the call.
    """
    plan = [(validate_amount(amount), mode) for amount in amounts for mode in modes]  # nan / negative: refused
    plan = [(amount, mode) for amount, mode in plan if amount > 0]
    rows = []
    with session.undoable(always=True), tqdm_progress(progress, "compare") as report:
        session.reset()
        rows.append(session.measure(latency=latency, repeats=repeats))
        for index, (amount, mode) in enumerate(plan):
            session.apply(amount, mode=mode, progress=silent, **settings)
            rows.append(session.measure(latency=latency, repeats=repeats))
            report(index + 1, len(plan), f"{mode} {amount:.0%}")
    return pd.DataFrame(rows)


def sensitivity(session: Session, amount: float = 0.5, progress: Progress | None = None) -> pd.DataFrame:
    """Top-1 drop when each prunable layer alone is magnitude-pruned by ``amount`` (not recorded in the history).

    Returns one row per layer: name, block, role, top1_match, top1_drop, perplexity, sorted from the most to
    the least sensitive layer. Exclude the top ones with ``apply(..., exclude=[...])`` to spare them. The model
    is put back as it was before the call.
    """
    validate_amount(amount)
    rows = []
    with session.undoable(always=True), tqdm_progress(progress, "sensitivity") as report:
        for index, layer in enumerate(session.default_layers):
            session.apply(amount, mode="masked", scope="layer", include=[layer.name], progress=silent)
            top1, ppl = session.agreement()
            rows.append(
                {
                    "name": layer.name,
                    "block": layer.block,
                    "role": layer.role,
                    "top1_match": top1,
                    "top1_drop": 1.0 - top1,
                    "perplexity": ppl,
                }
            )
            report(index + 1, len(session.default_layers), layer.name)
    return pd.DataFrame(rows).sort_values("top1_drop", ascending=False, kind="stable").reset_index(drop=True)

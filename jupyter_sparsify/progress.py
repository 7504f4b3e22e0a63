"""Progress reporting: a callback ``progress(done, total, message)``, shown by tqdm by default."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[int, int, str], None]
REFRESH_S = 0.2  # the default bar redraws at most this often (and at the end)


@contextmanager
def tqdm_progress(progress: Progress | None, description: str) -> Iterator[Progress]:
    """Yield ``progress`` itself, or (when None) a callback that drives one ``tqdm.auto`` bar."""
    if progress is not None:
        yield progress
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=description, leave=False)
    shown = [-REFRESH_S]

    def report(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        now = time.monotonic()
        if done >= total or now - shown[0] >= REFRESH_S:  # each redraw is a widget message in a notebook
            bar.set_postfix_str(message[-40:], refresh=False)
            bar.refresh()
            shown[0] = now

    try:
        yield report
    finally:
        bar.close()


def silent(done: int, total: int, message: str) -> None:
    """A progress callback that shows nothing (e.g. when an outer bar already does)."""


class StopRequested(Exception):
    """Raised from a progress callback (or a forward hook) to end long work at its next step.

    ``Session.apply`` and ``Session.undoable`` put the model back as it was when it escapes them; the panel's
    **Stop** button works this way.
    """


class StageProgress:
    """Turns ``progress(done, total, message)`` reports into the fraction done and a line naming the stage
    (calibrating / pruning layer i of n / …) with an estimate of the time left, from the rate so far in that stage.

    Args:
        clock: seconds from any fixed point (``time.monotonic``; a fake one in tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.restart()

    def restart(self) -> None:
        """Start timing a new piece of work."""
        self._stage: tuple[str, int] | None = None
        self._since = self._last = self.clock()
        self.calibrated_once_s: float | None = None  # how long a "calibrating once" stage took in this work

    def describe(self, done: int, total: int, message: str) -> tuple[float, str]:
        """``(fraction done, text)`` for one report."""
        now = self.clock()
        label = _stage_label(done, total, message)
        stage = (label.split(":")[0], total)
        if stage != self._stage:  # a new stage starts where the last report of the previous one was
            self._stage, self._since = stage, self._last
        self._last = now
        elapsed = now - self._since
        if message.startswith(ONCE_PREFIX):
            self.calibrated_once_s = elapsed
        if 0 < done < total:
            label += f", {about(elapsed / done * (total - done))} left"
        return (done / total if total else 0.0), label


ONCE_PREFIX = "calibrating once"


def about(seconds: float) -> str:
    """A rough duration: ``about 12 s``, ``about 3 min``."""
    if seconds < 59.5:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


def _stage_label(done: int, total: int, message: str) -> str:
    """The stage a report belongs to, from the messages of the calibration, the criteria and the CSR conversion."""
    if message.startswith(ONCE_PREFIX):
        detail = message[len(ONCE_PREFIX) :].lstrip(": ")
        return f"Calibrating once ({detail}): step {done} of {total}"
    if message.startswith("calibrating block"):
        return f"Calibrating and pruning: block {done} of {total}"
    if message.startswith("calibrating"):
        return f"Calibrating: step {done} of {total}"
    if message.startswith("CSR "):
        return f"Converting to CSR: layer {done} of {total}"
    return f"Pruning: layer {done} of {total} ({message})"

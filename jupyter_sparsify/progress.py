"""Progress reporting: a callback ``progress(done, total, message)``, shown by tqdm by default."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[int, int, str], None]


@contextmanager
def tqdm_progress(progress: Progress | None, description: str) -> Iterator[Progress]:
    """Yield ``progress`` itself, or (when None) a callback that drives one ``tqdm.auto`` bar."""
    if progress is not None:
        yield progress
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=description, leave=False)

    def report(done: int, total: int, message: str) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.set_postfix_str(message[-40:], refresh=False)
        bar.refresh()

    try:
        yield report
    finally:
        bar.close()


def silent(done: int, total: int, message: str) -> None:
    """A progress callback that shows nothing (e.g. when an outer bar already does)."""

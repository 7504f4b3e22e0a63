"""Long work off the kernel's message loop: one job at a time on a thread, every widget update on the main thread.

In a Jupyter kernel the comm messages of widgets (a slider moved, **Stop** pressed) are handled on the main thread,
between cells, by the kernel's tornado ``IOLoop``. A job run there blocks them all; run on a thread it leaves them
free. Widgets and Bokeh documents are not thread-safe (ipywidgets' sync state and jupyter_bokeh's multi-message
patches must not interleave), so the job never touches them: it posts callbacks that the loop runs on the main
thread (``IOLoop.add_callback`` is the one tornado method safe to call from another thread).
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from torch import nn

from .progress import StopRequested

T = TypeVar("T")
Callback = Callable[[], None]
WAIT_LIMIT_S = 600.0  # wait() gives up if the worker posts nothing for this long (a bug, never a slow job)


def kernel_loop():
    """The running IPython kernel's main ``IOLoop`` (where widget messages are handled), or None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    return getattr(kernel, "io_loop", None)


class Worker:
    """Runs one job at a time, on a thread or inline, and hands its outcome to the main thread.

    Args:
        background: run jobs on a thread. Default: in a kernel (callbacks through its loop), else inline (the job
            runs in the caller, callbacks at once). ``True`` outside a kernel queues the callbacks for :meth:`wait`
            (scripts, tests).
    """

    def __init__(self, background: bool | None = None) -> None:
        loop = kernel_loop()
        self.background = loop is not None if background is None else background
        self._loop = loop if self.background else None
        self._queue: queue.SimpleQueue[Callback] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.busy = False

    def start(self, job: Callable[[], T], done: Callable[[T | None, BaseException | None], None]) -> None:
        """Run ``job``; then ``done(result, None)`` or ``done(None, error)`` on the main thread."""
        if self.busy:
            raise RuntimeError("the worker is already running a job")
        self.busy = True
        self._stop.clear()
        if self.background:
            threading.Thread(target=self._run, args=(job, done), name="jupyter-sparsify", daemon=True).start()
        else:
            self._run(job, done)

    def post(self, callback: Callback) -> None:
        """Run ``callback`` on the main thread (inline: now)."""
        if not self.background:
            callback()
        elif self._loop is not None:
            self._loop.add_callback(callback)
        else:
            self._queue.put(callback)

    def request_stop(self) -> None:
        """Ask the running job to stop: its next :meth:`check_stop` raises :class:`StopRequested`."""
        if self.busy:
            self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether Stop was asked for during the running job."""
        return self._stop.is_set()

    def check_stop(self) -> None:
        """Raise :class:`StopRequested` if Stop was asked for (call it between steps of the job)."""
        if self._stop.is_set():
            raise StopRequested("stopped on request")

    def wait(self) -> None:
        """Without a kernel: run the posted callbacks here until no job is left (jobs a callback starts included)."""
        if self._loop is not None:
            raise RuntimeError("in a kernel the callbacks run on its loop: waiting here would block them")
        while self.busy or not self._queue.empty():
            self._queue.get(timeout=WAIT_LIMIT_S)()

    def _run(self, job: Callable[[], T], done: Callable[[T | None, BaseException | None], None]) -> None:
        result, error = None, None
        try:
            result = job()
        except BaseException as caught:  # handed to the main thread, which shows or re-raises it
            error = caught
        self.post(lambda: self._finish(done, result, error))

    def _finish(self, done: Callable[[T | None, BaseException | None], None], result, error) -> None:
        self.busy = False
        done(result, error)


@contextmanager
def stop_hooks(model: nn.Module, check: Callback) -> Iterator[None]:
    """Within this block every forward pass of ``model`` and of each of its transformer blocks first calls ``check``
    (which raises to stop): measuring and generating stop at the next block."""
    from .calibration import decoder_blocks

    try:
        blocks = list(decoder_blocks(model))
    except ValueError:  # no ModuleList of blocks: the whole model only
        blocks = []
    handles = [module.register_forward_pre_hook(lambda *_: check()) for module in (model, *blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

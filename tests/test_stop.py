"""The panel never traps the user: updates run on a worker thread, Stop puts the model back at any stage, the
progress names the stage, and slider moves during an update never start a second one. Driven by hooks that hold
the worker at a chosen step (events, never sleeps or timings)."""

from __future__ import annotations

import threading

import pytest
import torch

from jupyter_sparsify.panel import Panel
from jupyter_sparsify.progress import StageProgress, StopRequested
from jupyter_sparsify.session import Session
from jupyter_sparsify.worker import Worker, stop_hooks

from helpers import state_checksum, tiny_model

SYNC_S = 120  # how long a test waits for the worker to reach a hook before failing (a hang, never a timing)
CALIBRATION = ["The valley is quiet and the river bends.", "Sparse kernels need zeros."] * 3


class Gate:
    """Holds the worker thread at a hook until the test (on the main thread) lets it go."""

    def __init__(self) -> None:
        self.reached, self.released, self.thread = threading.Event(), threading.Event(), None
        self.used = False

    def hold(self) -> None:
        if not self.used:
            self.used, self.thread = True, threading.current_thread()
            self.reached.set()
            assert self.released.wait(SYNC_S), "the test never released the worker"

    def wait_reached(self) -> None:
        assert self.reached.wait(SYNC_S), "the worker never reached the hook"


@pytest.fixture
def panel(tokenizer, tmp_path):
    """A panel whose updates run on a worker thread (as in a kernel); ``panel.worker.wait()`` runs its callbacks."""
    session = Session(tiny_model("gpt2"), tokenizer)
    session.set_calibration_texts(CALIBRATION)
    return Panel(session, export_dir=tmp_path / "out", worker=Worker(background=True))


def hold_progress(panel: Panel, monkeypatch, starts: str | None) -> Gate:
    """Hold the worker at the first progress report whose message starts with ``starts`` (None: one that names a
    layer being pruned)."""
    gate, report = Gate(), panel._on_progress

    def hooked(done: int, total: int, message: str) -> None:
        if message.startswith(starts) if starts else not message.startswith(("calibrating", "CSR")):
            gate.hold()
        report(done, total, message)

    monkeypatch.setattr(panel, "_on_progress", hooked)
    return gate


def hold_measure(panel: Panel, monkeypatch) -> Gate:
    """Hold the worker when it starts measuring."""
    gate, measure = Gate(), panel.session.measure

    def hooked(**kwargs):
        gate.hold()
        return measure(**kwargs)

    monkeypatch.setattr(panel.session, "measure", hooked)
    return gate


def pruned_to_40(panel: Panel) -> tuple[str, int]:
    """Masked 40 % magnitude, measured: the state every Stop must come back to; returns its checksum and rows."""
    panel.amount.value = 0.4
    panel.worker.wait()
    assert panel.session.settings.label == "Masked 40%"
    return state_checksum(panel.session.model), len(panel.session.history)


def stop_at(panel: Panel, gate: Gate, amount: float) -> None:
    """Move the slider, wait until the worker is held, press Stop, let it go and wait for the end."""
    panel.amount.value = amount
    gate.wait_reached()
    assert gate.thread is not threading.main_thread()  # the update runs off the main thread...
    assert panel.worker.busy and not panel.stop_button.disabled  # ...which is free to take the Stop click
    panel.stop_button.click()
    gate.released.set()
    panel.worker.wait()


def assert_back_to_40(panel: Panel, checksum: str, rows: int) -> None:
    session = panel.session
    assert state_checksum(session.model) == checksum and session.settings.label == "Masked 40%"
    assert session.settings.criterion == "magnitude" and len(session.history) == rows  # nothing measured
    assert panel.status.value == "Stopped: the model is back to Masked 40%, as before this request"
    assert panel.progress.bar_style == "warning" and panel.stop_button.disabled and not panel.worker.busy


@pytest.mark.parametrize(
    ("criterion", "calibration", "starts"),
    [
        ("wanda", "once", "calibrating once"),  # the first apply's one dense pass
        ("sparsegpt", "sequential", "calibrating block 1/"),  # block 0 already pruned, block by block
        ("magnitude", "once", None),  # pruning, the first layer already pruned
    ],
)
def test_stop_at_each_step_of_the_apply_puts_the_model_back_bit_exact(
    panel, monkeypatch, criterion, calibration, starts
):
    checksum, rows = pruned_to_40(panel)
    panel.criterion.value, panel.calibration.value = criterion, calibration
    panel.scope.value = "layer"
    gate = hold_progress(panel, monkeypatch, starts)
    stop_at(panel, gate, 0.6)
    assert_back_to_40(panel, checksum, rows)
    panel.criterion.value, panel.scope.value = "magnitude", "global"
    panel.apply_button.click()  # and the panel works on
    panel.worker.wait()
    assert panel.session.settings.label == "Masked 60%" and panel.progress.bar_style == "success", panel.status.value


def test_stop_while_measuring_puts_the_model_back_and_drops_the_queued_move(panel, monkeypatch):
    checksum, rows = pruned_to_40(panel)
    gate = hold_measure(panel, monkeypatch)
    panel.amount.value = 0.6
    gate.wait_reached()
    panel.amount.value = 0.8  # queued while the update runs...
    assert "then again with the latest settings" in panel.status.value
    panel.stop_button.click()  # ...and dropped by Stop
    gate.released.set()
    panel.worker.wait()
    assert_back_to_40(panel, checksum, rows)


def test_slider_moves_during_an_update_queue_only_the_latest(panel, monkeypatch):
    session, running, calls = panel.session, [], []
    apply = session.apply

    def counted(*args, **kwargs):
        running.append(1)
        calls.append(kwargs["amount"])
        assert len(running) == 1, "a second update started while one was running"
        try:
            return apply(*args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(session, "apply", counted)
    gate = hold_progress(panel, monkeypatch, None)
    panel.amount.value = 0.5
    gate.wait_reached()
    panel.amount.value = 0.6
    panel.amount.value = 0.7
    panel.apply_button.click()  # Apply while busy queues too
    panel.reset_button.click()  # disabled while busy; a programmatic reset is refused
    panel.reset()
    assert calls == [0.5] and panel.status.value.startswith("Busy")
    assert panel.reset_button.disabled and not panel.amount.disabled and not panel.apply_button.disabled
    gate.released.set()
    panel.worker.wait()
    assert calls == [0.5, 0.7] and session.settings.label == "Masked 70%"
    assert list(session.history["setup"]) == ["Dense", "Masked 50%", "Masked 70%"]
    assert panel.status.value.startswith("Masked 70%: top-1 agreement") and not panel.reset_button.disabled


def test_the_progress_names_each_stage_and_the_first_calibration(tokenizer):
    session = Session(tiny_model("gpt2"), tokenizer)
    session.set_calibration_texts(CALIBRATION)
    panel = Panel(session)  # outside a kernel the work runs inline: every report reaches the status
    shown: list[str] = []
    panel.status.observe(lambda change: shown.append(change["new"]), names="value")
    panel.criterion.value = "wanda"
    panel.amount.value = 0.5
    stages = [text.split(":")[0].split(" (")[0] for text in shown]
    assert stages[0] == "Calibrating once" and "first apply of a data-aware criterion" in shown[0]
    assert "Calibrating once (input norms on 6 texts, kept for every later apply): step 1 of 1" in shown
    assert {"Pruning", "Measuring top-1 agreement and perplexity"} <= set(stages)
    assert (
        stages.index("Calibrating once")
        < stages.index("Pruning")
        < stages.index("Measuring top-1 agreement and perplexity")
    )
    assert any(text.startswith(f"Pruning: layer 1 of {len(session.default_layers)} (") for text in shown)
    assert "(calibrated once, in about " in shown[-1] and "later applies skip it" in shown[-1]
    shown.clear()
    panel.amount.value = 0.6  # calibrated already: straight to pruning
    assert not [text for text in shown if "alibrat" in text] and shown[0] == "Pruning…"


def test_the_time_left_comes_from_the_rate_so_far_in_the_stage():
    now = [0.0]
    stages = StageProgress(clock=lambda: now[0])
    now[0] = 2.0
    assert stages.describe(1, 4, "calibrating once: Hessians on 6 texts") == (
        0.25,
        "Calibrating once (Hessians on 6 texts): step 1 of 4, about 6 s left",
    )
    now[0] = 10.0
    assert stages.describe(4, 4, "calibrating once: Hessians on 6 texts")[1].endswith("step 4 of 4")
    assert stages.calibrated_once_s == 10.0
    now[0] = 40.0  # a new stage starts where the last one ended: 30 s for 1 of 5 layers
    assert stages.describe(1, 5, "sparsegpt h.0.attn.c_attn")[1] == (
        "Pruning: layer 1 of 5 (sparsegpt h.0.attn.c_attn), about 2 min left"
    )
    assert stages.describe(2, 2, "calibrating block 2/2")[1] == "Calibrating and pruning: block 2 of 2"


def test_stop_hooks_stop_a_forward_pass_and_go_away():
    model, stop = tiny_model("gpt2"), threading.Event()
    ids = torch.tensor([[3, 4, 5]])

    def check() -> None:
        if stop.is_set():
            raise StopRequested("stopped on request")

    with stop_hooks(model, check):
        model(input_ids=ids)  # not asked to stop: runs
        stop.set()
        with pytest.raises(StopRequested):
            model(input_ids=ids)
    model(input_ids=ids)  # the hooks are gone
    assert not any(module._forward_pre_hooks for module in model.modules())

"""The ipywidgets panel: controls, progress, live Bokeh charts, the results table."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ipywidgets as widgets
import pandas as pd
from bokeh.core.json_encoder import serialize_json
from IPython.display import HTML, display
from jupyter_bokeh.widgets import BokehModel

from .agreement import TokenAgreement
from .charts import Grouping, LayerChart, LayerView, VariantCharts, write_report
from .criteria import CALIBRATIONS, CRITERIA, SCOPES_OF, PruneSettings, default_scope
from .generation import SideBySide, side_by_side_html
from .progress import StageProgress, StopRequested, about
from .session import HISTORY_COLUMNS, Session
from .worker import Worker, stop_hooks

PATTERNS = ("unstructured", "2:4", "4:8")
DEFAULT_PROMPT = "The capital of France is"
GENERATE_TOKENS = 8  # both models, re-run after every apply: 16 tokens took 1.85 s on the embedded model, 8 about 1 s
TAB_TITLES = ("Variants", "Layers", "Generate", "Tokens")
LAYERS_TAB, TOKENS_TAB = TAB_TITLES.index("Layers"), TAB_TITLES.index("Tokens")
# The table shows the history's columns except those the setup label already says and the raw timings (in the CSV).
TABLE_OMITS = frozenset(
    {"mode", "criterion", "scope", "pattern", "amount", "eval_tokens"}  # in the setup label, or a detail
    | {"prefill_ms", "decode_ms", "dense_prefill_ms", "dense_decode_ms"}  # raw timings: the speedups are shown
)
STATIC_CLASS = "jupyter-sparsify-static"
# The live panel hides the static snapshot saved next to it; without a kernel only the snapshot shows.
_HIDE_STATIC = f"<style>.{STATIC_CLASS} {{display: none;}}</style>"


@dataclass(frozen=True)
class UpdateRequest:
    """What one apply / reset asks for, read from the controls when it starts."""

    settings: dict | None  # Session.apply's arguments; None: back to dense
    latency: bool  # measure latency too
    prompt: str | None  # run the Generate tab's prompt again
    tokens: bool  # fill the Tokens tab (it is shown)


class Panel(widgets.VBox):
    """Sliders and buttons that prune a session's model in place, with live charts.

    Example:
        >>> Panel(session_for(model, tokenizer))   # or: %sparsify panel model tokenizer
    """

    def __init__(
        self, session: Session, export_dir: str | Path = "sparsify_results", worker: Worker | None = None
    ) -> None:
        self.session = session
        self.export_dir = Path(export_dir)
        self.worker = worker or Worker()
        self._pending: dict[str, Callable[[], None]] = {}  # the latest request of each kind made while busy
        self._stages = StageProgress()
        self._measure_s: dict[bool, float] = {}  # how long the last measurement took, without / with latency
        self._latest: tuple[float | None, str] = (None, "")  # the worker's latest progress, not shown yet
        self._progress_posted = False
        self._shown = ""  # the progress text shown now
        self._quiet = False  # True while refresh sets the layer dropdown
        self.amount = widgets.FloatSlider(
            value=0.3,
            min=0.0,
            max=0.95,
            step=0.05,
            continuous_update=False,
            readout_format=".0%",
            description="Sparsity",
            style={"description_width": "70px"},
            layout=widgets.Layout(width="360px"),
        )
        self.mode = widgets.ToggleButtons(
            options=[("Dense", "dense"), ("Masked", "masked"), ("CSR", "csr")],
            value="masked",
            description="Mode",
            style={"button_width": "70px"},
        )
        self.criterion = widgets.Dropdown(options=CRITERIA, value="magnitude", description="Criterion")
        self.scope = widgets.Dropdown(
            options=SCOPES_OF["magnitude"], value=default_scope("magnitude"), description="Scope"
        )
        self.calibration = widgets.Dropdown(
            options=CALIBRATIONS,
            value="once",
            description="Calibration",
            tooltip="Wanda / SparseGPT / ADMM: once = dense statistics collected at the first apply and reused "
            "(seconds per apply); sequential = block by block on the pruned blocks, as in the papers (minutes)",
        )
        self.pattern = widgets.Dropdown(options=PATTERNS, value="unstructured", description="Pattern")
        self.reconstruct = widgets.Checkbox(
            value=False,
            description="reconstruct blocks",
            indent=False,
            tooltip="after each block is pruned, tune its kept weights to reproduce the dense block (Wanda "
            "row/layer, SparseGPT, ADMM): slower, closer to dense",
        )
        self.latency = widgets.Checkbox(value=False, description="measure latency (vs dense, same run)", indent=False)
        self.apply_button = widgets.Button(description="Apply", button_style="primary", icon="play")
        self.reset_button = widgets.Button(description="Reset", icon="undo")
        self.export_button = widgets.Button(description="Export", icon="download")
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            disabled=True,
            tooltip="stop the running update at its next layer: the model goes back to as it was before it",
        )
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="360px"))
        self.status = widgets.Label(value="Ready: dense model. Move the slider or press Apply.")
        self.errors = widgets.Output()
        self.charts = VariantCharts()
        self.layer_chart = LayerChart()
        self.layer_view = LayerView()
        self.layer_select = widgets.Dropdown(description="Layer", layout=widgets.Layout(width="480px"))
        self.table = widgets.HTML()
        self.prompt = widgets.Text(value=DEFAULT_PROMPT, description="Prompt", layout=widgets.Layout(width="480px"))
        self.generate_button = widgets.Button(description="Generate", icon="pencil")
        self.generation = widgets.HTML(
            value="<p>Press Generate: the dense model and this variant continue the prompt.</p>"
        )
        self.tokens_view = widgets.HTML()
        self._generated = False  # once a prompt was run, every apply runs it again
        self._snapshot = None
        if session.history.empty:
            started = self._stages.clock()
            session.measure()  # the dense baseline every chart compares against
            self._measure_s[False] = self._stages.clock() - started
        self.refresh()  # before the BokehModels are built: they carry the charts' data as of now
        self._bokeh = [
            LiveBokehModel(self.charts.layout()),
            LiveBokehModel(self.layer_chart.figure),
            LiveBokehModel(self.layer_view.layout()),
        ]
        layers_tab = widgets.VBox([self._bokeh[1], self.layer_select, self._bokeh[2]])
        generate_tab = widgets.VBox([widgets.HBox([self.prompt, self.generate_button]), self.generation])
        self.tabs = widgets.Tab(children=[self._bokeh[0], layers_tab, generate_tab, self.tokens_view])
        self.tabs.titles = TAB_TITLES
        controls = widgets.VBox(
            [
                widgets.HBox([self.amount, self.mode]),
                widgets.HBox([self.criterion, self.scope, self.pattern]),
                widgets.HBox([self.calibration, self.reconstruct]),
                widgets.HBox(
                    [self.latency, self.apply_button, self.stop_button, self.reset_button, self.export_button]
                ),
                widgets.HBox([self.progress, self.status]),
            ]
        )
        super().__init__([controls, self.errors, self.tabs, self.table])
        self.amount.observe(lambda change: self.apply(), names="value")
        self.criterion.observe(lambda change: self._follow_criterion(change["new"]), names="value")
        self.reconstruct.observe(lambda change: self._follow_reconstruct(change["new"]), names="value")
        self.apply_button.on_click(lambda _: self.apply())
        self.generate_button.on_click(lambda _: self.generate())
        self.layer_select.observe(lambda change: self._pick_layer(), names="value")
        self.tabs.observe(lambda change: self._on_tab(change["new"]), "selected_index")
        self.stop_button.on_click(lambda _: self.stop())
        self.reset_button.on_click(lambda _: self.reset())
        self.export_button.on_click(lambda _: self.export())

    def show(self) -> None:
        """Display the panel and, beside it, a static snapshot that a saved notebook keeps."""
        display(self)
        self._snapshot = display(HTML(self._static_html()), display_id=True)

    # -- actions --------------------------------------------------------------------------

    def apply(self) -> None:
        """Prune with the controls' settings, measure, and update charts and table. In a kernel this runs on a
        worker thread (Stop works meanwhile); asked again while it runs, it runs once more at the end, with the
        controls as they are then."""
        if self.worker.busy:
            self._queue("apply", self.apply)
            return
        update = self._update_request()
        if update.tokens:
            self._pending.pop("tokens", None)  # this update fills the Tokens tab
        settings = update.settings
        change = self.session.reset if settings is None else lambda: self._prune(settings)
        self._start(self._first_step(settings), lambda: self._update(update, change))

    def stop(self) -> None:
        """Stop the running update at its next layer (or block, or calibration batch): the model goes back to as
        it was before the update, and queued requests are dropped."""
        if self.worker.busy:
            self.worker.request_stop()
            self._pending.clear()
            self.status.value = "Stopping at the next step…"

    def generate(self) -> None:
        """Continue the prompt with the dense model and the variant, side by side (re-run after every apply)."""
        if not self._refused_while_busy():
            prompt = self.prompt.value
            self._start("Generating", lambda: self._generate_job(prompt))

    def reset(self) -> None:
        """Back to the dense original (bit-exact) and measure it."""
        if not self._refused_while_busy():
            update = self._update_request()
            self._start("Resetting", lambda: self._update(update, self.session.reset))

    def export(self) -> None:
        """Write the HTML report (charts + table, works offline) and the CSV; say where."""
        if not self._refused_while_busy():
            self._start("Exporting", self._export_job)

    def refresh(self) -> None:
        """Redraw charts, layer view and table from the session (data only, nothing re-rendered)."""
        history, layers = self.session.history, self.session.layer_table()
        self.charts.update(history)
        self.layer_chart.update(layers)
        self._offer_layers(list(layers["name"]))
        self._show_layer()
        self.table.value = _HIDE_STATIC + _history_html(history)
        if self._snapshot is not None:
            self._snapshot.update(HTML(self._static_html()))

    # -- running work ------------------------------------------------------------------------

    def _start(self, what: str, job: Callable[[], Callable[[], str]]) -> None:
        """Run ``job`` on the worker; it returns what to show, which runs on the main thread."""
        self._set_busy(True)
        self.errors.clear_output()
        self.progress.value, self.progress.bar_style = 0.0, "info"
        self.status.value = self._shown = f"{what}…"
        self._stages.restart()
        self.worker.start(job, self._finish)

    def _finish(self, show: Callable[[], str] | None, error: BaseException | None) -> None:
        """Main thread, after a job: show its result or say why there is none, then run what was queued."""
        try:
            if error is not None:
                raise error
            self.status.value = show() + self._calibration_note()
            self.progress.value, self.progress.bar_style = 1.0, "success"
        except StopRequested:
            self.progress.bar_style = "warning"
            self.status.value = f"Stopped: the model is back to {self.session.settings.label}, as before this request"
        except Exception as failure:  # shown in the panel, never lost in the kernel log
            self.progress.bar_style = "danger"
            self.status.value = f"Failed: {failure} (the model is now: {self.session.settings.label})"
            self.errors.append_stdout(f"{type(failure).__name__}: {failure}\n")
        except KeyboardInterrupt:  # inline only: a worker thread never receives one
            self._pending.clear()
            self.progress.bar_style = "warning"
            self.status.value = f"Interrupted (the model is now: {self.session.settings.label})"
            raise
        finally:
            self._set_busy(False)
        self._run_queued()

    def _queue(self, name: str, request: Callable[[], None]) -> None:
        """Remember the latest request of a kind made while busy; it runs once the current one ends."""
        self._pending[name] = request
        self.status.value = self._shown + self._queued_note()

    def _run_queued(self) -> None:
        for name in ("apply", "tokens"):
            request = self._pending.pop(name, None)
            if request is not None:
                request()
                return

    def _queued_note(self) -> str:
        return " · then again with the latest settings" if "apply" in self._pending else ""

    def _refused_while_busy(self) -> bool:
        if self.worker.busy:
            self.status.value = "Busy: the previous request is still running; try again when it finishes, or Stop it."
        return self.worker.busy

    def _on_progress(self, done: int, total: int, message: str) -> None:
        """The apply's progress callback (worker thread): stop here if asked, else show the stage."""
        self.worker.check_stop()
        self._show_progress(*self._stages.describe(done, total, message))

    def _show_progress(self, fraction: float | None, text: str) -> None:
        """Show progress from the worker: the latest report only, on the main thread."""
        self._latest = (fraction, text)
        if not self._progress_posted:
            self._progress_posted = True
            self.worker.post(self._flush_progress)

    def _flush_progress(self) -> None:
        self._progress_posted = False
        fraction, text = self._latest
        if self.worker.stop_requested:
            text = "Stopping at the next step…"
        if fraction is not None:
            self.progress.value = fraction
        self._shown = text
        self.status.value = text + self._queued_note()

    def _calibration_note(self) -> str:
        seconds = self._stages.calibrated_once_s
        if seconds is None:
            return ""
        return f" (calibrated once, in {about(seconds)}: kept, so later applies skip it)"

    # -- jobs (worker thread; what they return runs on the main thread) -------------------------

    def _update_request(self) -> UpdateRequest:
        """What an apply asks for, read from the controls now (the job never reads a widget)."""
        pattern = None if self.pattern.value == "unstructured" else self.pattern.value
        settings = None
        if self.mode.value != "dense":
            settings = {
                "amount": None if pattern else self.amount.value,
                "mode": self.mode.value,
                "criterion": self.criterion.value,
                "scope": self.scope.value,
                "pattern": pattern,
                "reconstruct": self.reconstruct.value,
                "calibration": self.calibration.value,
            }
        return UpdateRequest(
            settings=settings,
            latency=self.latency.value,
            prompt=self.prompt.value if self._generated else None,
            tokens=self.tabs.selected_index == TOKENS_TAB,
        )

    def _first_step(self, settings: dict | None) -> str:
        """What the status says before the first progress report."""
        if settings is None:
            return "Resetting to dense"
        if settings["mode"] == "csr":
            return "Pruning, then preparing the sparse kernel (compiled once on first use, then cached)"
        data_aware = settings["criterion"] != "magnitude" and settings["calibration"] == "once"
        if data_aware and not self.session.calibration_bytes:
            return "Calibrating once (first apply of a data-aware criterion: the statistics are kept for later applies)"
        return "Pruning"

    def _prune(self, settings: dict) -> None:
        self.session.apply(**settings, progress=self._on_progress)

    def _update(self, update: UpdateRequest, change: Callable[[], None]) -> Callable[[], str]:
        """Change the model, then generate and measure; if anything fails or is stopped, the model and the
        settings go back to as they were (``Session.undoable``)."""
        with self.session.undoable():
            change()
            return self._measured(update)

    def _measured(self, update: UpdateRequest) -> Callable[[], str]:
        """Generate, compare tokens and measure (measuring last: a stopped update leaves no history row)."""
        session, generation, tokens = self.session, None, None
        with stop_hooks(session.model, self.worker.check_stop):
            if update.prompt is not None:
                self._show_progress(None, "Generating with the dense model and the variant…")
                generation = session.generate(update.prompt, max_new_tokens=GENERATE_TOKENS)
            if update.tokens:
                tokens = session.token_agreement()
            self._show_progress(None, self._measuring_text(update.latency))
            started = self._stages.clock()
            row = session.measure(latency=update.latency)
            self._measure_s[update.latency] = self._stages.clock() - started
        return lambda: self._show_measured(row, update, generation, tokens)

    def _measuring_text(self, latency: bool) -> str:
        text = "Measuring top-1 agreement and perplexity" + (" and latency" if latency else "")
        seconds = self._measure_s.get(latency)
        return text + (f" ({about(seconds)} as last time)…" if seconds is not None else "…")

    def _generate_job(self, prompt: str) -> Callable[[], str]:
        with stop_hooks(self.session.model, self.worker.check_stop):
            result = self.session.generate(prompt, max_new_tokens=GENERATE_TOKENS)
        return lambda: self._show_generation(result)

    def _tokens_job(self) -> Callable[[], str]:
        with stop_hooks(self.session.model, self.worker.check_stop):
            tokens = self.session.token_agreement()
        return lambda: self._show_tokens(tokens)

    def _export_job(self) -> Callable[[], str]:
        report = write_report(self.export_dir / "report.html", self.session.history, self.session.layer_table())
        csv = self.session.to_csv(self.export_dir / "history.csv")
        return lambda: f"Exported {report.resolve()} and {csv.resolve()}"

    # -- showing results (main thread) ---------------------------------------------------------

    def _show_measured(
        self, row: dict, update: UpdateRequest, generation: SideBySide | None, tokens: TokenAgreement | None
    ) -> str:
        self.refresh()
        if generation is not None:
            self._show_generation(generation)
        if tokens is not None:
            self._show_tokens(tokens)
        text = (
            f"{row['setup']}: top-1 agreement {row['top1_match']:.1%}, size {row['size_mb']:.1f} MiB, "
            f"compute {row['compute_ratio']:.2f}× dense"
        )
        if update.latency:
            text += f", decode {row['decode_speedup']:.2f}× dense speed"
        return text

    def _show_generation(self, result: SideBySide) -> str:
        self._generated = True  # from now on every apply runs the prompt again
        self.generation.value = side_by_side_html(result)
        where = "the same text" if result.diverge_at is None else f"they part at token {result.diverge_at}"
        return f"Generated {GENERATE_TOKENS} tokens with {self.session.settings.label} and dense: {where}"

    def _show_tokens(self, tokens: TokenAgreement) -> str:
        self.tokens_view.value = tokens._repr_html_()
        return f"Tokens tab: {self.session.settings.label} against dense, token by token"

    def _on_tab(self, index: int) -> None:
        """The Tokens tab is filled when shown (one corpus pass)."""
        if index != TOKENS_TAB:
            return
        if self.worker.busy:
            self._queue("tokens", lambda: self._on_tab(self.tabs.selected_index))
        else:
            self._start("Comparing tokens", self._tokens_job)

    def _offer_layers(self, names: list[str]) -> None:
        """The layers the dropdown offers (those pruned, or all prunable ones); keep the choice if still there, else
        the first (the first pruned one)."""
        chosen = self.layer_select.value if self.layer_select.value in names else names[0]
        self._quiet = True  # refresh draws the layer itself, once
        try:
            if list(self.layer_select.options) != names:
                self.layer_select.options = names
            self.layer_select.value = chosen
        finally:
            self._quiet = False

    def _pick_layer(self) -> None:
        """Draw the layer picked in the dropdown (quick: on the main thread, never while a job changes the model)."""
        if self._quiet or self.layer_select.value is None or self._refused_while_busy():
            return
        try:
            self.status.value = self._show_layer()
        except Exception as failure:
            self.status.value = f"Failed: {failure}"
            self.errors.append_stdout(f"{type(failure).__name__}: {failure}\n")

    def _show_layer(self) -> str:
        """Draw the chosen layer's mask and its scores' histogram with the threshold."""
        session = self.session
        name, density = session.mask_density(self.layer_select.value)
        _, label, scores, kept = session.layer_scores(name)
        self.layer_view.show_mask(name, density, scores.shape)
        self.layer_view.show_scores(label, scores, kept, threshold_grouping(session.settings))
        return f"Layer {name}: {1 - kept.mean():.1%} of its weights pruned; scores {label}"

    def _follow_criterion(self, criterion: str) -> None:
        """Offer only the scopes the criterion supports, starting at its own default."""
        self.scope.options = SCOPES_OF[criterion]
        self.scope.value = default_scope(criterion)

    def _follow_reconstruct(self, reconstruct: bool) -> None:
        """Block reconstruction needs the sequential calibration."""
        if reconstruct:
            self.calibration.value = "sequential"

    def _set_busy(self, busy: bool) -> None:
        """While a job runs: Stop on; the settings and Apply stay usable (a request is queued), the rest waits."""
        self.stop_button.disabled = not busy
        for control in (self.reset_button, self.export_button, self.generate_button, self.layer_select):
            control.disabled = busy

    def _static_html(self) -> str:
        return (
            f'<div class="{STATIC_CLASS}"><p><b>jupyter_sparsify panel</b> (static snapshot: run the notebook '
            f"for the live panel)</p>{_history_html(self.session.history)}</div>"
        )

    def _repr_mimebundle_(self, **kwargs):
        for model in self._bokeh:  # displayed again: every view draws the charts as they are now
            model.renew()
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (
            f"jupyter_sparsify panel: {len(self.session.history)} measurements (run the cell for the live panel)"
        )
        return bundle


def _history_html(history: pd.DataFrame) -> str:
    if history.empty:
        return "<p>No measurement yet.</p>"
    columns = [name for name in HISTORY_COLUMNS if name not in TABLE_OMITS]
    shown = history[columns].rename(columns=lambda c: html.escape(c))
    return shown.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", classes="jupyter-sparsify-table")


def threshold_grouping(settings: PruneSettings) -> Grouping:
    """How the settings chose each layer's mask from its scores (see ``charts.score_threshold``)."""
    if settings.mode == "dense" or settings.criterion in ("sparsegpt", "admm"):
        return None  # dense: nothing pruned; SparseGPT / ADMM: by their own saliency, not these scores
    if settings.pattern:
        return settings.pattern
    return "row" if settings.scope == "row" else "layer"


class LiveBokehModel(BokehModel):
    """A ``BokehModel`` that a reloaded page or a second display draws as it is now.

    jupyter_bokeh sends every change as a patch to the views open at the time; its ``render_bundle``, which a
    new view draws from, stays as built. Here a front end that asks for the state (a reloaded page) gets the
    document as it is now, and :meth:`renew` sends it to the page before another view is made.
    """

    _stale = False

    def _document_patched(self, event) -> None:
        self._stale = True
        super()._document_patched(event)

    def get_state(self, key=None, drop_defaults: bool = False) -> dict:
        """The widget's state, with the document as it is now."""
        state = super().get_state(key, drop_defaults)
        if self._stale and "render_bundle" in state:
            state["render_bundle"] = serialize_json(self._model_to_traits(self._model))
        return state

    def renew(self) -> None:
        """Send the document as it is now, if it changed since it was last sent whole."""
        if self._stale:
            self.render_bundle = self._model_to_traits(self._model)
            self._stale = False

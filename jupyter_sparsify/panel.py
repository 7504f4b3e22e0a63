"""The ipywidgets panel: controls, progress, live Bokeh charts, the results table."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
from bokeh.core.json_encoder import serialize_json
from IPython.display import HTML, display
from jupyter_bokeh.widgets import BokehModel

from .charts import Grouping, LayerChart, LayerView, VariantCharts, write_report
from .criteria import CALIBRATIONS, CRITERIA, SCOPES_OF, PruneSettings, default_scope
from .generation import side_by_side_html
from .session import HISTORY_COLUMNS, Session

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


class Panel(widgets.VBox):
    """Sliders and buttons that prune a session's model in place, with live charts.

    Example:
        >>> Panel(session_for(model, tokenizer))   # or: %sparsify panel model tokenizer
    """

    def __init__(self, session: Session, export_dir: str | Path = "sparsify_results") -> None:
        self.session = session
        self.export_dir = Path(export_dir)
        self._busy = False
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
            session.measure()  # the dense baseline every chart compares against
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
                widgets.HBox([self.latency, self.apply_button, self.reset_button, self.export_button]),
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
        self.tabs.observe(lambda change: self._show_tokens() if change["new"] == TOKENS_TAB else None, "selected_index")
        self.reset_button.on_click(lambda _: self.reset())
        self.export_button.on_click(lambda _: self.export())

    def show(self) -> None:
        """Display the panel and, beside it, a static snapshot that a saved notebook keeps."""
        display(self)
        self._snapshot = display(HTML(self._static_html()), display_id=True)

    # -- actions --------------------------------------------------------------------------

    def apply(self) -> None:
        """Prune with the controls' settings, measure, and update charts and table."""
        pattern = None if self.pattern.value == "unstructured" else self.pattern.value

        def work() -> str:
            if self.mode.value == "dense":
                self.session.reset()
            else:
                if self.mode.value == "csr":
                    self.status.value = "Preparing the sparse kernel (compiled once on first use, then cached)…"
                self.session.apply(
                    None if pattern else self.amount.value,
                    mode=self.mode.value,
                    criterion=self.criterion.value,
                    scope=self.scope.value,
                    pattern=pattern,
                    reconstruct=self.reconstruct.value,
                    calibration=self.calibration.value,
                    progress=self._report,
                )
            return self._measure()

        self._run("Pruning", work)

    def generate(self) -> None:
        """Continue the prompt with the dense model and the variant, side by side (re-run after every apply)."""

        def work() -> str:
            self._generated = True
            return self._generate()

        self._run("Generating", work)

    def reset(self) -> None:
        """Back to the dense original (bit-exact) and measure it."""
        self._run("Resetting", lambda: (self.session.reset(), self._measure())[1])

    def export(self) -> None:
        """Write the HTML report (charts + table, works offline) and the CSV; say where."""

        def work() -> str:
            report = write_report(self.export_dir / "report.html", self.session.history, self.session.layer_table())
            csv = self.session.to_csv(self.export_dir / "history.csv")
            return f"Exported {report.resolve()} and {csv.resolve()}"

        self._run("Exporting", work)

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

    # -- internals --------------------------------------------------------------------------

    def _run(self, what: str, work) -> None:
        if self._busy:
            self.status.value = "Busy: the previous request is still running; try again when it finishes."
            return
        self._busy = True
        self._set_enabled(False)
        self.errors.clear_output()
        self.progress.value, self.progress.bar_style = 0.0, "info"
        self.status.value = f"{what}…"
        try:
            self.status.value = work()
            self.progress.value, self.progress.bar_style = 1.0, "success"
        except Exception as error:  # shown in the panel, never lost in the kernel log
            self.progress.bar_style = "danger"
            self.status.value = f"Failed: {error} (the model is now: {self.session.settings.label})"
            self.errors.append_stdout(f"{type(error).__name__}: {error}\n")
        except KeyboardInterrupt:
            self.progress.bar_style = "warning"
            self.status.value = f"Interrupted (the model is now: {self.session.settings.label})"
            raise
        finally:
            self._busy = False
            self._set_enabled(True)

    def _measure(self) -> str:
        self.status.value = "Measuring top-1 agreement and perplexity" + (
            " and latency…" if self.latency.value else "…"
        )
        row = self.session.measure(latency=self.latency.value)
        self.refresh()
        if self._generated:
            self._generate()
        if self.tabs.selected_index == TOKENS_TAB:
            self._show_tokens()
        text = (
            f"{row['setup']}: top-1 agreement {row['top1_match']:.1%}, size {row['size_mb']:.1f} MiB, "
            f"compute {row['compute_ratio']:.2f}× dense"
        )
        if self.latency.value:
            text += f", decode {row['decode_speedup']:.2f}× dense speed"
        return text

    def _generate(self) -> str:
        result = self.session.generate(self.prompt.value, max_new_tokens=GENERATE_TOKENS)
        self.generation.value = side_by_side_html(result)
        where = "the same text" if result.diverge_at is None else f"they part at token {result.diverge_at}"
        return f"Generated {GENERATE_TOKENS} tokens with {self.session.settings.label} and dense: {where}"

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
        if not self._quiet and self.layer_select.value is not None:
            self._run("Drawing the layer", self._show_layer)

    def _show_layer(self) -> str:
        """Draw the chosen layer's mask and its scores' histogram with the threshold."""
        session = self.session
        name, density = session.mask_density(self.layer_select.value)
        _, label, scores, kept = session.layer_scores(name)
        self.layer_view.show_mask(name, density, scores.shape)
        self.layer_view.show_scores(label, scores, kept, threshold_grouping(session.settings))
        return f"Layer {name}: {1 - kept.mean():.1%} of its weights pruned; scores {label}"

    def _show_tokens(self) -> None:
        """Fill the Tokens tab (one corpus pass, so only while it is shown)."""
        self.tokens_view.value = self.session.token_agreement()._repr_html_()

    def _follow_criterion(self, criterion: str) -> None:
        """Offer only the scopes the criterion supports, starting at its own default."""
        self.scope.options = SCOPES_OF[criterion]
        self.scope.value = default_scope(criterion)

    def _follow_reconstruct(self, reconstruct: bool) -> None:
        """Block reconstruction needs the sequential calibration."""
        if reconstruct:
            self.calibration.value = "sequential"

    def _report(self, done: int, total: int, message: str) -> None:
        self.progress.value = done / total if total else 0.0
        self.status.value = message

    def _set_enabled(self, enabled: bool) -> None:
        for control in (
            self.amount,
            self.mode,
            self.criterion,
            self.scope,
            self.pattern,
            self.calibration,
            self.reconstruct,
            self.latency,
            self.apply_button,
            self.reset_button,
            self.export_button,
            self.generate_button,
            self.layer_select,
        ):
            control.disabled = not enabled

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

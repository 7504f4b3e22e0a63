"""Bokeh charts fed from a session's history and layer tables; updated in place.

Every chart reads a ``ColumnDataSource``; ``update`` assigns new ``data`` so that a chart on
screen (through jupyter_bokeh) changes without being re-rendered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from bokeh.core.properties import field, value
from bokeh.embed import file_html
from bokeh.layouts import column, gridplot, row
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    FactorRange,
    HoverTool,
    Label,
    Legend,
    LegendItem,
    LinearColorMapper,
    Range1d,
    Span,
)
from bokeh.palettes import Category10_10, Greys256
from bokeh.plotting import figure
from bokeh.resources import INLINE

from .session import HISTORY_COLUMNS

BAR_WIDTH = 0.8
HEIGHT = 260
WIDTH = 420
MODE_COLORS = {"dense": "#4d4d4d", "masked": "#1f77b4", "csr": "#d62728"}
CURVE_GROUP = ["mode", "criterion", "scope", "pattern"]  # one trade-off line per group
HISTOGRAM_BINS = 60
KEPT_COLOR, PRUNED_COLOR = "#1f77b4", "#ff7f0e"
Grouping = str | tuple[int, int] | None  # "layer", "row", an N:M pattern, or None (no threshold on these scores)


def latest_per_setup(history: pd.DataFrame) -> pd.DataFrame:
    """One row per setup label (its latest measurement), in order of first appearance."""
    if history.empty:
        return history
    order = list(dict.fromkeys(history["setup"]))
    latest = history.groupby("setup", sort=False).tail(1).set_index("setup")
    return latest.loc[order].reset_index()


class VariantCharts:
    """Bars per variant (size, compute, top-1, speedup) and trade-off curves over sparsity."""

    def __init__(self) -> None:
        self.bars = ColumnDataSource(_empty_bars())
        self.curves = ColumnDataSource(_curves(pd.DataFrame(columns=list(HISTORY_COLUMNS))))
        self.points = ColumnDataSource(_points(pd.DataFrame(columns=list(HISTORY_COLUMNS))))
        self.dense_size = Span(location=0, dimension="width", line_dash="dashed", line_color="#4d4d4d")
        self.size = self._bar_figure("Model size (MiB, all tensors)", "size_mb", "MiB")
        self.size.add_layout(self.dense_size)
        self.top1 = self._bar_figure("Top-1 agreement with the dense model", "top1_match", "share of tokens")
        self.top1.y_range = Range1d(0, 1.05)
        self.compute = self._paired_figure(
            "Compute vs dense: theory vs executed",
            ("compute_ratio", "theoretical"),
            ("executed_ratio", "executed"),
            "ratio to dense",
        )
        self.speed = self._paired_figure(
            "Measured speedup vs dense (same run)",
            ("prefill_speedup", "prefill"),
            ("decode_speedup", "decode"),
            "× dense speed",
        )
        self.speed.add_layout(Span(location=1, dimension="width", line_dash="dotted", line_color="#4d4d4d"))
        self.speed_hint = Label(  # shown while no row has been timed, instead of empty axes alone
            x=20,
            y=100,
            x_units="screen",
            y_units="screen",
            text="tick 'measure latency' to time it",
            text_color="#4d4d4d",
            text_font_size="12px",
        )
        self.speed.add_layout(self.speed_hint)
        self.trade_top1 = self._curve_figure("Top-1 agreement vs sparsity", "ys_top1", "top1", "share of tokens")
        self.trade_top1.y_range = Range1d(0, 1.05)
        self.trade_size = self._curve_figure("Model size vs sparsity", "ys_size", "size", "MiB")
        self.trade_size.y_range = DataRange1d(start=0)  # from 0: a flat line must look flat

    def layout(self):
        """All charts in a grid: bars on top, trade-off curves below."""
        return gridplot(
            [[self.size, self.compute], [self.top1, self.speed], [self.trade_top1, self.trade_size]],
            toolbar_location=None,
        )

    def update(self, history: pd.DataFrame) -> None:
        """Show ``history`` (a ``Session.history`` DataFrame)."""
        latest = latest_per_setup(history)
        data = _empty_bars()
        if not latest.empty:
            data = {name: latest[name].tolist() for name in data if name in latest}  # NaN: no bar
            data["setup"] = latest["setup"].tolist()
            data["color"] = [MODE_COLORS.get(mode, "#7f7f7f") for mode in latest["mode"]]
        for chart in (self.size, self.top1, self.compute, self.speed):
            chart.x_range.factors = data["setup"]
        self.bars.data = data
        timed = [value for value in data.get("decode_speedup", []) + data.get("prefill_speedup", []) if value == value]
        self.speed_hint.visible = not timed
        dense = history[history["mode"] == "dense"] if not history.empty else history
        self.dense_size.location = float(dense["size_mb"].iloc[-1]) if len(dense) else 0.0
        self.curves.data = _curves(history)
        self.points.data = _points(history)

    def _bar_figure(self, title: str, column: str, y_label: str):
        chart = figure(title=title, x_range=FactorRange(), height=HEIGHT, width=WIDTH, toolbar_location=None)
        chart.vbar(x="setup", top=column, width=BAR_WIDTH, color="color", source=self.bars)
        chart.add_tools(HoverTool(tooltips=[("setup", "@setup"), (y_label, f"@{column}{{0.000}}")]))
        chart.yaxis.axis_label = y_label
        chart.xaxis.major_label_orientation = 0.6
        return chart

    def _paired_figure(self, title: str, first: tuple[str, str], second: tuple[str, str], y_label: str):
        from bokeh.transform import dodge

        chart = figure(title=title, x_range=FactorRange(), height=HEIGHT, width=WIDTH, toolbar_location=None)
        items = []
        for offset, (column_name, label), color in ((-0.2, first, "#9ecae1"), (0.2, second, "#08519c")):
            renderer = chart.vbar(
                x=dodge("setup", offset, range=chart.x_range),
                top=column_name,
                width=0.38,
                color=color,
                source=self.bars,
            )
            items.append(LegendItem(label=label, renderers=[renderer]))
        chart.add_layout(Legend(items=items, border_line_alpha=0), "right")  # beside the bars, never over them
        chart.add_tools(
            HoverTool(
                tooltips=[
                    ("setup", "@setup"),
                    (first[1], f"@{first[0]}{{0.000}}"),
                    (second[1], f"@{second[0]}{{0.000}}"),
                ]
            )
        )
        chart.yaxis.axis_label = y_label
        chart.xaxis.major_label_orientation = 0.6
        return chart

    def _curve_figure(self, title: str, ys: str, point_column: str, y_label: str):
        """One line per mode / criterion / scope / pattern, a marker at every measured point, the legend below."""
        chart = figure(title=title, height=HEIGHT + 80, width=WIDTH, toolbar_location=None, x_range=Range1d(-0.02, 1.0))
        lines = chart.multi_line(xs="xs", ys=ys, line_color="color", line_width=2, source=self.curves)
        points = chart.scatter(
            x="x", y=point_column, color="color", marker="marker", size=8, line_color="white", source=self.points
        )
        legend = Legend(
            items=[LegendItem(label=field("label"), renderers=[lines])],
            border_line_alpha=0,
            label_text_font_size="11px",
            label_height=12,
            glyph_height=12,
            spacing=0,
            padding=4,
        )
        chart.add_layout(legend, "below")
        chart.add_tools(
            HoverTool(
                renderers=[points],
                tooltips=[("setup", "@setup"), ("sparsity", "@x{0%}"), (y_label, f"@{point_column}{{0.000}}")],
            )
        )
        chart.xaxis.axis_label = "sparsity of the prunable weights"
        chart.yaxis.axis_label = y_label
        return chart


class LayerChart:
    """Per-layer sparsity over the model's depth, coloured by layer role (q/k/v/o, MLP...)."""

    def __init__(self) -> None:
        self.source = ColumnDataSource(_layer_bars(pd.DataFrame(), "sparsity"))
        self.figure = _layer_figure("Sparsity of each layer, in model order", "share of zero weights", self.source)
        self.figure.y_range = Range1d(0, 1.02)

    def update(self, table: pd.DataFrame) -> None:
        """Show a ``Session.layer_table()`` DataFrame."""
        self.source.data = _layer_bars(table, "sparsity")


def report_html(
    history: pd.DataFrame, layers: pd.DataFrame | None = None, title: str = "jupyter_sparsify report"
) -> str:
    """A standalone HTML page: the charts (BokehJS inlined, works offline) and the results table."""
    charts = VariantCharts()
    charts.update(history)
    parts = [charts.layout()]
    if layers is not None and not layers.empty:
        layer_chart = LayerChart()
        layer_chart.update(layers)
        parts.append(layer_chart.figure)
    page = file_html(column(*parts), INLINE, title)
    table = history.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
    return page.replace("</body>", f"<h2>Results</h2>\n{table}\n</body>")


def write_report(path: str | Path, history: pd.DataFrame, layers: pd.DataFrame | None = None) -> Path:
    """Write :func:`report_html` to ``path`` (folders created); returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(history, layers), encoding="utf-8")
    return path


def _empty_bars() -> dict[str, list]:
    """The bars' columns: every history column (see ``HISTORY_COLUMNS``) and a colour."""
    return {"color": [], **{name: [] for name in HISTORY_COLUMNS}}


def _curve_groups(history: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per mode / criterion / scope / pattern: the latest row per setup, the latest dense row
    first (every line starts there), sorted by sparsity."""
    if history.empty:
        return []
    dense = history[history["mode"] == "dense"].tail(1)
    pruned = history[history["mode"] != "dense"].fillna({name: "" for name in CURVE_GROUP})
    groups = []
    for keys, group in pruned.groupby(CURVE_GROUP, sort=False):
        latest = group.drop_duplicates("setup", keep="last")
        groups.append((" ".join(k for k in keys if k), pd.concat([dense, latest]).sort_values("sparsity_prunable")))
    return groups


def _curves(history: pd.DataFrame) -> dict[str, list]:
    """One line per :func:`_curve_groups` group, each its own colour."""
    data: dict[str, list] = {"xs": [], "ys_top1": [], "ys_size": [], "color": [], "label": []}
    for index, (label, group) in enumerate(_curve_groups(history)):
        data["xs"].append(group["sparsity_prunable"].tolist())
        data["ys_top1"].append(group["top1_match"].tolist())
        data["ys_size"].append(group["size_mb"].tolist())
        data["color"].append(Category10_10[index % 10])
        data["label"].append(label)
    return data


def _points(history: pd.DataFrame) -> dict[str, list]:
    """The measured points of every line, in its colour: the dense one a grey square, the others circles."""
    data: dict[str, list] = {"x": [], "top1": [], "size": [], "color": [], "marker": [], "setup": [], "label": []}
    groups = _curve_groups(history)
    if not groups and not history.empty:  # nothing pruned yet: the dense point alone
        groups = [("dense", history[history["mode"] == "dense"].tail(1))]
    for index, (label, group) in enumerate(groups):
        dense = (group["mode"] == "dense").tolist()
        data["x"] += group["sparsity_prunable"].tolist()
        data["top1"] += group["top1_match"].tolist()
        data["size"] += group["size_mb"].tolist()
        data["color"] += [MODE_COLORS["dense"] if d else Category10_10[index % 10] for d in dense]
        data["marker"] += ["square" if d else "circle" for d in dense]
        data["setup"] += group["setup"].tolist()
        data["label"] += [label] * len(group)
    return data


def sensitivity_figure(table: pd.DataFrame):
    """Bars of the top-1 drop when each layer alone is pruned (from :func:`~jupyter_sparsify.sweeps.sensitivity`)."""
    ordered = table.sort_values(["block", "name"], na_position="first", kind="stable") if not table.empty else table
    source = ColumnDataSource(_layer_bars(ordered, "top1_drop"))
    return _layer_figure("Top-1 drop when this layer alone is pruned", "1 − top-1 agreement", source)


def mask_figure(name: str, density: np.ndarray):
    """A layer's mask as an image (from ``Session.mask_density``): black where weights are kept, white where
    pruned, grey for the share kept in a block when the matrix is downsampled to fit."""
    view = LayerView()
    view.show_mask(name, density)
    return view.mask


class LayerView:
    """Inside one layer: its mask as an image and a histogram of the criterion's scores, kept vs pruned, with
    the threshold that separated them. Updated in place, like the other charts."""

    def __init__(self) -> None:
        self.mask_source = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self.mask = figure(
            title="mask",
            height=HEIGHT + 60,
            width=WIDTH + 80,
            x_range=Range1d(0, 1),
            y_range=Range1d(1, 0),  # row 0 at the top, as the matrix is printed
            toolbar_location=None,
        )
        colors = LinearColorMapper(palette=Greys256[::-1], low=0.0, high=1.0)  # kept (1) black, pruned (0) white
        self.mask.image(image="image", x="x", y="y", dw="dw", dh="dh", color_mapper=colors, source=self.mask_source)
        self.histogram_source = ColumnDataSource({"left": [], "right": [], "pruned": [], "total": []})
        self.threshold_source = ColumnDataSource({"x": [], "y": []})
        self.histogram = self._histogram_figure()

    def layout(self):
        """The mask beside the histogram."""
        return row(self.mask, self.histogram)

    def show_mask(self, name: str, density: np.ndarray, shape: tuple[int, int] | None = None) -> None:
        """Draw ``density`` (``Session.mask_density``: share kept per block, rows = outputs) over the weight
        matrix's ``shape`` (axes in rows and columns), or over the blocks when the shape is not given."""
        rows, columns = shape or density.shape
        # Array row 0 sits at y = 0, which the reversed y range puts at the top.
        self.mask_source.data = {"image": [density], "x": [0], "y": [0], "dw": [columns], "dh": [rows]}
        self.mask.x_range.update(start=0, end=columns)
        self.mask.y_range.update(start=rows, end=0)
        self.mask.title.text = f"{name}: kept black, pruned white"
        blocks = "" if shape else ", or blocks of them"  # without the shape the axes count the image's pixels
        self.mask.xaxis.axis_label = f"input (columns{blocks})"
        self.mask.yaxis.axis_label = f"output (rows{blocks})"

    def show_scores(self, label: str, scores: np.ndarray, kept: np.ndarray, grouping: Grouping) -> None:
        """Histogram of ``scores`` (``Session.layer_scores``) split into kept and pruned, and the threshold line
        (``grouping``: how the mask was chosen, see :func:`score_threshold`)."""
        self.histogram_source.data = _score_histogram(scores, kept)
        threshold, name = score_threshold(scores, kept, grouping)
        top = max(self.histogram_source.data["total"], default=0)
        self.threshold_source.data = (
            {"x": [threshold] * 2, "y": [0, top]} if threshold is not None else {"x": [], "y": []}
        )
        self.threshold_item.label = value(name)
        self.histogram.xaxis.axis_label = f"score: {label}"

    def _histogram_figure(self):
        chart = figure(
            title="Scores of this layer's dense weights", height=HEIGHT + 60, width=WIDTH, toolbar_location=None
        )
        chart.y_range.start = 0
        pruned = chart.quad(
            left="left", right="right", bottom=0, top="pruned", color=PRUNED_COLOR, source=self.histogram_source
        )
        kept = chart.quad(
            left="left", right="right", bottom="pruned", top="total", color=KEPT_COLOR, source=self.histogram_source
        )
        line = chart.line(
            x="x", y="y", line_color="#d62728", line_dash="dashed", line_width=2, source=self.threshold_source
        )
        self.threshold_item = LegendItem(label="threshold", renderers=[line])
        items = [LegendItem(label="pruned", renderers=[pruned]), LegendItem(label="kept", renderers=[kept])]
        legend = Legend(items=[*items, self.threshold_item], orientation="horizontal", border_line_alpha=0)
        chart.add_layout(legend, "above")  # off the bars
        chart.add_tools(
            HoverTool(renderers=[kept], tooltips=[("score", "@left{0.000}–@right{0.000}"), ("weights", "@total")])
        )
        chart.yaxis.axis_label = "weights"
        return chart


def score_threshold(scores: np.ndarray, kept: np.ndarray, grouping: Grouping) -> tuple[float | None, str]:
    """The threshold that separated pruned from kept scores, and its legend label.

    ``grouping`` says how the mask was chosen: ``"layer"`` (one threshold; with scope ``global`` the model's,
    seen in this layer), ``"row"`` (one per output row), ``(n, m)`` (one per group of m inputs) or ``None`` (not
    by these scores, e.g. SparseGPT). A threshold is the highest pruned score of its group; for rows and groups
    the median over them is returned.
    """
    if kept.all():
        return None, "nothing pruned"
    if grouping is None:
        return None, "no threshold on this score"
    if grouping == "layer":
        return float(scores[~kept].max()), "threshold"
    width = grouping[1] if isinstance(grouping, tuple) else scores.shape[-1]
    pruned_scores = np.where(kept, -np.inf, scores).reshape(-1, width)
    highest = pruned_scores.max(axis=1)
    name = "median row threshold" if grouping == "row" else f"median threshold of the groups of {width}"
    return float(np.median(highest[np.isfinite(highest)])), name


def _score_histogram(scores: np.ndarray, kept: np.ndarray) -> dict[str, list]:
    """Counts of pruned and of all weights in equal bins from 0 to the 99.9th percentile (the rest in the last)."""
    top = float(np.quantile(scores, 0.999)) or float(scores.max()) or 1.0
    edges = np.linspace(0.0, top, HISTOGRAM_BINS + 1)
    clipped = np.minimum(scores, top)
    pruned, _ = np.histogram(clipped[~kept], bins=edges)
    total, _ = np.histogram(clipped, bins=edges)
    return {
        "left": edges[:-1].tolist(),
        "right": edges[1:].tolist(),
        "pruned": pruned.tolist(),
        "total": total.tolist(),
    }


def _layer_bars(table: pd.DataFrame, value_column: str) -> dict[str, list]:
    """Bar data for one value per layer, in table order, coloured by the layer's role."""
    if table.empty:
        return {"position": [], "value": [], "name": [], "role": [], "color": []}
    palette = {role: Category10_10[i % 10] for i, role in enumerate(dict.fromkeys(table["role"]))}
    return {
        "position": list(range(len(table))),
        "value": table[value_column].tolist(),
        "name": table["name"].tolist(),
        "role": table["role"].tolist(),
        "color": [palette[role] for role in table["role"]],
    }


def _layer_figure(title: str, y_label: str, source: ColumnDataSource):
    chart = figure(title=title, height=HEIGHT, width=2 * WIDTH, toolbar_location=None)
    chart.vbar(x="position", top="value", width=0.9, color="color", legend_field="role", source=source)
    chart.add_tools(HoverTool(tooltips=[("layer", "@name"), (y_label, "@value{0.0%}")]))
    chart.xaxis.axis_label = "layer (input side → output side)"
    chart.yaxis.axis_label = y_label
    chart.add_layout(chart.legend[0], "right")  # beside the plot: never over the bars
    chart.legend.border_line_alpha = 0
    return chart

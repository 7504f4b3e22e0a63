"""Bokeh charts fed from a session's history and layer tables; updated in place.

Every chart reads a ``ColumnDataSource``; ``update`` assigns new ``data`` so that a chart on
screen (through jupyter_bokeh) changes without being re-rendered.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from bokeh.embed import file_html
from bokeh.layouts import column, gridplot
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    FactorRange,
    HoverTool,
    Label,
    Legend,
    LegendItem,
    Range1d,
    Span,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from bokeh.resources import INLINE

BAR_WIDTH = 0.8
HEIGHT = 260
WIDTH = 420
MODE_COLORS = {"dense": "#4d4d4d", "masked": "#1f77b4", "csr": "#d62728"}


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
        self.curves = ColumnDataSource({"xs": [], "ys_top1": [], "ys_size": [], "color": [], "label": []})
        self.points = ColumnDataSource({"x": [], "top1": [], "size": [], "color": [], "setup": []})
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
            y=40,  # below the legend
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
        self.points.data = {
            "x": history["sparsity_prunable"].tolist() if not history.empty else [],
            "top1": history["top1_match"].tolist() if not history.empty else [],
            "size": history["size_mb"].tolist() if not history.empty else [],
            "color": [MODE_COLORS.get(m, "#7f7f7f") for m in history["mode"]] if not history.empty else [],
            "setup": history["setup"].tolist() if not history.empty else [],
        }

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
        for offset, (field, label), color in ((-0.2, first, "#9ecae1"), (0.2, second, "#08519c")):
            renderer = chart.vbar(
                x=dodge("setup", offset, range=chart.x_range), top=field, width=0.38, color=color, source=self.bars
            )
            items.append(LegendItem(label=label, renderers=[renderer]))
        chart.add_layout(
            Legend(items=items, location="top_center", orientation="horizontal", background_fill_alpha=0.6)
        )
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
        chart = figure(title=title, height=HEIGHT, width=WIDTH, toolbar_location=None, x_range=Range1d(-0.02, 1.0))
        chart.multi_line(xs="xs", ys=ys, line_color="color", line_width=2, legend_field="label", source=self.curves)
        chart.legend.location = "bottom_left" if point_column == "top1" else "top_left"
        chart.legend.background_fill_alpha = 0.6
        chart.scatter(x="x", y=point_column, color="color", size=7, source=self.points)
        chart.add_tools(
            HoverTool(tooltips=[("setup", "@setup"), ("sparsity", "@x{0%}"), (y_label, f"@{point_column}{{0.000}}")])
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
    return {
        "setup": [],
        "color": [],
        "size_mb": [],
        "top1_match": [],
        "compute_ratio": [],
        "executed_ratio": [],
        "prefill_speedup": [],
        "decode_speedup": [],
    }


def _curves(history: pd.DataFrame) -> dict[str, list]:
    """One line per (mode, criterion, pattern) group, points sorted by sparsity."""
    data: dict[str, list] = {"xs": [], "ys_top1": [], "ys_size": [], "color": [], "label": []}
    if history.empty:
        return data
    dense = history[history["mode"] == "dense"].tail(1)
    pruned = history[history["mode"] != "dense"].fillna({"pattern": ""})
    for (mode, criterion, pattern), group in pruned.groupby(["mode", "criterion", "pattern"], sort=False):
        group = pd.concat([dense, group]).sort_values("sparsity_prunable")
        data["xs"].append(group["sparsity_prunable"].tolist())
        data["ys_top1"].append(group["top1_match"].tolist())
        data["ys_size"].append(group["size_mb"].tolist())
        data["color"].append(Category10_10[len(data["label"]) % 10])
        data["label"].append(" ".join(part for part in (mode, criterion, pattern) if part))
    return data


def sensitivity_figure(table: pd.DataFrame):
    """Bars of the top-1 drop when each layer alone is pruned (from ``Session.sensitivity``)."""
    ordered = table.sort_values(["block", "name"], na_position="first", kind="stable") if not table.empty else table
    source = ColumnDataSource(_layer_bars(ordered, "top1_drop"))
    return _layer_figure("Top-1 drop when this layer alone is pruned", "1 − top-1 agreement", source)


def mask_figure(name: str, density):
    """A layer's mask as an image (from ``Session.mask_density``): black where weights are kept, white where
    pruned, grey for the share kept in a block when the matrix is downsampled to fit."""
    rows, columns = density.shape
    chart = figure(
        title=f"{name}: kept weights (black) and pruned (white)",
        height=HEIGHT + 60,
        width=2 * WIDTH,
        x_range=Range1d(0, columns),
        y_range=Range1d(rows, 0),
        toolbar_location=None,
    )
    chart.image(image=[density[::-1]], x=0, y=rows, dw=columns, dh=rows, palette="Greys256", level="image")
    chart.xaxis.axis_label = "input (block of columns)"
    chart.yaxis.axis_label = "output (block of rows)"
    return chart


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
    chart.legend.orientation = "horizontal"
    chart.legend.location = "top_left"
    chart.legend.background_fill_alpha = 0.6
    return chart

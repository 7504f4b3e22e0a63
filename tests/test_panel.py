"""The panel's widgets driven from Python: controls, charts' data, table, errors, export."""

from __future__ import annotations

import numpy as np
import pytest
from bokeh.models import Legend

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.generation import side_by_side_html
from jupyter_sparsify.layers import weight_matrix
from jupyter_sparsify.panel import LAYERS_TAB, TABLE_OMITS, TOKENS_TAB, Panel
from jupyter_sparsify.scores import wanda_scores
from jupyter_sparsify.session import HISTORY_COLUMNS, Session

from helpers import state_checksum, tiny_model


@pytest.fixture
def panel(tokenizer, tmp_path):
    return Panel(Session(tiny_model("gpt2"), tokenizer), export_dir=tmp_path / "out")


def test_opening_measures_the_dense_baseline(panel):
    assert list(panel.session.history["setup"]) == ["Dense"]
    assert panel.charts.bars.data["setup"] == ["Dense"]
    assert "Dense" in panel.table.value


def test_the_slider_prunes_on_release_and_the_charts_follow(panel):
    panel.mode.value = "csr"
    panel.amount.value = 0.5  # one change event = one release
    session = panel.session
    assert session.settings.label == "CSR 50%"
    assert any(isinstance(m, CSRLinear) for m in session.model.modules())
    bars = panel.charts.bars.data
    assert bars["setup"] == ["Dense", "CSR 50%"]
    assert bars["top1_match"][1] == session.history["top1_match"].iloc[-1]
    assert bars["executed_ratio"][1] < 1.0
    assert panel.layer_chart.source.data["value"] and max(panel.layer_chart.source.data["value"]) > 0.3
    assert panel.charts.curves.data["xs"] == [[0.0, pytest.approx(0.5, abs=0.01)]]
    assert "CSR 50%" in panel.table.value and "CSR 50%" in panel.status.value
    assert panel.progress.bar_style == "success" and not panel.apply_button.disabled


def test_apply_with_a_pattern_and_reset(panel):
    before = state_checksum(panel.session.model)
    panel.pattern.value = "2:4"
    panel.apply_button.click()
    assert panel.session.settings.label == "Masked 2:4"
    panel.reset_button.click()
    assert state_checksum(panel.session.model) == before
    assert list(panel.session.history["setup"]) == ["Dense", "Masked 2:4", "Dense"]


def test_the_reconstruct_checkbox_reaches_the_session_and_gets_its_own_curve(panel):
    panel.session.set_calibration_texts(["The valley is quiet and the river bends.", "Sparse kernels need zeros."] * 3)
    panel.criterion.value, panel.scope.value = "wanda", "row"
    panel.amount.value = 0.5
    panel.reconstruct.value = True
    panel.apply_button.click()
    assert panel.session.settings.reconstruct and list(panel.session.history["criterion"]) == [
        "",
        "wanda",
        "wanda+recon",
    ]
    assert len(panel.charts.curves.data["xs"]) == 2 and "+recon" in panel.table.value


def test_a_failure_shows_in_the_panel_and_changes_nothing(panel):
    panel.amount.value = 0.3
    before = state_checksum(panel.session.model)
    panel.reconstruct.value = True  # block reconstruction with magnitude, which has no calibration
    panel.apply_button.click()
    assert "calibrates block by block" in panel.errors.outputs[0]["text"]
    assert panel.status.value.startswith("Failed") and panel.progress.bar_style == "danger"
    assert state_checksum(panel.session.model) == before
    assert not panel.apply_button.disabled


def test_a_failure_while_measuring_puts_the_model_back_and_says_so(panel, monkeypatch):
    panel.amount.value = 0.4
    before = state_checksum(panel.session.model)

    def broken_measure(**_):
        raise RuntimeError("measuring broke")

    monkeypatch.setattr(panel.session, "measure", broken_measure)
    panel.amount.value = 0.5  # the apply itself succeeds, then the measurement fails
    assert panel.session.settings.label == "Masked 40%" and state_checksum(panel.session.model) == before
    assert panel.status.value == "Failed: measuring broke (the model is now: Masked 40%)"


def test_the_scope_follows_the_criterion(panel):
    assert panel.scope.options == ("global", "layer", "row") and panel.scope.value == "global"
    panel.criterion.value = "sparsegpt"
    assert panel.scope.options == ("row", "layer") and panel.scope.value == "row"  # no global: it has none
    panel.criterion.value = "wanda"
    assert panel.scope.value == "row" and "global" in panel.scope.options
    panel.reconstruct.value = True
    assert panel.calibration.value == "sequential"  # reconstruction needs it


def test_export_writes_report_and_csv(panel, tmp_path):
    panel.amount.value = 0.5
    panel.export_button.click()
    report, csv = tmp_path / "out" / "report.html", tmp_path / "out" / "history.csv"
    assert report.exists() and csv.exists() and str(report.resolve()) in panel.status.value
    text = report.read_text()
    assert "Masked 50%" in text and "Bokeh" in text and "cdn.bokeh.org" not in text


def test_the_generate_tab_runs_the_prompt_and_runs_it_again_after_each_apply(panel, monkeypatch):
    assert panel.tabs.titles == ("Variants", "Layers", "Generate", "Tokens")
    panel.amount.value = 0.5  # before any prompt was run: no generation
    assert "Press Generate" in panel.generation.value
    runs = []
    real = panel.session.generate
    monkeypatch.setattr(panel.session, "generate", lambda *args, **kwargs: runs.append(args) or real(*args, **kwargs))
    panel.prompt.value = "The valley is quiet"
    panel.generate_button.click()
    first = panel.generation.value
    assert first.count("<mark>") == 2 and "dense" in first and "variant" in first
    assert panel.status.value.startswith("Generated 8 tokens with Masked 50% and dense")
    panel.amount.value = 0.9
    assert len(runs) == 2 and runs[-1] == ("The valley is quiet",)  # run again after the apply
    assert panel.generation.value == side_by_side_html(real("The valley is quiet", max_new_tokens=8))


def test_the_tokens_tab_shows_every_counted_token(panel):
    panel.amount.value = 0.5
    panel.tabs.selected_index = TOKENS_TAB
    row = panel.session.history.iloc[-1]
    assert panel.tokens_view.value.count("<span") == row["eval_tokens"]
    assert f"{round(row['top1_match'] * row['eval_tokens'])} of {row['eval_tokens']}" in panel.tokens_view.value


def test_charts_a_student_reads_at_a_glance(panel):
    charts = panel.charts
    assert charts.trade_size.y_range.start == 0  # the size curve starts at 0: a flat line looks flat
    assert charts.speed_hint.visible and "measure latency" in charts.speed_hint.text  # nothing timed yet
    panel.latency.value = True
    panel.amount.value = 0.5
    assert not charts.speed_hint.visible  # a timed row: the hint gives way to the bars


def _shown_layer(panel) -> tuple[np.ndarray, dict]:
    """The mask image and the histogram as the Layers tab's Bokeh sources hold them."""
    image = np.asarray(panel.layer_view.mask_source.data["image"][0])
    return image, panel.layer_view.histogram_source.data


def test_the_layers_tab_shows_the_first_layer_dense_then_its_mask_and_threshold(panel):
    names = list(panel.session.layer_table()["name"])
    assert panel.tabs.children[LAYERS_TAB].children[1] is panel.layer_select
    assert list(panel.layer_select.options) == names and panel.layer_select.value == names[0]
    image, histogram = _shown_layer(panel)
    assert image.min() == 1.0 and sum(histogram["pruned"]) == 0  # dense: every weight kept
    assert panel.layer_view.threshold_source.data["x"] == []  # nothing pruned: no threshold line
    panel.amount.value = 0.5  # magnitude, global scope
    name, _, scores, kept = panel.session.layer_scores(names[0])
    image, histogram = _shown_layer(panel)
    assert image.mean() == pytest.approx(kept.mean()) and 0.0 < image.mean() < 1.0  # 64 x 64 fits: one pixel per weight
    assert sum(histogram["total"]) == kept.size and sum(histogram["pruned"]) == (~kept).sum()
    threshold = panel.layer_view.threshold_source.data["x"][0]
    assert scores[~kept].max() == threshold <= scores[kept].min()  # |W| of the dense weights: one cut
    assert panel.layer_view.threshold_item.label["value"] == "threshold"
    assert panel.layer_view.histogram.xaxis.axis_label == "score: |W|" and name in panel.layer_view.mask.title.text


def test_picking_another_layer_draws_it_and_the_choice_survives_an_apply(panel):
    panel.amount.value = 0.3
    wide = next(name for name in panel.layer_select.options if name.endswith("mlp.c_proj"))  # GPT-2: [64, 256]
    panel.layer_select.value = wide
    image, _ = _shown_layer(panel)
    assert image.shape == (64, 256) and wide in panel.layer_view.mask.title.text
    assert panel.status.value.startswith(f"Layer {wide}: ") and "pruned" in panel.status.value
    panel.amount.value = 0.7
    _, _, _, kept = panel.session.layer_scores(wide)
    assert panel.layer_select.value == wide and _shown_layer(panel)[0].mean() == pytest.approx(kept.mean())


def test_the_scores_follow_the_criterion_and_the_threshold_its_grouping(panel):
    session = panel.session
    session.set_calibration_texts(["The valley is quiet and the river bends.", "Sparse kernels need zeros."] * 3)
    panel.criterion.value = "wanda"  # scope row
    panel.amount.value = 0.5
    name, label, scores, kept = session.layer_scores()
    layer = next(item for item in session.default_layers if item.name == name)
    with session.dense_view():
        dense = weight_matrix(layer.module).detach().clone()
    norm = session._calibration.norms([(name, layer.module)])[name]
    assert "‖X‖" in label and np.allclose(scores, wanda_scores(dense, norm).numpy())
    assert panel.layer_view.threshold_item.label["value"] == "median row threshold"
    row_cuts = [scores[r][~kept[r]].max() for r in range(kept.shape[0])]
    assert panel.layer_view.threshold_source.data["x"][0] == pytest.approx(float(np.median(row_cuts)))
    panel.pattern.value = "2:4"
    panel.apply_button.click()
    assert panel.layer_view.threshold_item.label["value"] == "median threshold of the groups of 4"
    assert (_shown_layer(panel)[0].reshape(-1, 4).sum(axis=1) == 2).all()  # two kept in every four
    panel.pattern.value, panel.criterion.value = "unstructured", "sparsegpt"
    panel.apply_button.click()
    assert "Hessian" in session.layer_scores()[1]  # a Wanda-like view, labelled as such
    assert panel.layer_view.threshold_source.data["x"] == []  # SparseGPT does not cut these scores


def test_a_reloaded_page_and_a_second_display_get_the_charts_as_they_are_now(panel):
    charts = panel._bokeh[0]  # the Variants tab
    assert "Masked 50%" not in charts.get_state()["render_bundle"]
    panel.amount.value = 0.5
    assert "Masked 50%" not in str(charts.render_bundle)  # jupyter_bokeh keeps the document as built...
    assert "Masked 50%" in charts.get_state()["render_bundle"]  # ...a page asking for the state gets it as now
    assert "render_bundle" not in charts.get_state(key="layout")  # other state requests are untouched
    panel._repr_mimebundle_()  # displayed again
    assert "Masked 50%" in str(charts.render_bundle)
    layer_view = panel._bokeh[2]
    assert "|W|" in str(layer_view.render_bundle)


def test_the_table_and_the_bars_take_their_columns_from_the_history(panel):
    headers = panel.table.value.split("<thead>")[1].split("</thead>")[0]
    shown = [name for name in HISTORY_COLUMNS if name not in TABLE_OMITS]
    assert [name for name in HISTORY_COLUMNS if f"<th>{name}</th>" in headers] == shown
    assert headers.count("<th>") == len(shown)
    assert set(HISTORY_COLUMNS) <= set(panel.charts.bars.data)
    charts = panel.charts
    for chart in (charts.size, charts.top1, charts.compute, charts.speed):
        for renderer in chart.renderers:
            assert renderer.glyph.top in HISTORY_COLUMNS  # a column name


def test_legends_sit_beside_the_plots_never_over_them(panel):
    figures = [
        panel.charts.size,
        panel.charts.top1,
        panel.charts.compute,
        panel.charts.speed,
        panel.charts.trade_top1,
        panel.charts.trade_size,
        panel.layer_chart.figure,
        panel.layer_view.mask,
        panel.layer_view.histogram,
    ]
    legends = 0
    for chart in figures:
        assert not [item for item in chart.center if isinstance(item, Legend)], chart.title.text
        legends += sum(isinstance(item, Legend) for item in chart.above + chart.below + chart.left + chart.right)
    assert legends == 6  # compute, speed, both trade-off curves, layer roles, histogram


def test_the_trade_off_curve_draws_one_line_per_variant_family_with_its_points(panel):
    for amount in (0.5, 0.7):  # magnitude, global
        panel.amount.value = amount
    panel.scope.value = "layer"
    panel.apply_button.click()  # magnitude layer 70 %: a line of its own
    panel.amount.value = 0.3
    curves, points = panel.charts.curves.data, panel.charts.points.data
    assert curves["label"] == ["masked magnitude global", "masked magnitude layer"]
    assert [len(xs) for xs in curves["xs"]] == [3, 3]  # dense + two measured points each
    assert curves["xs"][1] == sorted(curves["xs"][1]) and curves["color"][0] != curves["color"][1]
    assert len(points["x"]) == 6 and points["marker"].count("square") == 2  # the dense point starts each line
    assert points["setup"][3:] == ["Dense", "Masked 30% layer", "Masked 70% layer"]
    assert set(points["color"][4:]) == {curves["color"][1]}

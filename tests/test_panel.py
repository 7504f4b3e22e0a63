"""The panel's widgets driven from Python: controls, charts' data, table, errors, export."""

from __future__ import annotations

import pytest

from jupyter_sparsify.formats import CSRLinear
from jupyter_sparsify.generation import side_by_side_html
from jupyter_sparsify.panel import Panel
from jupyter_sparsify.session import Session

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


def test_a_failure_after_the_apply_says_what_state_the_model_is_in(panel, monkeypatch):
    def broken_measure(**_):
        raise RuntimeError("measuring broke")

    monkeypatch.setattr(panel.session, "measure", broken_measure)
    panel.amount.value = 0.5
    assert panel.session.settings.label == "Masked 50%"  # the apply itself succeeded
    assert panel.status.value == "Failed: measuring broke (the model is now: Masked 50%)"


def test_the_scope_follows_the_criterion(panel):
    assert panel.scope.options == ("global", "layer", "row") and panel.scope.value == "global"
    panel.criterion.value = "sparsegpt"
    assert panel.scope.options == ("row", "layer") and panel.scope.value == "row"  # no global: it has none
    panel.criterion.value = "wanda"
    assert panel.scope.value == "row" and "global" in panel.scope.options
    panel.reconstruct.value = True
    assert panel.calibration.value == "sequential"  # reconstruction needs it


def test_a_second_request_while_busy_is_refused(panel):
    panel._busy = True
    panel.apply_button.click()
    assert panel.status.value.startswith("Busy") and len(panel.session.history) == 1
    panel._busy = False


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
    panel.tabs.selected_index = 3
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

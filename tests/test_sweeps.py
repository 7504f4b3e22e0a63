"""Sweeps from Python: compare and sensitivity measure many variants and leave the model as it was."""

from __future__ import annotations

import pytest

from jupyter_sparsify.session import Session
from jupyter_sparsify.sweeps import compare, sensitivity

from helpers import state_checksum, tiny_model


@pytest.fixture
def session(tokenizer):
    session = Session(tiny_model("gpt_neox"), tokenizer)
    session.apply(0.4, mode="csr", progress=lambda *a: None)
    return session


def test_compare_measures_dense_then_the_grid_and_puts_the_variant_back(session):
    before = state_checksum(session.model)
    table = compare(session, [0, 0.5], ["masked", "csr"], scope="row", progress=lambda *a: None)
    assert list(table["setup"]) == ["Dense", "Masked 50% row", "CSR 50% row"]
    assert list(session.history["setup"])[-3:] == list(table["setup"])
    assert state_checksum(session.model) == before and session.settings.label == "CSR 40%"


def test_compare_refuses_a_bad_amount_before_measuring_anything(session):
    rows = len(session.history)
    with pytest.raises(ValueError, match="amount must be in"):
        compare(session, [0.5, float("nan")])
    assert len(session.history) == rows and session.settings.label == "CSR 40%"


def test_sensitivity_ranks_every_layer_without_recording_and_puts_the_variant_back(session):
    before, rows = state_checksum(session.model), len(session.history)
    table = sensitivity(session, 0.9, progress=lambda *a: None)
    assert sorted(table["name"]) == sorted(layer.name for layer in session.default_layers)
    assert list(table["top1_drop"]) == sorted(table["top1_drop"], reverse=True)
    assert len(session.history) == rows
    assert state_checksum(session.model) == before and session.settings.label == "CSR 40%"


def test_the_charts_of_an_untimed_compare_are_valid_bokeh(session, caplog):
    """Without latency the speedup columns hold NaN (they used to be missing: Bokeh's E-1001 BAD_COLUMN_NAME)."""
    from bokeh.document import Document

    from jupyter_sparsify.charts import VariantCharts

    charts = VariantCharts()
    charts.update(compare(session, [0, 0.5], ["masked"], progress=lambda *a: None))
    document = Document()
    document.add_root(charts.layout())
    with caplog.at_level("WARNING", logger="bokeh"):
        document.validate()
    assert "E-1001" not in caplog.text

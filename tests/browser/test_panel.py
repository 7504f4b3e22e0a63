"""End to end: examples/02_panel.ipynb in a real JupyterLab, driven by headless chromium.

Runs the example notebook (embedded SmolLM2-135M-Instruct + ``%sparsify panel``), checks the panel
renders, prunes to Masked 50 % from the browser and checks the new top-1 agreement reaches the page's
Bokeh data and the results table, then resets. Saves a screenshot of the panel (also to
``$JUPYTER_SPARSIFY_DOCS_SCREENSHOT`` when set: the README's docs/panel.png).
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, expect

from .jupyterlab import (
    console_messages,
    describe_notebook,
    error_outputs,
    headless_chromium,
    open_notebook,
    poll_until,
    run_all_and_wait,
    running_jupyterlab,
    set_slider,
    wait_for_bokeh_data,
)

pytestmark = pytest.mark.browser

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "02_panel.ipynb"
TIMEOUT_MS = 180_000
APPLY_TIMEOUT_S = 300  # prune + measure on a noisy 2-core machine
VIEWPORT = {"width": 1400, "height": 1000}


def _bars(sources: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
    """The sources shaped like ``VariantCharts.bars`` (a setup and a top1_match column)."""
    return [s for s in sources if "setup" in s and "top1_match" in s]


def _only_dense(sources: list[dict[str, list[Any]]]) -> bool:
    return any(s["setup"] == ["Dense"] and s["top1_match"] == [1.0] for s in _bars(sources))


def _top1_of(sources: list[dict[str, list[Any]]], setup: str) -> float | None:
    for source in _bars(sources):
        if setup in source["setup"]:
            return source["top1_match"][source["setup"].index(setup)]
    return None


def _table_setups(table: Locator) -> list[str]:
    """The `setup` column (first cell of every body row) of the panel's history table."""
    return [t.strip() for t in table.locator("tbody tr td:first-child").all_inner_texts()]


def _wait_table_rows(page: Page, table: Locator, setup: str, count: int, timeout_s: float) -> list[str]:
    """Wait until the history table holds `count` rows labelled `setup`; return its setups."""
    return poll_until(
        page,
        lambda: _table_setups(table),
        lambda setups: setups.count(setup) >= count,
        timeout_s,
        lambda setups: f"table never showed {count} row(s) {setup!r} within {timeout_s:.0f} s; it shows {setups}",
    )


def _screenshot_panel(page: Page, panel: Locator, paths: list[Path]) -> None:
    """Screenshot the panel's output area; grow the viewport so the whole panel fits."""
    panel.scroll_into_view_if_needed()
    box = panel.bounding_box()
    if box is not None and box["height"] + 200 > VIEWPORT["height"]:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": int(box["height"]) + 300})
        page.wait_for_timeout(500)  # let Lab and Bokeh re-layout
        panel.scroll_into_view_if_needed()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        panel.screenshot(path=path, animations="disabled")
    page.set_viewport_size(VIEWPORT)


def test_panel_prunes_and_updates_charts_in_jupyterlab(tmp_path: Path, screenshot_dir: Path) -> None:
    """Open the panel, prune to Masked 50 % in the browser, see it in the charts and table, reset."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    shots = [screenshot_dir / "test_panel.png"]
    if os.environ.get("JUPYTER_SPARSIFY_DOCS_SCREENSHOT"):
        shots.append(Path(os.environ["JUPYTER_SPARSIFY_DOCS_SCREENSHOT"]))
    shot_taken = False

    with running_jupyterlab(root) as lab, headless_chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        console = console_messages(page)

        def context() -> str:
            return f"{describe_notebook(page)}\nconsole: {console}"

        try:
            open_notebook(page, lab, NOTEBOOK.name)
            page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # room for the panel
            run_all_and_wait(page, timeout_s=600)
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            # -- the panel rendered ------------------------------------------------------
            slider = page.locator("div.widget-slider.widget-hslider", has_text="Sparsity")
            panel = page.locator(".jp-OutputArea", has=slider)
            apply_button = panel.locator("button.jupyter-button", has_text="Apply")
            reset_button = panel.locator("button.jupyter-button", has_text="Reset")
            export_button = panel.locator("button.jupyter-button", has_text="Export")
            masked = panel.locator(".widget-toggle-buttons button", has_text="Masked")
            canvas = panel.locator("div.bk-Canvas canvas").first  # inside Bokeh's shadow root
            table = panel.locator("div.widget-html table.jupyter-sparsify-table")
            status = panel.locator("div.widget-label", has_text="top-1 agreement")
            for what, locator in (
                ("Sparsity slider", slider),
                ("Apply button", apply_button),
                ("Reset button", reset_button),
                ("Export button", export_button),
                ("Masked mode button", masked),
                ("Bokeh canvas", canvas),
                ("history table", table),
            ):
                try:
                    expect(locator).to_be_visible(timeout=TIMEOUT_MS)
                except AssertionError as exc:
                    raise AssertionError(f"{what} not rendered\n{context()}") from exc
            # The static snapshot beside the live panel is hidden by the panel's <style>.
            expect(page.locator(".jupyter-sparsify-static")).to_be_hidden()
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            # -- the dense baseline reached the page ---------------------------------------
            wait_for_bokeh_data(
                page, _only_dense, timeout_s=APPLY_TIMEOUT_S, what='the dense bar (setup ["Dense"], top1_match [1.0])'
            )
            assert _table_setups(table) == ["Dense"], context()

            # -- prune to Masked 50 % from the browser --------------------------------------
            masked.click()  # already the default; clicking keeps it selected
            expect(masked).to_have_class(re.compile(r"(^|\s)mod-active(\s|$)"))
            set_slider(slider, 0.5)  # typed into the readout; waits for aria-valuenow == 0.5
            expect(slider.locator(".widget-readout")).to_have_text("50%")
            # Releasing the slider (here: the readout's Enter) applies the pruning in the kernel.
            sources = wait_for_bokeh_data(
                page,
                lambda s: _top1_of(s, "Masked 50%") is not None,
                timeout_s=APPLY_TIMEOUT_S,
                what='a bar "Masked 50%"',
            )
            top1 = _top1_of(sources, "Masked 50%")
            assert top1 is not None and 0.0 < top1 < 1.0, f"top-1 of Masked 50%: {top1}\n{sources}"
            _wait_table_rows(page, table, "Masked 50%", 1, APPLY_TIMEOUT_S)
            expect(status).to_contain_text("Masked 50%", timeout=APPLY_TIMEOUT_S * 1000)
            expect(panel.locator(".widget-output")).to_have_text("")  # the panel's error area
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            expect(apply_button).to_be_enabled(timeout=APPLY_TIMEOUT_S * 1000)  # work finished
            page.wait_for_timeout(500)  # let the last chart update paint
            _screenshot_panel(page, panel, shots)
            shot_taken = True

            # -- reset: a new dense measurement ----------------------------------------------
            expect(reset_button).to_be_enabled(timeout=APPLY_TIMEOUT_S * 1000)
            reset_button.click()
            setups = _wait_table_rows(page, table, "Dense", 2, APPLY_TIMEOUT_S)
            assert setups == ["Dense", "Masked 50%", "Dense"], f"{setups}\n{context()}"
            expect(status).to_contain_text("Dense", timeout=APPLY_TIMEOUT_S * 1000)
            # The bars keep one bar per setup (the latest): Dense back at 1.0, Masked 50% kept.
            wait_for_bokeh_data(
                page,
                lambda s: _top1_of(s, "Dense") == 1.0 and _top1_of(s, "Masked 50%") == top1,
                timeout_s=60,
                what="Dense and Masked 50% bars after Reset",
            )
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"
        finally:
            if not shot_taken:  # for debugging a failure: whatever the page showed
                with suppress(PlaywrightError):
                    page.screenshot(path=screenshot_dir / "test_panel_failure.png", full_page=True)

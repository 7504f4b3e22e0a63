"""Prove the browser harness on a tiny ipywidgets + Bokeh notebook written at test time."""

import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import nbformat
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from .jupyterlab import (
    cell_outputs_text,
    console_messages,
    describe_notebook,
    error_outputs,
    headless_chromium,
    open_notebook,
    run_all_and_wait,
    running_jupyterlab,
    set_slider,
    wait_for_bokeh_data,
)

pytestmark = pytest.mark.browser

TIMEOUT_MS = 120_000

SETUP_CELL = """\
import sys
print(sys.prefix)
from bokeh.io import output_notebook
from bokeh.resources import INLINE
output_notebook(resources=INLINE, hide_banner=True)"""

PANEL_CELL = """\
import ipywidgets as widgets
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure
from jupyter_bokeh.widgets import BokehModel

source = ColumnDataSource(data={"x": [0, 1, 2], "y": [0, 0, 0]})
fig = figure(width=400, height=250, title="harness demo")
fig.line("x", "y", source=source)
slider = widgets.IntSlider(value=1, min=0, max=10, description="level")
button = widgets.Button(description="Apply")

def on_click(_):
    source.data = {"x": [0, 1, 2], "y": [slider.value] * 3}

button.on_click(on_click)
widgets.VBox([slider, button, BokehModel(fig)])"""


def write_demo_notebook(path: Path) -> None:
    """Write the demo notebook (setup cell, then the widget panel) to `path`."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(SETUP_CELL), nbformat.v4.new_code_cell(PANEL_CELL)]
    nbformat.write(nb, path)


def has_y(expected: list[int]) -> Callable[[list[dict[str, Any]]], bool]:
    """Predicate for `wait_for_bokeh_data`: some source's "y" column equals `expected`."""
    return lambda sources: any(source.get("y") == expected for source in sources)


def test_widgets_and_bokeh_update_in_jupyterlab(tmp_path: Path, screenshot_dir: Path) -> None:
    """Run the demo in Lab; slider + button must push new data into the page's Bokeh chart."""
    write_demo_notebook(tmp_path / "demo.ipynb")
    with running_jupyterlab(tmp_path) as lab, headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        console = console_messages(page)
        try:
            open_notebook(page, lab, "demo.ipynb")
            run_all_and_wait(page, timeout_s=300)
            kernel_prefix = cell_outputs_text(page)[0].strip()
            assert kernel_prefix == sys.prefix, f"kernel runs in {kernel_prefix!r}, not {sys.prefix!r}"

            slider = page.locator("div.widget-slider.widget-hslider")
            button = page.locator("button.jupyter-button", has_text="Apply")
            canvas = page.locator("div.bk-Canvas canvas").first  # inside Bokeh's shadow root
            for what, locator in (("slider", slider), ("button", button), ("Bokeh canvas", canvas)):
                try:
                    expect(locator).to_be_visible(timeout=TIMEOUT_MS)
                except AssertionError as exc:
                    raise AssertionError(f"{what} not rendered\n{describe_notebook(page)}\nconsole: {console}") from exc
            assert not error_outputs(page), f"{error_outputs(page)}\n{describe_notebook(page)}"
            wait_for_bokeh_data(page, has_y([0, 0, 0]), what="the initial y=[0, 0, 0]")

            set_slider(slider, 7)
            button.click()
            wait_for_bokeh_data(page, has_y([7, 7, 7]), what="y=[7, 7, 7] after the click")
            assert not error_outputs(page), f"{error_outputs(page)}\n{describe_notebook(page)}"
        finally:
            with suppress(PlaywrightError):
                page.screenshot(path=screenshot_dir / "test_harness.png", full_page=True)

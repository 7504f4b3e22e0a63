"""End to end: examples/02_panel.ipynb in a real JupyterLab, then in Jupyter Notebook 7, driven by headless
chromium.

Runs the example notebook in JupyterLab (embedded SmolLM2-135M-Instruct + ``%sparsify panel``), checks the
panel renders, runs a prompt in the Generate tab, prunes to Masked 50 % from the browser and checks that the
new top-1 agreement reaches the page's Bokeh data and the results table, that the generation was run again
and that the Layers tab's mask and histogram follow; resets, reloads the page and checks that the charts
show the latest rows. Then the same notebook (same server, same kernel) in Notebook 7: the panel cell run
again, a prompt, Masked 70 %, a reload. Saves a screenshot of the panel's Layers tab (also to
``$JUPYTER_SPARSIFY_DOCS_SCREENSHOT`` when set: the README's docs/panel.png).
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import suppress
from dataclasses import dataclass
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
    reload_notebook,
    run_all_and_wait,
    run_cell_and_wait,
    running_jupyterlab,
    save_notebook,
    set_slider,
    wait_for_bokeh_data,
)

pytestmark = pytest.mark.browser

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "02_panel.ipynb"
TIMEOUT_MS = 180_000
APPLY_TIMEOUT_S = 300  # prune + measure on a noisy 2-core machine
VIEWPORT = {"width": 1400, "height": 1000}
PANEL_CELL = 2  # %sparsify panel model tokenizer
PROMPTS = {"lab": "The river flows", "notebook": "My favourite food is"}


@dataclass(frozen=True)
class PanelView:
    """The panel's parts in the page."""

    page: Page
    root: Locator
    slider: Locator
    apply_button: Locator
    reset_button: Locator
    table: Locator

    @classmethod
    def find(cls, page: Page) -> PanelView:
        slider = page.locator("div.widget-slider.widget-hslider", has_text="Sparsity")
        root = page.locator(".jp-OutputArea", has=slider)
        return cls(
            page,
            root,
            slider,
            root.locator("button.jupyter-button", has_text="Apply"),
            root.locator("button.jupyter-button", has_text="Reset"),
            root.locator("div.widget-html table.jupyter-sparsify-table"),
        )

    def tab(self, title: str) -> None:
        """Show the tab called `title`."""
        self.root.locator(".lm-TabBar-tab", has_text=title).click()

    def generation(self) -> list[str]:
        """The Generate tab's two texts (dense, variant), prompt included, whitespace collapsed; [] before any run."""
        texts = self.root.locator(".jupyter-sparsify-generate p").all_text_contents()  # also while hidden
        return [" ".join(text.split()) for text in texts]


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
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
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


def _generate(view: PanelView, prompt: str) -> list[str]:
    """Type `prompt` in the Generate tab, run it, wait for both texts; returns them."""
    view.tab("Generate")
    view.root.locator("div.widget-text", has_text="Prompt").locator("input").fill(prompt)
    view.root.locator("button.jupyter-button", has_text="Generate").click()
    texts = poll_until(
        view.page,
        view.generation,
        lambda texts: len(texts) == 2 and all(text.startswith(prompt) and len(text) > len(prompt) for text in texts),
        APPLY_TIMEOUT_S,
        lambda texts: f"the Generate tab never showed two continuations of {prompt!r}; it shows {texts}",
    )
    return texts


def _apply(view: PanelView, amount: float, setup: str) -> float:
    """Prune to `amount` from the slider; wait until the bars and the table show `setup`; its top-1."""
    set_slider(view.slider, amount)  # typed into the readout, Enter: the release that applies
    sources = wait_for_bokeh_data(
        view.page, lambda s: _top1_of(s, setup) is not None, timeout_s=APPLY_TIMEOUT_S, what=f"a bar {setup!r}"
    )
    top1 = _top1_of(sources, setup)
    assert top1 is not None and 0.0 < top1 < 1.0, f"top-1 of {setup}: {top1}\n{sources}"
    _wait_table_rows(view.page, view.table, setup, 1, APPLY_TIMEOUT_S)
    expect(view.apply_button).to_be_enabled(timeout=APPLY_TIMEOUT_S * 1000)  # the work (and re-generation) done
    return top1


def _layer_pruned(sources: list[dict[str, list[Any]]]) -> bool:
    """The Layers tab shows a pruned layer: a mask image with white in it and a histogram with pruned weights."""
    masks = [s["image"][0] for s in sources if "image" in s and s["image"]]
    histograms = [s for s in sources if "pruned" in s and "total" in s]
    pruned_mask = any(sum(image) < len(image) for image in masks)
    return pruned_mask and any(sum(h["pruned"]) > 0 for h in histograms)


def _check_generation_and_layer_follow(view: PanelView, before: list[str], what: str) -> None:
    """After an apply: the prompt was run again (the variant's text changed) and the Layers tab shows pruning."""
    texts = poll_until(
        view.page,
        view.generation,
        lambda texts: len(texts) == 2 and texts[1] != before[1],
        60,
        lambda texts: f"the Generate tab did not change after {what}: before {before}, now {texts}",
    )
    assert texts[0] == before[0], f"the dense text changed after {what}: {before[0]!r} -> {texts[0]!r}"
    view.tab("Layers")
    wait_for_bokeh_data(
        view.page, _layer_pruned, timeout_s=60, what=f"the Layers tab's mask and histogram after {what}"
    )


def _check_after_reload(view: PanelView, expected: dict[str, float], generation: list[str], ui: str) -> None:
    """The reloaded page draws the charts, the table and the Generate tab as they are now."""
    expect(view.slider).to_be_visible(timeout=TIMEOUT_MS)
    wait_for_bokeh_data(
        view.page,
        lambda s: all(_top1_of(s, setup) == top1 for setup, top1 in expected.items()),
        timeout_s=120,
        what=f"the bars {expected} after reloading {ui}",
    )
    assert set(expected) <= set(_table_setups(view.table)), _table_setups(view.table)
    view.tab("Generate")
    assert view.generation() == generation, f"Generate tab after reloading {ui}: {view.generation()}"


def test_panel_in_jupyterlab_then_notebook_7(tmp_path: Path, screenshot_dir: Path) -> None:
    """JupyterLab: open the panel, generate, prune to Masked 50 %, see it everywhere, reset, reload.
    Notebook 7 (same server and kernel): the panel cell again, generate, Masked 70 %, reload."""
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
            view = PanelView.find(page)
            export_button = view.root.locator("button.jupyter-button", has_text="Export")
            masked = view.root.locator(".widget-toggle-buttons button", has_text="Masked")
            canvas = view.root.locator("div.bk-Canvas canvas").first  # inside Bokeh's shadow root
            status = view.root.locator("div.widget-label", has_text="top-1 agreement")
            for what, locator in (
                ("Sparsity slider", view.slider),
                ("Apply button", view.apply_button),
                ("Reset button", view.reset_button),
                ("Export button", export_button),
                ("Masked mode button", masked),
                ("Bokeh canvas", canvas),
                ("history table", view.table),
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
            assert _table_setups(view.table) == ["Dense"], context()

            # -- a prompt: dense and variant (still dense) say the same ----------------------
            dense_texts = _generate(view, PROMPTS["lab"])
            assert dense_texts[0] == dense_texts[1], f"the dense model differs from itself: {dense_texts}"

            # -- prune to Masked 50 % from the browser --------------------------------------
            view.tab("Variants")
            masked.click()  # already the default; clicking keeps it selected
            expect(masked).to_have_class(re.compile(r"(^|\s)mod-active(\s|$)"))
            top1 = _apply(view, 0.5, "Masked 50%")
            expect(view.slider.locator(".widget-readout")).to_have_text("50%")
            expect(status).to_contain_text("Masked 50%", timeout=APPLY_TIMEOUT_S * 1000)
            expect(view.root.locator(".widget-output")).to_have_text("")  # the panel's error area
            _check_generation_and_layer_follow(view, dense_texts, "Masked 50%")
            generation = view.generation()
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            page.wait_for_timeout(500)  # let the last chart update paint
            _screenshot_panel(page, view.root, shots)  # the Layers tab: mask image and scores
            shot_taken = True

            # -- reset: a new dense measurement ----------------------------------------------
            view.tab("Variants")
            view.reset_button.click()
            setups = _wait_table_rows(page, view.table, "Dense", 2, APPLY_TIMEOUT_S)
            assert setups == ["Dense", "Masked 50%", "Dense"], f"{setups}\n{context()}"
            expect(status).to_contain_text("Dense", timeout=APPLY_TIMEOUT_S * 1000)
            # The bars keep one bar per setup (the latest): Dense back at 1.0, Masked 50% kept.
            latest = {"Dense": 1.0, "Masked 50%": top1}
            wait_for_bokeh_data(
                page,
                lambda s: all(_top1_of(s, setup) == value for setup, value in latest.items()),
                timeout_s=60,
                what="Dense and Masked 50% bars after Reset",
            )
            expect(view.apply_button).to_be_enabled(timeout=APPLY_TIMEOUT_S * 1000)
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            # -- reload: the charts as they are now, not as the panel was built ----------------
            save_notebook(page)  # the widget outputs, so that the reloaded page shows the panel
            generation = view.generation()  # the reset ran the prompt again
            reload_notebook(page)
            _check_after_reload(view, latest, generation, "JupyterLab")
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"

            # -- Notebook 7: the same notebook and kernel -------------------------------------
            open_notebook(page, lab, NOTEBOOK.name, ui="notebook")
            _check_after_reload(view, latest, generation, "Notebook 7")
            run_cell_and_wait(page, PANEL_CELL)  # a new panel on the same session
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"
            texts = _generate(view, PROMPTS["notebook"])
            assert texts[0] == texts[1], f"after Reset the variant is dense again: {texts}"
            view.tab("Variants")
            top1_70 = _apply(view, 0.7, "Masked 70%")
            _check_generation_and_layer_follow(view, texts, "Masked 70%")
            save_notebook(page)
            generation = view.generation()
            reload_notebook(page)
            _check_after_reload(view, {**latest, "Masked 70%": top1_70}, generation, "Notebook 7")
            assert not error_outputs(page), f"{error_outputs(page)}\n{context()}"
        finally:
            if not shot_taken:  # for debugging a failure: whatever the page showed
                with suppress(PlaywrightError):
                    page.screenshot(path=screenshot_dir / "test_panel_failure.png", full_page=True)

"""Drive a real JupyterLab (and Jupyter Notebook 7, served by the same server) in headless chromium
(playwright) for end-to-end tests.

Usage::

    with running_jupyterlab(root) as lab, headless_chromium() as browser:
        page = browser.new_page()
        open_notebook(page, lab, "demo.ipynb")
        run_all_and_wait(page, timeout_s=300)
        assert not error_outputs(page), describe_notebook(page)

Any exception escaping ``running_jupyterlab`` gets the tail of the Lab server's log
attached as a note; the helpers' own timeouts report the notebook's cells and outputs.
See /work/shared/BROWSER_TESTING.md for the facts this module relies on.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psutil
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_NAME = "python3"

_DISABLED_PLUGINS = (
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension",
)
_USER_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/notebook-extension/tracker": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {
        "checkForUpdates": False,
        "fetchNews": "false",
    },
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# JS expression: the notebook panel opened by `open_notebook` (found by path, not focus).
_PANEL_JS = """(() => {
  const app = window.jupyterapp;
  if (!app) return null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.sessionContext && w.content
        && w.context.path === window.__harnessNotebookPath) return w;
  }
  return null;
})()"""

_NOTEBOOK_READY_JS = f"""() => {{
  const panel = {_PANEL_JS};
  return !!panel && panel.context.isReady && panel.content.widgets.length > 0;
}}"""

_KERNEL_IDLE_JS = f"""() => {{
  const panel = {_PANEL_JS};
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}}"""

_RUN_ALL_JS = f"""() => {{
  const app = window.jupyterapp;
  const panel = {_PANEL_JS};
  app.shell.activateById(panel.id);
  const state = {{done: false, ok: null, error: null}};
  window.__harnessRunAll = state;
  app.commands.execute('notebook:run-all-cells').then(
    ok => {{ state.done = true; state.ok = ok; }},
    err => {{ state.done = true; state.error = String(err); }});
}}"""

_RUN_CELL_JS = f"""index => {{
  const app = window.jupyterapp;
  const panel = {_PANEL_JS};
  app.shell.activateById(panel.id);
  panel.content.activeCellIndex = index;
  const state = {{done: false, ok: null, error: null}};
  window.__harnessRunAll = state;
  app.commands.execute('notebook:run-cell').then(
    ok => {{ state.done = true; state.ok = ok; }},
    err => {{ state.done = true; state.error = String(err); }});
}}"""

_SAVED_JS = f"""() => {{
  const panel = {_PANEL_JS};
  return !!panel && !panel.context.model.dirty;
}}"""

_RUN_ALL_FINISHED_JS = f"""() => {{
  const state = window.__harnessRunAll;
  const panel = {_PANEL_JS};
  if (!state || !state.done || !panel) return false;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const running = panel.content.widgets.some(
    c => c.model.type === 'code' && c.model.executionState === 'running');
  return !running && !!kernel && kernel.status === 'idle';
}}"""

_NOTEBOOK_STATE_JS = f"""() => {{
  const panel = {_PANEL_JS};
  if (!panel) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {{
    path: panel.context.path,
    kernel: kernel ? `${{kernel.name}} ${{kernel.connectionStatus}} ${{kernel.status}}` : 'none',
    run_all: window.__harnessRunAll || null,
    cells: panel.content.widgets.map(c => ({{
      type: c.model.type,
      source: c.model.sharedModel.getSource(),
      execution_count: c.model.type !== 'code' ? null
        : c.model.executionState === 'running' ? '*' : c.model.executionCount,
      outputs: c.model.type === 'code' ? c.model.outputs.toJSON() : [],
    }})),
  }};
}}"""

_BOKEH_SOURCES_JS = """() => {
  const plain = v => {
    if (v === null || typeof v !== 'object') return v;
    if (Array.isArray(v) || ArrayBuffer.isView(v)) return Array.from(v, plain);
    if (v instanceof Map) return Object.fromEntries([...v].map(([k, x]) => [k, plain(x)]));
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  };
  const out = [];
  for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
    for (const model of doc.all_models) {
      if (model.data !== undefined && typeof model.get_column === 'function') {
        out.push(plain(model.data));
      }
    }
  }
  return out;
}"""


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab server started by `running_jupyterlab`."""

    url: str  # base URL, ends with "/"
    token: str
    root_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def page_url(self, path: str = "lab") -> str:
        """URL of `path` (relative to the base URL) with the token, ready for `page.goto`."""
        return f"{self.url}{path}?token={self.token}"

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the server's combined stdout/stderr."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_jupyterlab(root_dir: Path, *, python: str = sys.executable) -> Iterator[LabServer]:
    """Start JupyterLab (offline, isolated dirs, kernel = `python`) serving `root_dir`.

    On exit, shut the server down and kill every process it started (kernels included),
    also when the body raised; exceptions from the body get the server log tail as a note.
    """
    python = os.path.abspath(shutil.which(python) or python)  # keep venv symlinks unresolved
    root_dir = Path(root_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="jupyterlab-test-") as tmp:
        dirs = {name: Path(tmp, name) for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
        for d in dirs.values():
            d.mkdir()
        _write_isolated_config(dirs, python)
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_PATH": str(dirs["data"]),
            "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
            "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
            "IPYTHONDIR": str(dirs["ipython"]),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        token = secrets.token_hex(24)
        cmd = [
            python,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0",  # the server picks a free port; read back from its runtime file
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root_dir}",
            f"--IdentityProvider.token={token}",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
            "--JupyterNotebookApp.expose_app_in_browser=True",  # Notebook 7 at /notebooks/..., same server
            f"--LabApp.user_settings_dir={dirs['settings']}",
            f"--LabApp.workspaces_dir={dirs['workspaces']}",
        ]
        log_path = Path(tmp, "server.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd,
                cwd=root_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        lab = LabServer("", token, root_dir, log_path, process)
        try:
            lab = _wait_until_serving(lab, dirs["runtime"], timeout_s=180)
            yield lab
        except BaseException as exc:
            exc.add_note(f"--- JupyterLab server log (tail) ---\n{lab.log_tail()}")
            raise
        finally:
            _shutdown(lab, dirs["runtime"])


def _write_isolated_config(dirs: dict[str, Path], python: str) -> None:
    """Write the kernelspec, page_config (disabled plugins) and user settings."""
    kernel_dir = dirs["data"] / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    labconfig = dirs["config"] / "labconfig"
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {name: True for name in _DISABLED_PLUGINS}})
    )
    for plugin, values in _USER_SETTINGS.items():
        target = dirs["settings"] / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))


def _wait_until_serving(lab: LabServer, runtime_dir: Path, timeout_s: float) -> LabServer:
    """Poll until the server wrote its runtime file and answers /api/status."""
    deadline = time.monotonic() + timeout_s
    url = ""
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited early with code {lab.process.returncode}")
        if not url:
            for info_file in runtime_dir.glob("jpserver-*.json"):
                try:
                    url = json.loads(info_file.read_text())["url"]
                except (ValueError, KeyError):
                    continue  # partially written; retry
        if url:
            request = urllib.request.Request(f"{url}api/status", headers={"Authorization": f"token {lab.token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    if response.status == 200:
                        return replace(lab, url=url)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.25)
    raise TimeoutError(f"JupyterLab did not answer within {timeout_s:.0f} s (url={url or 'unknown'})")


def _shutdown(lab: LabServer, runtime_dir: Path) -> None:
    """Stop the server and every process it started; kill what does not exit in time."""
    ours = _our_processes(lab.process.pid, runtime_dir)  # collect before the server goes away
    if lab.url and lab.process.poll() is None:
        request = urllib.request.Request(
            f"{lab.url}api/shutdown",
            method="POST",
            headers={"Authorization": f"token {lab.token}"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
            lab.process.wait(timeout=20)
        except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
            pass
    for stop in (lab.process.terminate, lab.process.kill):
        if lab.process.poll() is None:
            stop()
            with suppress(subprocess.TimeoutExpired):
                lab.process.wait(timeout=10)
    _, alive = psutil.wait_procs(ours, timeout=10)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _our_processes(server_pid: int, runtime_dir: Path) -> list[psutil.Process]:
    """The server's descendants, plus orphans (e.g. kernels of a crashed server) that
    inherited this server's unique JUPYTER_RUNTIME_DIR."""
    found: dict[int, psutil.Process] = {}
    try:
        for proc in psutil.Process(server_pid).children(recursive=True):
            found[proc.pid] = proc
    except psutil.NoSuchProcess:
        pass
    marker = str(runtime_dir)
    for proc in psutil.process_iter():
        try:
            if proc.pid != server_pid and proc.environ().get("JUPYTER_RUNTIME_DIR") == marker:
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


@contextmanager
def headless_chromium() -> Iterator[Browser]:
    """Launch Debian's /usr/bin/chromium headless through playwright."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} not found: run scripts/setup_browser.sh")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_notebook(page: Page, lab: LabServer, path: str, timeout_s: float = 180, ui: str = "lab") -> None:
    """Open `path` (relative to the Lab root, posix) in JupyterLab (``ui="lab"``) or Jupyter Notebook 7
    (``ui="notebook"``) and wait until its panel is ready.

    The other helpers act on this notebook (found by path, whatever has the focus).
    """
    prefix = {"lab": "lab/tree", "notebook": "notebooks"}[ui]
    page.goto(lab.page_url(f"{prefix}/{quote(path)}"), timeout=timeout_s * 1000)
    _wait_until_open(page, path, timeout_s)


def reload_notebook(page: Page, timeout_s: float = 180) -> None:
    """Reload the page (the browser's reload) and wait until the same notebook is open again."""
    path = page.evaluate("() => window.__harnessNotebookPath")
    page.reload(timeout=timeout_s * 1000)
    _wait_until_open(page, path, timeout_s)


def save_notebook(page: Page, timeout_s: float = 60) -> None:
    """Save the open notebook (outputs included, so that a reloaded page shows them) and wait until saved."""
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    _wait_js(page, _SAVED_JS, time.monotonic() + timeout_s, "the notebook to be saved")


def run_cell_and_wait(page: Page, index: int, timeout_s: float = 120) -> None:
    """Run the open notebook's cell `index` (0-based) and wait until it ran and the kernel is idle."""
    deadline = time.monotonic() + timeout_s
    _wait_js(page, _KERNEL_IDLE_JS, deadline, "the notebook's kernel to be connected and idle")
    page.evaluate(_RUN_CELL_JS, index)
    _wait_js(page, _RUN_ALL_FINISHED_JS, deadline, f"cell {index} to run and the kernel to be idle")


def _wait_until_open(page: Page, path: str, timeout_s: float) -> None:
    page.wait_for_function("() => !!window.jupyterapp", timeout=timeout_s * 1000)
    page.evaluate("path => { window.__harnessNotebookPath = path; }", path)
    try:
        page.wait_for_function(_NOTEBOOK_READY_JS, timeout=timeout_s * 1000, polling=250)
    except PlaywrightTimeoutError as exc:
        raise TimeoutError(f"notebook {path!r} did not open within {timeout_s:.0f} s\n{_page_dialogs(page)}") from exc


def run_all_and_wait(page: Page, timeout_s: float = 300) -> None:
    """Run all cells of the open notebook and wait until they ran and the kernel is idle.

    Waits for the notebook's own kernel to be connected and idle before Run All (the
    toolbar says "idle" before any kernel exists). Stops waiting early when Run All
    stopped at an error; check `error_outputs` afterwards.
    """
    deadline = time.monotonic() + timeout_s
    _wait_js(page, _KERNEL_IDLE_JS, deadline, "the notebook's kernel to be connected and idle")
    page.evaluate(_RUN_ALL_JS)
    _wait_js(page, _RUN_ALL_FINISHED_JS, deadline, "Run All to finish and the kernel to be idle")
    # Widget comm traffic right after the last reply can make the kernel busy again briefly.
    settle = time.monotonic() + 2
    while time.monotonic() < settle:
        _wait_js(page, _RUN_ALL_FINISHED_JS, deadline, "the kernel to settle after Run All")
        page.wait_for_timeout(250)


def _wait_js(page: Page, js: str, deadline: float, what: str) -> None:
    """Poll the JS predicate `js` until true; on timeout raise with the notebook state."""
    remaining_ms = max(1.0, (deadline - time.monotonic()) * 1000)
    try:
        page.wait_for_function(js, timeout=remaining_ms, polling=250)
    except PlaywrightTimeoutError as exc:
        raise TimeoutError(f"timed out waiting for {what}\n{describe_notebook(page)}") from exc


def _notebook_state(page: Page) -> dict[str, Any]:
    state = page.evaluate(_NOTEBOOK_STATE_JS)
    if state is None:
        raise RuntimeError("no notebook opened by open_notebook() in this page")
    return state


def _output_text(output: dict[str, Any]) -> str:
    """Plain text of one nbformat output (errors as 'ename: evalue' + traceback)."""
    kind = output.get("output_type")
    if kind == "stream":
        text = output.get("text", "")
    elif kind == "error":
        text = "\n".join([f"{output.get('ename')}: {output.get('evalue')}", *output.get("traceback", [])])
    else:
        text = output.get("data", {}).get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else str(text)
    return _ANSI.sub("", text)


def cell_outputs_text(page: Page) -> list[str]:
    """Each cell's outputs as plain text (one string per cell, "" for non-code cells)."""
    return ["\n".join(_output_text(o) for o in cell["outputs"]) for cell in _notebook_state(page)["cells"]]


def error_outputs(page: Page) -> list[str]:
    """Every error output of the notebook, plus the text of widgets that failed to render."""
    errors = [
        f"cell {i}: {_output_text(o)}"
        for i, cell in enumerate(_notebook_state(page)["cells"])
        for o in cell["outputs"]
        if o.get("output_type") == "error"
    ]
    widget_errors = page.locator(".jupyter-widgets-error-widget").all_inner_texts()
    return errors + [f"widget error: {text.strip()}" for text in widget_errors]


def describe_notebook(page: Page, max_chars: int = 2000) -> str:
    """Human-readable kernel state, cells and outputs, for failure messages."""
    try:
        state = _notebook_state(page)
    except Exception as exc:  # the page itself may be gone; still produce a message
        return f"(notebook state unavailable: {exc})"
    lines = [f"notebook {state['path']}: kernel {state['kernel']}, run-all {state['run_all']}"]
    for i, cell in enumerate(state["cells"]):
        first_line = (cell["source"].splitlines() or [""])[0][:80]
        count = cell["execution_count"] if cell["type"] == "code" else "-"
        lines.append(f"[{i}] {cell['type']} [{count}] {first_line}")
        text = "\n".join(_output_text(o) for o in cell["outputs"])
        if len(text) > max_chars:
            text = f"{text[:max_chars]}... ({len(text) - max_chars} more chars)"
        lines.extend(f"      | {line}" for line in text.splitlines())
    return "\n".join(lines) + "\n" + _page_dialogs(page)


def _page_dialogs(page: Page) -> str:
    """Text of any open Lab dialogs (e.g. a kernel picker), which block a test silently."""
    try:
        texts = page.locator(".jp-Dialog").all_inner_texts()
    except Exception:
        return ""
    return "".join(f"open dialog: {' '.join(t.split())}\n" for t in texts)


def bokeh_sources(page: Page) -> list[dict[str, list[Any]]]:
    """The data of every Bokeh ColumnDataSource in the page (from `Bokeh.documents`)."""
    return page.evaluate(_BOKEH_SOURCES_JS)


def wait_for_bokeh_data(
    page: Page,
    predicate: Callable[[list[dict[str, list[Any]]]], bool],
    timeout_s: float = 60,
    what: str = "the expected Bokeh data",
) -> list[dict[str, list[Any]]]:
    """Poll `bokeh_sources(page)` until `predicate` holds on it; return those sources."""
    return poll_until(
        page,
        lambda: bokeh_sources(page),
        predicate,
        timeout_s,
        lambda sources: f"{what} never reached the page within {timeout_s:.0f} s; Bokeh sources now: {sources}",
    )


def poll_until(
    page: Page, probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float, failure: Callable[[T], str]
) -> T:
    """Call `probe` every 250 ms until `done(value)`; on timeout raise with `failure(value)` and the notebook."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{failure(value)}\n{describe_notebook(page)}")
        page.wait_for_timeout(250)


def set_slider(slider: Locator, value: float, timeout_s: float = 60) -> None:
    """Set an ipywidgets slider (`div.widget-slider`) by typing `value` into its readout,
    then wait until the handle reports it (`aria-valuenow`)."""
    readout = slider.locator("div.widget-readout[contenteditable=true]")
    readout.click()
    readout.press("Control+A")
    readout.press_sequentially(str(value))
    readout.press("Enter")
    handle = slider.locator(".noUi-handle[role=slider]")
    deadline = time.monotonic() + timeout_s
    while True:
        now = float(handle.get_attribute("aria-valuenow") or "nan")
        if abs(now - value) <= 1e-9 * max(1.0, abs(value)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"slider shows {now}, not {value}, after {timeout_s:.0f} s")
        slider.page.wait_for_timeout(250)


def console_messages(page: Page) -> list[str]:
    """Start recording the page's console errors/warnings and uncaught exceptions; the
    returned list fills up as they happen (call before `open_notebook`)."""
    messages: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            messages.append(f"{message.type}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
    return messages

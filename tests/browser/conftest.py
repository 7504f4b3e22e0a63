"""Browser (end-to-end) tests: JupyterLab driven by headless chromium through playwright."""

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "browser: end-to-end test in JupyterLab + headless chromium (scripts/setup_browser.sh)",
    )


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where tests save screenshots: $JUPYTER_SPARSIFY_SCREENSHOT_DIR if set, else a tmp dir."""
    configured = os.environ.get("JUPYTER_SPARSIFY_SCREENSHOT_DIR")
    directory = Path(configured) if configured else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory

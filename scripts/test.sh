#!/usr/bin/env bash
# The test command: set up (venv, torch CPU, package, embedded model, chromium + playwright), then run
# every test: core, magics in a real shell, example notebooks in a real kernel, the panel in a real
# JupyterLab in headless chromium. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"

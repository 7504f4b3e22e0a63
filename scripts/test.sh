#!/usr/bin/env bash
# The test command: set up (venv, torch CPU, package, embedded model, chromium + playwright), lint, then run
# every test: core, magics in a real shell, example notebooks in a real kernel, the panel in a real JupyterLab
# in headless chromium. Extra arguments go to pytest. Prints the suite's wall time at the end
# (budget: 15 minutes on an idle 2-core machine from a cold cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
.venv/bin/ruff check .
.venv/bin/ruff format --check .
start=$(date +%s)
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@" || status=$?
seconds=$(( $(date +%s) - start ))
echo "test suite wall time: $((seconds / 60)) min $((seconds % 60)) s (budget 15 min on an idle 2-core machine)"
if [ "$seconds" -gt 900 ]; then
  echo "warning: the suite took longer than its 15-minute budget; see the slowest tests above"
fi
exit "$status"

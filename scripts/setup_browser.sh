#!/usr/bin/env bash
# Install what the browser tests (tests/browser) need: Debian's chromium at
# /usr/bin/chromium (+ a font, for readable screenshots) and the playwright driver
# into a venv. Idempotent and non-interactive. Never runs `playwright install`: its
# browser downloads are not reachable here; the tests drive /usr/bin/chromium.
# Usage: scripts/setup_browser.sh [VENV_DIR]   (default: .venv)
set -euo pipefail

venv="${1:-.venv}"
export DEBIAN_FRONTEND=noninteractive

if [ ! -x "$venv/bin/python" ]; then
    echo "setup_browser.sh: no python at $venv/bin/python" >&2
    exit 1
fi

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
dpkg-query -W -f='${Status}' fonts-dejavu-core 2>/dev/null | grep -q "ok installed" \
    || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    apt_install=($sudo apt-get install -y --no-install-recommends "${missing[@]}")
    # Refresh the package lists only when the install cannot work from the current ones.
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1 || ! "${apt_install[@]}"; then
        $sudo apt-get update
        "${apt_install[@]}"
    fi
fi

if ! "$venv/bin/python" -c "import playwright" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet playwright
fi

/usr/bin/chromium --version 2>/dev/null
"$venv/bin/python" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"

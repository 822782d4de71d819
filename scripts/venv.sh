#!/usr/bin/env bash
# Create the project's virtualenv and install Tether with its dev tools.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "==> installing tether and its dev dependencies into $VENV (pip, a minute on a fresh machine)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e '.[dev]' -e devtools
touch "$VENV/.installed"
echo "==> virtualenv ready"

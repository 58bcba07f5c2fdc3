#!/usr/bin/env bash
# Installs the Python packages the tests drive the server with (the official `openai` client)
# into ~/.cache/tp/python (or $TP_PYTHONPATH), outside any system or virtual environment.
set -euo pipefail
target="${TP_PYTHONPATH:-$HOME/.cache/tp/python}"
if PYTHONPATH="$target" python3 -c 'import openai' 2>/dev/null; then
  exit 0
fi
mkdir -p "$target"
echo "python-deps: installing openai into $target" >&2
python3 -m pip install --quiet --disable-pip-version-check --target "$target" 'openai>=1.40,<4' ||
  { echo "python-deps: cannot install the openai package from PyPI" >&2; exit 1; }
PYTHONPATH="$target" python3 -c 'import openai' ||
  { echo "python-deps: openai installed but does not import" >&2; exit 1; }

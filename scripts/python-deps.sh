#!/usr/bin/env bash
# Installs the Python packages the tests use into ~/.cache/tp/python (or $TP_PYTHONPATH),
# outside any system or virtual environment: the official `openai` client (the server tests
# drive tp with it), and `gguf` + `numpy` (scripts/fetch-models.sh writes the synthetic
# mixture-of-experts and dense models with them).
set -euo pipefail
target="${TP_PYTHONPATH:-$HOME/.cache/tp/python}"
if PYTHONPATH="$target" python3 -c 'import openai, gguf, numpy' 2>/dev/null; then
  exit 0
fi
mkdir -p "$target"
echo "python-deps: installing openai, gguf and numpy into $target" >&2
# gguf is pinned: the synthetic model's published sha256 was made with its 0.19.0 writer.
python3 -m pip install --quiet --disable-pip-version-check --target "$target" \
  'openai>=1.40,<4' 'gguf==0.19.0' 'numpy>=1.26' ||
  { echo "python-deps: cannot install openai, gguf and numpy from PyPI" >&2; exit 1; }
PYTHONPATH="$target" python3 -c 'import openai, gguf, numpy' ||
  { echo "python-deps: the packages installed but do not import" >&2; exit 1; }

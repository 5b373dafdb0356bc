#!/usr/bin/env bash
# Creates (or refreshes) the project-local virtual environment .venv and installs tasd into it,
# editable, with the extras named in $1 (default: test). Idempotent: a second run installs nothing new.
# torch is pinned to 2.13.0 first so that the range in pyproject.toml is already satisfied and pip
# never pulls another torch build (on these machines a CPU wheel of 2.13.0 lies in pip's find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=23" >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -qq "torch==2.13.0"
fi
.venv/bin/python -m pip install -qq -e ".[${extras}]"

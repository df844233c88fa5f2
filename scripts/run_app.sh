#!/usr/bin/env bash
# Install the runtime into .venv and serve the shipped model at http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
HF_HUB_OFFLINE=1 exec .venv/bin/python app.py "$@"

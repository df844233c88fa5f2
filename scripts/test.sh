#!/usr/bin/env bash
# Install everything the tests need into .venv and run them. Used by README and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  # The browser test drives Debian's chromium; Playwright's own browser download is not used.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed (sudo apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .   # the package itself, so nothing edits sys.path
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"

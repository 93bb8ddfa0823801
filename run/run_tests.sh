#!/usr/bin/env bash
# README command 2: set up, then run the default test suite (slow tests: add "-m slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
exec .venv/bin/python -m pytest -q "$@"

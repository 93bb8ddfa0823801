#!/usr/bin/env bash
# Set up everything SRD needs in ./.venv (or $SRD_VENV). Safe to run again: it only
# reinstalls when requirements*.txt or pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SRD_VENV:-.venv}
PYTHON=${PYTHON:-python3}

# pycocoevalcap's PTB tokenizer and METEOR are Java programs.
if ! command -v java >/dev/null 2>&1; then
  echo "setup: java not found; installing a headless JRE (Debian package default-jre-headless)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq default-jre-headless >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.srd-setup"
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into $VENV (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  "$VENV/bin/python" -c "import open_flamingo, open_clip, transformers, sentence_transformers, \
stable_baselines3, gymnasium, pycocoevalcap, accelerate, srd"
  echo "$want" > "$stamp"
else
  echo "setup: $VENV is up to date"
fi

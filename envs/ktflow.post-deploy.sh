#!/usr/bin/env bash
# Runs inside the freshly created conda env (Snakemake's post-deploy hook).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python -m pip install --no-deps -r "$here/requirements-cpu.lock"
python -m pip install --no-deps -e "$here/.."

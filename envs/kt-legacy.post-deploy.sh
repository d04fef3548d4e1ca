#!/usr/bin/env bash
# Runs inside the freshly created conda env (Snakemake's post-deploy hook).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${KTFLOW_KTRANSFORMERS_WHEEL:-}" ]]; then
    echo "kt-legacy env: set KTFLOW_KTRANSFORMERS_WHEEL to a ktransformers 0.4.x wheel (path or URL)" \
         "matching this env's torch and CUDA, or use training.kt.generation: current" >&2
    exit 1
fi
python -m pip install "$KTFLOW_KTRANSFORMERS_WHEEL"
python -m pip install --no-deps -e "$here/.."

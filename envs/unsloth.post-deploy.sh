#!/usr/bin/env bash
# Runs inside the freshly created conda env (Snakemake's post-deploy hook): ktflow's
# launcher (ktflow.train.launch) must be importable where LLaMA-Factory runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python -m pip install --no-deps -e "$here/.."

"""A ktransformers checkout's ``convert_cpu_weights.py``, run as a script, for hosts without kt_kernel."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from ktflow.convert_int8.backends.base import BackendUnavailable, Int8Backend
from ktflow.convert_int8.checkpoint import MoeCheckpoint
from ktflow.errors import KtflowInputError

log = logging.getLogger(__name__)

SCRIPT_NAME = "convert_cpu_weights.py"


class KtCheckoutBackend(Int8Backend):
    """Upstream's ``kt-kernel/scripts/convert_cpu_weights.py`` from a ktransformers checkout."""

    name = "kt_checkout"
    remedy = "pass a ktransformers checkout"

    def __init__(self, checkout: Path) -> None:
        candidates = (
            checkout,
            checkout / "scripts" / SCRIPT_NAME,
            checkout / "kt-kernel/scripts" / SCRIPT_NAME,
        )
        script = next((c for c in candidates if c.is_file() and c.name == SCRIPT_NAME), None)
        if script is None:
            raise KtflowInputError(
                checkout, "--kt-checkout", f"no {SCRIPT_NAME} at scripts/ or kt-kernel/scripts/"
            )
        self.script = script

    @classmethod
    def found(cls, kt_checkout: Path | None) -> Int8Backend:
        if kt_checkout is None:
            raise BackendUnavailable("no --kt-checkout was given")
        return cls(kt_checkout)

    def convert(self, checkpoint: MoeCheckpoint, out: Path, threads: int, pools: int) -> dict[str, Any]:
        # fmt: off
        command = [
            sys.executable, str(self.script), "--input-path", str(checkpoint.model_dir),
            "--input-type", "bf16", "--output", str(out), "--quant-method", "int8",
            "--cpuinfer-threads", str(threads), "--threadpool-count", str(pools),
        ]
        # fmt: on
        log.info("running %s", " ".join(command))
        if subprocess.run(command, cwd=self.script.parent, check=False).returncode != 0:
            raise RuntimeError(f"{self.script} failed (see its output above)")
        return {"script": str(self.script)}

"""The environment Snakemake hands to every job it runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def put_interpreter_first_on_path() -> None:
    """Put this interpreter's bin dir first on PATH, so jobs find its `ktflow` and tools."""
    bin_dir = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    os.environ["PATH"] = os.pathsep.join([bin_dir, *rest])

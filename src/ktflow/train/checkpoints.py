"""LLaMA-Factory's checkpoints in the work dir: kept only for the YAML that made them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ktflow.atomic import write_text


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def prepare_run_dir(run_dir: Path, rendered: str) -> Path | None:
    """Keep checkpoints only if they were made by the same YAML; return the one to resume."""
    stamp = run_dir / "ktflow-yaml.sha256"
    digest = hashlib.sha256(rendered.encode()).hexdigest()
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, digest + "\n")
    return latest_checkpoint(run_dir)

"""``train_metrics.json``: run time, tokens/s and step time, peak host RSS and GPU memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.train.launch import GPU_PEAK_GLOB
from ktflow.train.watch import read_this_process

MB = 1 << 20


def gpu_metrics(run_dir: Path) -> dict[str, Any]:
    """Peak GPU memory over the ranks' records (None on CPU-only runs)."""
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob(GPU_PEAK_GLOB))]

    def peak(key: str) -> float | None:
        values = [r[key] for r in ranks if r.get(key) is not None]
        return round(max(values) / MB, 1) if values else None

    return {
        "gpu_peak_allocated_mb": peak("max_allocated_bytes"),
        "gpu_peak_reserved_mb": peak("max_reserved_bytes"),
        "gpu_ranks": ranks,
    }


def throughput(record: dict[str, Any] | None) -> dict[str, Any]:
    """Tokens/s and step time of the steps this process ran (after a resume: only those)."""
    if record is None:
        return dict.fromkeys(("throughput_basis", "resumed_from_step", "tokens_per_s", "step_time_s"))
    # Rates come from the rounded seconds that the JSON shows, so the file is self-consistent.
    steps, tokens, seconds = record["steps_run"], record["tokens_run"], round(record["seconds"], 3)
    return {
        "throughput_basis": "steps run by this process",
        "resumed_from_step": record["resumed_from_step"],
        "steps_run": steps,
        "tokens_run": tokens,
        "seconds_run": seconds,
        "tokens_per_s": round(tokens / seconds, 3) if steps and tokens and seconds > 0 else None,
        "step_time_s": round(seconds / steps, 4) if steps and seconds > 0 else None,
    }


def training_metrics(run_dir: Path, wall_seconds: float, peak_rss_bytes: int) -> dict[str, Any]:
    results_path, state_path = run_dir / "all_results.json", run_dir / "trainer_state.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    history = json.loads(state_path.read_text()).get("log_history", []) if state_path.is_file() else []
    tokens = max((entry.get("num_input_tokens_seen", 0) for entry in history), default=0)
    return {
        "train_runtime_s": float(results.get("train_runtime", wall_seconds)),
        "wall_s": round(wall_seconds, 3),
        "tokens_seen": tokens,  # the whole run's, resumed steps included
        "steps": int(history[-1].get("step", 0)) if history else 0,
        **throughput(read_this_process(run_dir)),
        "train_loss": results.get("train_loss"),
        "peak_host_rss_mb": round(peak_rss_bytes / MB, 1),
        **gpu_metrics(run_dir),
    }

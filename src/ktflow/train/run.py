"""``ktflow train``: validate data, render the YAML, run LLaMA-Factory, publish the adapter.

LLaMA-Factory writes into a work directory that is *not* a Snakemake output (Snakemake
deletes declared outputs before a job starts), so checkpoints survive a kill and a
rerun resumes from the newest one when the rendered YAML is unchanged. Only when
training finishes is the adapter copied, atomically, into the declared output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ktflow.atomic import atomic_dir, sha256_file, write_json, write_text
from ktflow.errors import KtflowInputError
from ktflow.provenance import recorded
from ktflow.train.backends import BACKENDS, backend_for
from ktflow.train.datasets import FORMATS, check_rows, load_rows, write_dataset_info
from ktflow.train.spec import STAGE_FORMATS, TrainSpec

# What LLaMA-Factory leaves that is worth keeping next to the adapter.
PUBLISHED = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "fused_expert_lora.safetensors",
    "kt_adapter_manifest.json",
    "trainer_log.jsonl",
    "training_loss.png",
    "all_results.json",
    "train_results.json",
)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def prepare_run_dir(run_dir: Path, rendered: str) -> Path | None:
    """Keep checkpoints only if they were made by the same YAML; return the one to resume."""
    stamp = run_dir / "ktflow-yaml.sha256"
    digest = __import__("hashlib").sha256(rendered.encode()).hexdigest()
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, digest + "\n")
    return latest_checkpoint(run_dir)


def training_metrics(run_dir: Path, wall_seconds: float, peak_rss_bytes: int) -> dict[str, Any]:
    results = (
        json.loads((run_dir / "all_results.json").read_text())
        if (run_dir / "all_results.json").is_file()
        else {}
    )
    state_path = run_dir / "trainer_state.json"
    history = json.loads(state_path.read_text()).get("log_history", []) if state_path.is_file() else []
    tokens = max((entry.get("num_input_tokens_seen", 0) for entry in history), default=0)
    runtime = float(results.get("train_runtime", wall_seconds))
    steps = int(history[-1].get("step", 0)) if history else 0
    return {
        "train_runtime_s": runtime,
        "wall_s": round(wall_seconds, 3),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / runtime, 3) if runtime and tokens else None,
        "steps": steps,
        "step_time_s": round(runtime / steps, 4) if steps else None,
        "train_loss": results.get("train_loss"),
        "peak_host_rss_mb": round(peak_rss_bytes / 2**20, 1),
    }


def run_training(spec: TrainSpec, out_dir: Path, log: Path | None = None) -> dict[str, Any]:
    backend = backend_for(spec.backend)
    backend.check_host(spec)
    work = spec.output_dir.parent
    rendered = backend.render(spec)
    text = yaml.safe_dump(rendered, sort_keys=True)
    checkpoint = prepare_run_dir(spec.output_dir, text)
    if checkpoint is not None:
        rendered["resume_from_checkpoint"] = str(checkpoint)
        print(f"ktflow train: resuming from {checkpoint}", file=sys.stderr)
    yaml_path = work / "llamafactory.yaml"
    write_text(yaml_path, yaml.safe_dump(rendered, sort_keys=True))
    env = {**os.environ, **backend.environment(spec), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    completed = subprocess.run(backend.command(spec, yaml_path), env=env, check=False)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"LLaMA-Factory training failed (exit {completed.returncode}); see the log above")
    # ru_maxrss is in KiB on Linux and covers the largest finished child.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    metrics = training_metrics(spec.output_dir, wall, peak)
    with atomic_dir(out_dir) as tmp:
        for name in PUBLISHED:
            if (spec.output_dir / name).is_file():
                shutil.copy2(spec.output_dir / name, tmp / name)
        if not (tmp / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"{spec.output_dir}: LLaMA-Factory finished without adapter_model.safetensors")
        shutil.copy2(yaml_path, tmp / "llamafactory.yaml")
        write_json(tmp / "train_metrics.json", metrics)
    return metrics


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="BF16 base model directory")
    parser.add_argument("train_file", type=Path, help="training data (JSON list or JSONL)")
    parser.add_argument("out_dir", type=Path, help="where the finished adapter is published")
    parser.add_argument(
        "--work-dir", type=Path, required=True, help="LLaMA-Factory output_dir parent (checkpoints)"
    )
    parser.add_argument("--dataset-name", default="train")
    parser.add_argument("--spec", required=True, help="JSON of the config's training block")
    parser.add_argument("--render-only", action="store_true", help="write the YAML and stop")


def parse_spec(args: argparse.Namespace) -> tuple[TrainSpec, str]:
    try:
        training = json.loads(args.spec)
    except json.JSONDecodeError as error:
        raise KtflowInputError("--spec", None, f"invalid JSON ({error.msg})") from error
    data_format = training.get("format", "alpaca")
    stage = training.get("stage", "sft")
    if stage not in STAGE_FORMATS:
        raise KtflowInputError(
            "config", "training.stage", f"unknown stage {stage!r}; use one of {sorted(STAGE_FORMATS)}"
        )
    if data_format not in STAGE_FORMATS[stage]:
        raise KtflowInputError(
            args.train_file,
            "format",
            f"stage {stage} needs data in {STAGE_FORMATS[stage]}, got {data_format!r}",
        )
    if training.get("backend", "hf") not in BACKENDS:
        raise KtflowInputError(
            "config", "training.backend", f"unknown backend; use one of {sorted(BACKENDS)}"
        )
    spec = TrainSpec.from_config(
        {k: v for k, v in training.items() if k != "format"},
        model_dir=args.model_dir.resolve(),
        dataset_dir=(args.work_dir / "data").resolve(),
        dataset=args.dataset_name,
        output_dir=(args.work_dir / "run").resolve(),
    )
    return spec, data_format


def main(args: argparse.Namespace) -> int:
    spec, data_format = parse_spec(args)
    if data_format not in FORMATS:
        raise KtflowInputError(args.train_file, "format", f"unknown data format {data_format!r}")
    check_rows(args.train_file, load_rows(args.train_file), data_format)
    if not (args.model_dir / "config.json").is_file():
        raise KtflowInputError(args.model_dir / "config.json", None, "base model has no config.json")
    write_dataset_info(spec.dataset_dir, spec.dataset, args.train_file, data_format)
    if args.render_only:
        write_text(
            args.work_dir / "llamafactory.yaml", yaml.safe_dump(backend_for(spec.backend).render(spec))
        )
        return 0
    subset = json.loads(args.spec)
    inputs: list[str | Path] = [args.train_file, *sorted(args.model_dir.glob("*.json"))]
    with recorded(args.work_dir / "provenance.json", "train", subset, inputs) as extra:
        extra.update(run_training(spec, args.out_dir))
        extra["data_sha256"] = sha256_file(args.train_file)
    shutil.copy2(args.work_dir / "provenance.json", args.out_dir / "provenance.json")
    return 0

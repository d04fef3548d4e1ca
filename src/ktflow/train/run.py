"""``ktflow train``: validate data, render the YAML, run LLaMA-Factory, publish the adapter.

LLaMA-Factory writes into a work directory that is *not* a Snakemake output (Snakemake
deletes declared outputs before a job starts), so checkpoints survive a kill and a
rerun resumes from the newest one when the rendered YAML is unchanged. Only when
training finishes is the adapter copied, atomically, into the declared output, with
``train_metrics.json`` (tokens/s, step time, peak host RSS, peak GPU memory) and the
loss curve beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
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

from ktflow.atomic import StorageError, atomic_dir, sha256_file, write_json, write_text
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.fetch import validate_snapshot
from ktflow.lifetime import claimed, tied_to_parent
from ktflow.provenance import recorded
from ktflow.train import cutoff
from ktflow.train.backends import backend_for
from ktflow.train.datasets import HUB_PREFIX, check_rows, dataset_entry, load_rows, write_dataset_info
from ktflow.train.env import EnvReport, inspect_env, python_for
from ktflow.train.launch import GPU_PEAK_GLOB
from ktflow.train.spec import TrainSpec
from ktflow.train.watch import (
    NONFINITE_RECORD,
    STORAGE_EXIT,
    THIS_PROCESS_RECORD,
    describe_nonfinite,
    read_nonfinite,
    read_this_process,
)

# What LLaMA-Factory leaves that is worth keeping next to the adapter (plus training_*.png).
PUBLISHED = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "fused_expert_lora.safetensors",
    "kt_adapter_manifest.json",
    "trainer_log.jsonl",
    "all_results.json",
    "train_results.json",
)
MB = 1 << 20
NONFINITE_ADVICE = "(check the base model's weights for NaN/Inf, or lower training.learning_rate)"


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


def check_finite(path: Path) -> None:
    """KtflowInputError naming the first tensor of ``path`` with NaN or infinite values."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as tensors:
        for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = tensors.get_tensor(name)
            bad = int((~tensor.isfinite()).sum()) if tensor.is_floating_point() else 0
            if bad:
                what = f"{bad} of {tensor.numel()} values are NaN or infinite: not published"
                raise KtflowInputError(path, name, f"{what} {NONFINITE_ADVICE}")


def preflight(spec: TrainSpec, env: EnvReport, results_dir: Path) -> str:
    """Doctor's verdict for this run; HardwareError (before any work) if it cannot run here."""
    from ktflow.doctor import check_backend, collect_host, verdict
    from ktflow.estimate import Requirements, estimate_requirements, read_model_config

    requirements: Requirements | None = None
    # An architecture without an estimate (a dense model) gets the host checks only.
    with contextlib.suppress(KtflowInputError):
        requirements = estimate_requirements(
            read_model_config(spec.model_dir),
            source=spec.model_dir / "config.json",
            lora_rank=spec.lora_rank,
            seq_len=spec.cutoff_len,
            batch_size=spec.batch_size,
            hf_weight_bytes=2 if spec.bf16 else 4,
        )
    if requirements is not None:
        # The cast is done by now: its disk need is not training's (a full disk is reported
        # where a write fails, as a storage error naming the path).
        requirements = dataclasses.replace(requirements, bf16_disk_bytes=0)
    label = backend_for(spec.backend).label(spec, env)
    problems = check_backend(collect_host(results_dir, env), label, requirements)
    line = verdict(label, problems)
    if any(p.severity == "error" for p in problems):
        raise HardwareError(f"{line} (see `ktflow doctor --backend {label}`)")
    return line


def render(spec: TrainSpec, env: EnvReport, work: Path) -> tuple[dict[str, Any], Path]:
    """Write the training YAML (and the files its command reads) into ``work``."""
    backend = backend_for(spec.backend)
    rendered = backend.render(spec, env)
    for name, content in backend.extra_files(spec, env).items():
        write_text(work / name, yaml.safe_dump(content, sort_keys=True))
    yaml_path = work / "llamafactory.yaml"
    write_text(yaml_path, yaml.safe_dump(rendered, sort_keys=True))
    return rendered, yaml_path


def run_training(
    spec: TrainSpec, env: EnvReport, out_dir: Path, claim_fd: int | None = None
) -> dict[str, Any]:
    backend = backend_for(spec.backend)
    work = spec.output_dir.parent
    rendered, yaml_path = render(spec, env, work)
    checkpoint = prepare_run_dir(spec.output_dir, yaml_path.read_text())
    if checkpoint is not None:
        rendered["resume_from_checkpoint"] = str(checkpoint)
        write_text(yaml_path, yaml.safe_dump(rendered, sort_keys=True))
        print(f"ktflow train: resuming from {checkpoint}", file=sys.stderr)
    child_env = {**os.environ, **backend.environment(spec, env), "PYTHONUNBUFFERED": "1"}
    for stale in (NONFINITE_RECORD, THIS_PROCESS_RECORD):
        (spec.output_dir / stale).unlink(missing_ok=True)
    start = time.perf_counter()
    # The trainer dies with this process, and keeps the work dir's claim (claim_fd) while it lives.
    command = tied_to_parent(backend.command(spec, env, yaml_path))
    fds = () if claim_fd is None else (claim_fd,)
    completed = subprocess.run(command, env=child_env, check=False, pass_fds=fds)
    wall = time.perf_counter() - start
    stopped = read_nonfinite(spec.output_dir)
    if stopped is not None:
        message = f"{describe_nonfinite(stopped)}: training stopped, no adapter published " + NONFINITE_ADVICE
        raise KtflowInputError(spec.output_dir, None, message)
    if completed.returncode == STORAGE_EXIT:
        free = shutil.disk_usage(spec.output_dir).free
        message = (
            f"the disk filled while LLaMA-Factory wrote a checkpoint ({free} bytes free); nothing was "
            "published: free space and rerun (training resumes from the last complete checkpoint)"
        )
        raise StorageError(spec.output_dir, None, message)
    if completed.returncode != 0:
        raise RuntimeError(f"LLaMA-Factory training failed (exit {completed.returncode}); see the log above")
    # ru_maxrss is in KiB on Linux and covers the largest finished descendant.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    metrics = training_metrics(spec.output_dir, wall, peak)
    metrics.update(backend=backend.label(spec, env), stage=spec.stage, python=env.executable)
    with atomic_dir(out_dir) as tmp:
        names = [*PUBLISHED, *(p.name for p in spec.output_dir.glob("training_*.png"))]
        for name in names:
            if (spec.output_dir / name).is_file():
                shutil.copy2(spec.output_dir / name, tmp / name)
        if not (tmp / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"{spec.output_dir}: LLaMA-Factory finished without adapter_model.safetensors")
        for path in sorted(tmp.glob("*.safetensors")):
            check_finite(path)
        for path in work.glob("*.yaml"):
            shutil.copy2(path, tmp / path.name)
        write_json(tmp / "train_metrics.json", metrics)
    return metrics


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="BF16 base model directory")
    parser.add_argument(
        "train_file", help=f"training data: a JSON list or JSONL file, or {HUB_PREFIX}<repo> (hub data set)"
    )
    parser.add_argument("out_dir", type=Path, help="where the finished adapter is published")
    parser.add_argument(
        "--work-dir", type=Path, required=True, help="LLaMA-Factory output_dir parent (checkpoints)"
    )
    parser.add_argument("--dataset-name", default="train")
    parser.add_argument("--spec", required=True, help="JSON of the task's effective training block")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="for doctor's disk check")
    parser.add_argument("--render-only", action="store_true", help="write the YAMLs, then stop")


def parse_spec(args: argparse.Namespace) -> TrainSpec:
    try:
        training = json.loads(args.spec)
    except json.JSONDecodeError as error:
        raise KtflowInputError("--spec", None, f"invalid JSON ({error.msg})") from error
    if not isinstance(training, dict):
        raise KtflowInputError("--spec", None, "expected a JSON object (the training block)")
    return TrainSpec.from_config(
        training,
        model_dir=args.model_dir.resolve(),
        dataset_dir=(args.work_dir / "data").resolve(),
        dataset=args.dataset_name,
        output_dir=(args.work_dir / "run").resolve(),
    )


def check_data(spec: TrainSpec, location: str) -> dict[str, Any]:
    """The dataset_info entry for ``location``, after checking a local file's rows."""
    source = spec.data_source
    hub = location.startswith(HUB_PREFIX)
    wanted = source.get("hf_hub_url") if hub else source.get("file")
    given = location.removeprefix(HUB_PREFIX)
    same = wanted == given if hub else wanted is not None and Path(wanted).resolve() == Path(given).resolve()
    if wanted is not None and not same:
        message = f"names {wanted!r} but the data given is {location!r}"
        raise KtflowInputError("config", "training.dataset", message)
    entry = dataset_entry(location, spec.data_format, source)
    if not hub:
        check_rows(Path(location), load_rows(Path(location)), spec.data_format, entry)
    return entry


def main(args: argparse.Namespace) -> int:
    spec = parse_spec(args)
    entry = check_data(spec, args.train_file)
    # safetensors weights and a readable config.json only: pickled weights never reach torch.load.
    validate_snapshot(args.model_dir)
    # One trainer per work dir: a second one would resume from checkpoints the first deletes.
    with claimed(args.work_dir, "`ktflow train` or its trainer") as claim_fd:
        return train_in(args, spec, entry, claim_fd)


def train_in(args: argparse.Namespace, spec: TrainSpec, entry: dict[str, Any], claim_fd: int) -> int:
    from ktflow.doctor import PACKAGES

    env = inspect_env(python_for(spec.python, spec.backend), PACKAGES)
    write_dataset_info(spec.dataset_dir, spec.dataset, entry)
    if args.render_only:
        render(spec, env, args.work_dir)
        return 0
    verdict_line = preflight(spec, env, args.results_dir)
    over_cutoff = cutoff.report(spec, args.train_file, entry)  # LLaMA-Factory cuts such rows silently
    subset = json.loads(args.spec)
    local = not args.train_file.startswith(HUB_PREFIX)
    inputs: list[str | Path] = sorted(args.model_dir.glob("*.json"))
    if local:
        inputs.append(Path(args.train_file))
    with recorded(args.work_dir / "provenance.json", "train", subset, inputs) as extra:
        extra.update(run_training(spec, env, args.out_dir, claim_fd))
        extra["doctor"] = verdict_line
        extra["over_cutoff"] = over_cutoff
        extra["data"] = sha256_file(args.train_file) if local else args.train_file
    shutil.copy2(args.work_dir / "provenance.json", args.out_dir / "provenance.json")
    return 0

"""One ``ktflow train`` run: check the data, preflight, run LLaMA-Factory, publish the adapter.

LLaMA-Factory writes into a work directory that is *not* a Snakemake output (Snakemake
deletes declared outputs before a job starts), so checkpoints survive a kill and a
rerun resumes from the newest one when the rendered YAML is unchanged. Only when
training finishes is the adapter copied, atomically, into the declared output, with
``train_metrics.json`` (tokens/s, step time, peak host RSS, peak GPU memory) and the
loss curve beside it.
"""

from __future__ import annotations

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
from ktflow.errors import KtflowInputError
from ktflow.host.packages import PACKAGES
from ktflow.host.python_env import EnvReport, inspect_env
from ktflow.lifetime import claimed, tied_to_parent
from ktflow.nonfinite import nonfinite_tensors
from ktflow.provenance import recorded
from ktflow.readers.rows import load_rows
from ktflow.readers.snapshot import validate_snapshot
from ktflow.train import cutoff
from ktflow.train.backends import backend_for
from ktflow.train.checkpoints import prepare_run_dir
from ktflow.train.datasets import HUB_PREFIX, check_rows, dataset_entry, write_dataset_info
from ktflow.train.interpreter import python_for
from ktflow.train.preflight import preflight
from ktflow.train.spec import TrainSpec
from ktflow.train.train_metrics import training_metrics
from ktflow.train.watch import (
    NONFINITE_RECORD,
    STORAGE_EXIT,
    THIS_PROCESS_RECORD,
    describe_nonfinite,
    read_nonfinite,
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
NONFINITE_ADVICE = "(check the base model's weights for NaN/Inf, or lower training.learning_rate)"


def check_finite(path: Path) -> None:
    """KtflowInputError naming the first tensor of ``path`` with NaN or infinite values."""
    for name, bad, total in nonfinite_tensors(path):
        what = f"{bad} of {total} values are NaN or infinite: not published"
        raise KtflowInputError(path, name, f"{what} {NONFINITE_ADVICE}")


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


def train(
    spec: TrainSpec,
    *,
    data: str,
    settings: dict[str, Any],
    model_dir: Path,
    out_dir: Path,
    work_dir: Path,
    results_dir: Path,
    render_only: bool = False,
) -> int:
    """Train ``spec`` on ``data`` (a file, or ``hf://<repo>``) and publish the adapter in ``out_dir``.

    ``settings`` is the training block as given (recorded in the provenance); ``work_dir``
    holds the checkpoints; ``results_dir`` is where doctor's disk check looks.
    """
    entry = check_data(spec, data)
    # safetensors weights and a readable config.json only: pickled weights never reach torch.load.
    validate_snapshot(model_dir)
    # One trainer per work dir: a second one would resume from checkpoints the first deletes.
    with claimed(work_dir, "`ktflow train` or its trainer") as claim_fd:
        env = inspect_env(python_for(spec.python, spec.backend), PACKAGES)
        write_dataset_info(spec.dataset_dir, spec.dataset, entry)
        if render_only:
            render(spec, env, work_dir)
            return 0
        verdict_line = preflight(spec, env, results_dir)
        over_cutoff = cutoff.report(spec, data, entry)  # LLaMA-Factory cuts such rows silently
        local = not data.startswith(HUB_PREFIX)
        inputs: list[str | Path] = sorted(model_dir.glob("*.json"))
        if local:
            inputs.append(Path(data))
        with recorded(work_dir / "provenance.json", "train", settings, inputs) as extra:
            extra.update(run_training(spec, env, out_dir, claim_fd))
            extra["doctor"] = verdict_line
            extra["over_cutoff"] = over_cutoff
            extra["data"] = sha256_file(data) if local else data
        shutil.copy2(work_dir / "provenance.json", out_dir / "provenance.json")
    return 0

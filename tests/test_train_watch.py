"""Real short LLaMA-Factory runs on the tiny BF16 model: what ``ktflow train`` refuses to publish.

A model with one NaN weight trains to NaN gradients; ``ktflow train`` must stop on the first
logged non-finite loss or gradient norm, exit non-zero with one line naming the step and the
value, and publish no adapter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_ktflow
from safetensors.torch import load_file, save_file

from ktflow.errors import KtflowInputError
from ktflow.train.training import check_finite

SHORT = {
    "stage": "sft",
    "backend": "hf",
    "lora": {"rank": 4, "alpha": 8, "target": "all"},
    "epochs": 1,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 64,
    "logging_steps": 2,
    "save_steps": 4,
}


def train(model: Path, tiny_tasks: Path, tmp_path: Path, spec: dict[str, Any] = SHORT) -> Any:
    return run_ktflow(
        "train", str(model), str(tiny_tasks / "style" / "train.json"), str(tmp_path / "adapter"),
        "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path), "--dataset-name", "style",
        "--spec", json.dumps(spec), check=False,
    )  # fmt: skip


def with_nan(tiny_bf16: Path, out: Path, tensor: str) -> Path:
    model = Path(shutil.copytree(tiny_bf16, out))
    for shard in sorted(model.glob("*.safetensors")):
        weights = load_file(str(shard))
        if tensor in weights:
            weights[tensor].view(-1)[0] = float("nan")
            save_file(weights, str(shard), metadata={"format": "pt"})
            return model
    raise AssertionError(f"{tensor} not in {tiny_bf16}")


@pytest.mark.slow
def test_nan_weight_stops_training_and_publishes_nothing(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    # One NaN in the final norm reaches every logit, so the first step's loss and gradients.
    model = with_nan(tiny_bf16, tmp_path / "nan-model", "model.norm.weight")
    result = train(model, tiny_tasks, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ktflow train: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "step 2 (epoch " in errors[0] and "grad_norm is nan" in errors[0], errors[0]
    assert "no adapter published" in errors[0]
    assert not (tmp_path / "adapter").exists()
    assert not list(tmp_path.glob(".adapter.*")), "no half-published adapter either"
    assert not list((tmp_path / "work" / "run").glob("adapter_model.safetensors"))


def test_adapter_with_a_nan_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    good = torch.zeros(4, 8, dtype=torch.bfloat16)
    bad = good.clone()
    bad[1, 2] = float("inf")
    bad[3, 0] = float("nan")
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a.lora_A.weight": good, "a.lora_B.weight": bad}, str(path))
    with pytest.raises(KtflowInputError) as caught:
        check_finite(path)
    assert caught.value.path == str(path) and caught.value.field == "a.lora_B.weight"
    assert "2 of 32 values are NaN or infinite" in caught.value.message
    save_file({"a.lora_A.weight": good, "a.lora_B.weight": good.clone()}, str(path))
    check_finite(path)


# ---- issue 13.6: throughput after a resume counts only the steps this process ran ---------------


def tokens_at(run_dir: Path, step: int) -> int:
    state = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return int(state["num_input_tokens_seen"])


@pytest.mark.slow
def test_throughput_after_a_resume_counts_only_this_process(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    # 64 rows / batch 4: 16 steps, checkpoints at 12 and 16 (LLaMA-Factory keeps the last two).
    run_dir, published = tmp_path / "work" / "run", tmp_path / "adapter" / "train_metrics.json"

    def metrics() -> dict[str, Any]:
        result = train(tiny_bf16, tiny_tasks, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return dict(json.loads(published.read_text()))

    fresh = metrics()
    assert fresh["resumed_from_step"] is None and fresh["steps_run"] == fresh["steps"] == 16
    assert fresh["throughput_basis"] == "steps run by this process"
    assert fresh["tokens_run"] == fresh["tokens_seen"] > 0 and fresh["step_time_s"] > 0
    at_12, at_16 = tokens_at(run_dir, 12), tokens_at(run_dir, 16)

    # Resumed from the final checkpoint: nothing left to train, so no throughput at all (not
    # the whole run's tokens over a near-zero runtime).
    nothing = metrics()
    assert nothing["resumed_from_step"] == 16 and nothing["steps_run"] == 0 and nothing["steps"] == 16
    assert nothing["tokens_per_s"] is None and nothing["step_time_s"] is None

    # Resumed from step 12: four steps and their tokens only.
    shutil.rmtree(run_dir / "checkpoint-16")
    resumed = metrics()
    assert resumed["resumed_from_step"] == 12 and resumed["steps_run"] == 4
    assert resumed["tokens_run"] == at_16 - at_12 and resumed["tokens_seen"] == at_16
    assert resumed["tokens_per_s"] == pytest.approx(resumed["tokens_run"] / resumed["seconds_run"], rel=1e-3)
    # The same model and data: per-step cost within a factor of a few of the fresh run's.
    assert 0.2 < resumed["step_time_s"] / fresh["step_time_s"] < 5


# ---- issue 13.8: a full disk while LLaMA-Factory writes a checkpoint is one line ---------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    """A 256 KiB tmpfs: room for the run's logs, not for one checkpoint (~480 KiB here)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=False)
    if made.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_one_line(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path, tiny_tmpfs: Path
) -> None:
    work = tiny_tmpfs / "work"
    result = run_ktflow(
        "train", str(tiny_bf16), str(tiny_tasks / "style" / "train.json"), str(tmp_path / "adapter"),
        "--work-dir", str(work), "--results-dir", str(tiny_tmpfs), "--dataset-name", "style",
        "--spec", json.dumps(SHORT), check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    # The preflight does not refuse a small disk as a hardware problem of the (finished) cast.
    assert "Traceback" not in result.stderr and "hardware" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ktflow train: error: ")]
    assert len(errors) == 1 and str(work / "run") in errors[0], result.stderr[-3000:]
    assert "the disk filled while LLaMA-Factory wrote a checkpoint" in errors[0]
    assert not (tmp_path / "adapter").exists()

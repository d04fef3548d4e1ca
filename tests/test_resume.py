"""A training run SIGKILLed after its first checkpoint resumes from it on rerun.

``ktflow train`` keeps LLaMA-Factory's output (checkpoints included) in ``--work-dir``,
which is not a Snakemake output (Snakemake deletes those before a job starts and after it
fails), and publishes the adapter only when training finishes. The test kills the whole
process group for real, checks nothing was published, reruns the same command and checks
that training went on from the checkpoint: the steps before it are not trained again and
the final adapter is complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ktflow_env
from safetensors import safe_open

# 64 examples / batch 4 = 16 steps an epoch, 3 epochs: 48 steps, a checkpoint every 4.
RANK = 8
SPEC = {
    "stage": "sft",
    "backend": "hf",
    "lora": {"rank": RANK, "alpha": 16, "target": "all"},
    "learning_rate": 5e-3,
    "epochs": 3,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 128,
    "warmup_ratio": 0.0,
    "logging_steps": 1,
    "save_steps": 4,
}
TOTAL_STEPS = 48


def train_command(tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "ktflow", "train", str(tiny_bf16), str(tiny_tasks / "style" / "train.json"),
        str(tmp_path / "adapter"), "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path),
        "--dataset-name", "style", "--spec", json.dumps(SPEC),
    ]  # fmt: skip


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(
        int(path.parent.name.split("-")[1]) for path in run_dir.glob("checkpoint-*/trainer_state.json")
    )


def logged_steps(run_dir: Path) -> list[int]:
    steps = []
    for line in (run_dir / "trainer_log.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line the kill cut short
            continue
        if "loss" in entry:
            steps.append(entry["current_steps"])
    return steps


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_resumes_from_it(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    command = train_command(tiny_bf16, tiny_tasks, tmp_path)
    run_dir = tmp_path / "work" / "run"
    first = subprocess.Popen(
        command,
        env=ktflow_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if first.poll() is None:
        os.killpg(first.pid, signal.SIGKILL)  # the trainer and its launcher, as a pre-emption would
    first.wait()
    assert first.returncode == -signal.SIGKILL, "training ended before the kill; the test needs more steps"
    killed_at = complete_checkpoints(run_dir)[-1]
    assert 0 < killed_at < TOTAL_STEPS
    assert not (tmp_path / "adapter").exists(), "nothing is published before training finishes"

    second = subprocess.run(command, env=ktflow_env(), capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resuming from {run_dir.resolve() / f'checkpoint-{killed_at}'}" in second.stderr
    # transformers' Trainer confirms it (Trainer._inner_training_loop's log line).
    log = second.stderr + second.stdout
    assert "Resuming training from checkpoint" in log and f"global step {killed_at}" in log

    # Both runs append to trainer_log.jsonl: steps up to the checkpoint are logged once (the
    # second run did not train them again), the ones after it at least once, up to the last.
    counts = Counter(logged_steps(run_dir))
    assert all(counts[step] == 1 for step in range(1, killed_at + 1)), "steps were trained again"
    assert all(counts[step] >= 1 for step in range(killed_at + 1, TOTAL_STEPS + 1))
    assert max(counts) == TOTAL_STEPS

    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == TOTAL_STEPS
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "train_metrics.json").read_text())["steps"] == TOTAL_STEPS
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == RANK
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert names and all(weights.get_tensor(name).isfinite().all() for name in names)
    assert any("lora_A" in name for name in names) and any("lora_B" in name for name in names)
    assert (adapter / "provenance.json").is_file()

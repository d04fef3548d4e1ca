"""The LLaMA-Factory trainer dies with `ktflow train`, and one trainer at a time owns a work dir.

Real processes throughout: a real `ktflow train` starts a real LLaMA-Factory run on the tiny
BF16 model; a second `ktflow train` on the same work dir is refused while the first holds
it; then only the `ktflow train` process is SIGKILLed (not its group, as when the OOM killer
picks it) and its trainer must be gone within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import ktflow_env
from test_resume import train_command  # 48 steps: the kill always comes mid-training

from ktflow.lifetime import claimed


def trainer_of(parent: psutil.Process, timeout_s: float) -> psutil.Process:
    """The LLaMA-Factory process `ktflow train` started, once it has logged a training step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in parent.children(recursive=True):
            try:
                if "ktflow.train.launch" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError("no LLaMA-Factory trainer started")


def refused_or_killed(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command``; a run that has not stopped after 60 s (it started training) is killed."""
    process = subprocess.Popen(
        command, env=ktflow_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_trainer_dies_with_ktflow_train_and_holds_the_work_dir_meanwhile(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    command = train_command(tiny_bf16, tiny_tasks, tmp_path)
    first = subprocess.Popen(command, env=ktflow_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer: psutil.Process | None = None
    try:
        trainer = trainer_of(psutil.Process(first.pid), timeout_s=120)
        log = tmp_path / "work" / "run" / "trainer_log.jsonl"
        deadline = time.monotonic() + 180
        while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.is_file(), "the trainer never logged a step"

        second = refused_or_killed(command)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("ktflow train: error: ")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert str(tmp_path / "work") in errors[0] and f"pid {first.pid}" in errors[0], errors[0]

        first.send_signal(signal.SIGKILL)  # only `ktflow train`: no handler of its own runs
        first.wait()
        _gone, alive = psutil.wait_procs([trainer], timeout=10)
        assert not alive, f"LLaMA-Factory (pid {trainer.pid}) outlived `ktflow train`"
        assert not (tmp_path / "adapter").exists()
        with claimed(tmp_path / "work", "test"):  # the kernel released the claim with its holders
            pass
    finally:
        if first.poll() is None:
            first.kill()
        if trainer is not None and trainer.is_running():
            trainer.kill()

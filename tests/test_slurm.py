"""The tiny default pipeline on a real single-node SLURM cluster, submitted with profiles/slurm.

``.ci/slurm.sh`` installs Debian's slurmctld, slurmd, slurmdbd (on a private MariaDB: the
executor plugin polls job states with sacct) and munge, configures one node on 127.0.0.1
under this host's name, starts them on private ports and, at the end, stops exactly the
daemons it started and removes their state. It needs root and apt (CI has both); the test
is skipped elsewhere. SLURM here has no GPUs, so a GPU step is checked at submission: the
plugin must ask for it with --gpus (from the rule's `gpu` resource), which sbatch refuses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, REPO, ktflow_env

SCRIPT = REPO / ".ci" / "slurm.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """SLURM_CONF of a running single-node cluster, torn down after the module's tests."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("setting up SLURM needs root and apt-get")
    state = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run([str(SCRIPT), "up", str(state)], capture_output=True, text=True, check=False)
        assert up.returncode == 0, f".ci/slurm.sh up failed:\n{up.stdout}\n{up.stderr}"
        match = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
        assert match, up.stdout
        yield {"SLURM_CONF": match[1]}
    finally:
        subprocess.run([str(SCRIPT), "down", str(state)], check=False)


def on_slurm(workdir: Path, cluster: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", str(workdir / "config.yaml"),
        "--profile", str(REPO / "profiles" / "slurm"), "--workflow-profile", "none",
        # A one-node test cluster can be polled every second; the profile keeps the plugin's default.
        "--slurm-init-seconds-before-status-checks", "1", *args,
    ]  # fmt: skip
    return subprocess.run(
        command,
        cwd=workdir,
        capture_output=True,
        text=True,
        env=ktflow_env(**cluster),
        check=False,
        timeout=1200,
    )


@pytest.mark.slow
def test_default_pipeline_on_slurm_gives_the_tables_of_a_local_run(
    cluster: dict[str, str], finished: Path, tmp_path: Path
) -> None:
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    result = on_slurm(tmp_path, cluster)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    assert len(submitted) >= 20, "every step but the `all` target runs as a SLURM job"
    # The cluster's own accounting (what the plugin polls) saw them finish.
    accounting = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State,Partition", "-j", ",".join(submitted)],
        capture_output=True, text=True, env=ktflow_env(**cluster), check=True,
    ).stdout  # fmt: skip
    states = {line.split("|")[0]: line.split("|")[1:] for line in accounting.splitlines() if line}
    assert {job: states[job][0] for job in submitted} == dict.fromkeys(submitted, "COMPLETED")
    partitions = {partition for _, partition in states.values()}
    assert partitions == {"cpu", "gpu"}, "train and infer go to the profile's gpu partition"
    for table in ("generation.csv", "accuracy.csv"):
        local = pd.read_csv(finished / "results" / "tables" / table)
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "tables" / table), local)


@pytest.mark.slow
def test_a_gpu_step_asks_slurm_for_gpus(cluster: dict[str, str], finished: Path, tmp_path: Path) -> None:
    shutil.copytree(finished, tmp_path / "run")
    work = tmp_path / "run"
    text = (work / "config.yaml").read_text()
    block = "resources:\n  threads: 2\n"
    assert text.count(block) == 1
    (work / "config.yaml").write_text(text.replace(block, block + "  gpus_train: 1\n"))
    # Only train takes a GPU; it is forced to run, alone, and this cluster has none.
    result = on_slurm(work, cluster, "--forcerun", "train", "--until", "train", "--retries", "0")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    call = re.search(r"sbatch call:\s*(sbatch .*)", log)
    assert call, log[-4000:]
    assert "--gpus=1" in call[1] and "-p gpu" in call[1].replace("'", "")
    assert "--gres" not in call[1]

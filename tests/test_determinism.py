"""Two clean runs of a reduced tiny default give byte-identical predictions, metrics and tables.

This module also holds what the fault and security tests share: the reduced config (the
default's DAG with tasks of 32/6 rows, one epoch and short generations, about a minute on
2 cores), a Snakemake runner, and ``clean_run(i)``, run at most once per session, with a
sentinel HF_TOKEN in its environment so the security test can look for it afterwards.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, ktflow_env
from conftest import snakemake as run_snakemake

REDUCED: dict[str, Any] = {
    "models": {"tiny-v3": {"tiny": {"seed": 0, "vocab_size": 1024, "shards": 4}, "cast": {"workers": 1}}},
    "tasks": {
        "style": {"tiny": {"n_train": 32, "n_test": 6}},
        "choice": {"tiny": {"n_train": 32, "n_test": 6}, "training": {"epochs": 1},
                   "inference": {"max_new_tokens": 4}},
    },
    "training": {
        "epochs": 1, "lora": {"rank": 4, "alpha": 8}, "cutoff_len": 128, "logging_steps": 2, "save_steps": 2,
    },
    "inference": {"max_new_tokens": 12, "batch_size": 4},
    "evaluation": {"workers": 1},
    "resources": {"threads": 1},
}  # fmt: skip
# Looks like a real token to anything that scans for one; it must never reach a file.
SENTINEL_TOKEN = "hf_ktflowSENTINEL" + uuid.uuid4().hex
# Provenance fields that describe the run rather than the result.
RUN_FIELDS = ("started", "ended", "seconds", "host", "extra")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def write_reduced_config(workdir: Path, **overrides: Any) -> Path:
    """The default config with the reduced sizes (and any overrides) written to workdir/config.yaml."""
    config = deep_merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), REDUCED)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(config, overrides), sort_keys=False))
    return path


def run_env() -> dict[str, str]:
    """ktflow's environment plus the sentinel token; the hub is off so nothing can leave the box."""
    return ktflow_env(HF_TOKEN=SENTINEL_TOKEN, HF_HUB_OFFLINE="1")


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Every run here carries the sentinel token, with the hub off."""
    return run_snakemake(workdir, *args, check=check, HF_TOKEN=SENTINEL_TOKEN, HF_HUB_OFFLINE="1")


_RUNS: dict[int, Path] = {}


def clean_run(factory: pytest.TempPathFactory, index: int) -> Path:
    """Workdir of the ``index``-th uninterrupted run of the reduced config (run once per session)."""
    if index not in _RUNS:
        workdir = factory.mktemp(f"clean{index}")
        write_reduced_config(workdir)
        snakemake(workdir)
        _RUNS[index] = workdir
    return _RUNS[index]


def result_files(workdir: Path, *kinds: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under results/<kind>/ (provenance records left out)."""
    found: dict[str, bytes] = {}
    for kind in kinds:
        for path in sorted((workdir / "results" / kind).rglob("*")):
            if path.is_file() and "provenance" not in path.name and not path.name.startswith("."):
                found[str(path.relative_to(workdir))] = path.read_bytes()
    return found


def provenance_records(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every provenance record of a run, without the fields that describe the run itself."""
    records = {}
    for path in sorted((workdir / "results").rglob("*provenance.json")):
        if ".work" in path.parts:
            continue
        record = json.loads(path.read_text())
        records[str(path.relative_to(workdir))] = {k: v for k, v in record.items() if k not in RUN_FIELDS}
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return clean_run(tmp_path_factory, 0), clean_run(tmp_path_factory, 1)


def differing(first: dict[str, bytes], second: dict[str, bytes]) -> list[str]:
    return sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kinds", [("predictions",), ("metrics",), ("tables", "report")], ids=["predictions", "metrics", "tables"]
)
def test_two_clean_runs_are_byte_identical(runs: tuple[Path, Path], kinds: tuple[str, ...]) -> None:
    first, second = (result_files(run, *kinds) for run in runs)
    assert first, kinds
    assert not differing(first, second)


def weights_and_data(workdir: Path) -> dict[str, bytes]:
    """Every tensor file and task file; the JSON beside them records paths and timings, so is left out."""
    found = result_files(workdir, "data")
    for path in sorted((workdir / "results").rglob("*.safetensors")):
        if not any(part.startswith(".") for part in path.relative_to(workdir).parts):
            found[str(path.relative_to(workdir))] = path.read_bytes()
    return found


@pytest.mark.slow
def test_weights_data_and_training_losses_are_identical(runs: tuple[Path, Path]) -> None:
    first, second = (weights_and_data(run) for run in runs)
    assert any("lora" in name for name in first) and any("bf16" in name for name in first)
    assert not differing(first, second)
    for task in ("style", "choice"):
        logs = [run / f"results/lora/tiny-v3/{task}/adapter/trainer_log.jsonl" for run in runs]
        losses = [[json.loads(line).get("loss") for line in log.read_text().splitlines()] for log in logs]
        assert losses[0] == losses[1] and any(loss is not None for loss in losses[0])


def reproducible_inputs(record: dict[str, Any]) -> dict[str, Any]:
    """Inputs whose bytes a run reproduces: weights, task files, predictions (an adapter dir also
    holds timings and absolute paths, which differ between runs and workdirs)."""
    return {
        name: identity
        for name, identity in record["inputs"].items()
        if name.endswith((".safetensors", "/train.json", "/test.json")) or "/predictions/" in name
    }


@pytest.mark.slow
def test_provenance_records_the_same_inputs(runs: tuple[Path, Path]) -> None:
    """The inference and scoring records name the same settings and input checksums in both runs."""
    first, second = (provenance_records(run) for run in runs)
    scored = [name for name in first if "/predictions/" in name or "/metrics/" in name]
    assert len(scored) >= 8
    for name in scored:
        assert first[name]["config"] == second[name]["config"], name
        assert reproducible_inputs(first[name]), name
        assert reproducible_inputs(first[name]) == reproducible_inputs(second[name]), name


@pytest.mark.slow
def test_seeds_are_in_the_config_and_the_provenance(runs: tuple[Path, Path]) -> None:
    workdir = runs[0]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert isinstance(config["seed"], int)
    seeded = {
        "train": workdir / "results/lora/tiny-v3/style/adapter/provenance.json",
        "infer": workdir / "results/predictions/tiny-v3/style/lora.provenance.json",
    }
    for step, path in seeded.items():
        record = json.loads(path.read_text())
        assert record["step"] == step
        assert record["config"]["seed"] == config["training" if step == "train" else "inference"]["seed"]
    # The tiny tasks and model take their seeds on the command line that Snakemake records.
    shellcmds = snakemake(workdir, "--detailed-summary").stdout
    assert f"--seed {config['seed']}" in shellcmds
    assert f"--seed {config['models']['tiny-v3']['tiny']['seed']}" in shellcmds


def test_reduced_config_is_valid_and_plans_the_default_dag(tmp_path: Path) -> None:
    write_reduced_config(tmp_path)
    out = snakemake(tmp_path, "-n").stdout
    for rule in ("tiny_model", "fetch", "cast", "train", "infer", "evaluate", "tables"):
        assert f"\n{rule} " in out, rule
    assert not (tmp_path / "results").exists()

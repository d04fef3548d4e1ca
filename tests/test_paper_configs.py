"""config/paper/*.yaml plan their whole matrix offline, with the write-up's hyperparameters."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN, REPO, ktflow_env

from ktflow.tables import GENERATION_COLUMNS

PAPER_CONFIGS = sorted((REPO / "config" / "paper").glob("*.yaml"))
# Planning must not need the network: hub access is switched off and proxies lead nowhere.
OFFLINE = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
# The write-up's LoRA recipe (its NekoQA throughput runs and the Kimi guide change some of it per task).
PUBLISHED = {
    "stage": "sft", "backend": "kt", "batch_size": 1, "learning_rate": 1e-4, "lr_scheduler": "cosine",
    "warmup_ratio": 0.1, "bf16": True,
}  # fmt: skip


def dry_run(config: Path, tmp_path: Path) -> str:
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", str(config), "-n", "-p",
               "--cores", "2"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=ktflow_env(**OFFLINE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def job_counts(out: str) -> dict[str, int]:
    table = out[out.index("Job stats:") :].split("\n\n")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def shell_specs(out: str, step: str) -> list[dict[str, Any]]:
    """The --spec JSON of every planned `ktflow <step>` command."""
    specs = []
    for line in out.splitlines():
        if line.startswith(f"Shell command: ktflow {step} "):
            words = shlex.split(line.removeprefix("Shell command: "))
            specs.append(json.loads(words[words.index("--spec") + 1]))
    return specs


def test_there_are_paper_configs() -> None:
    assert {p.stem for p in PAPER_CONFIGS} >= {"deepseek", "kimi-k2.5"}


@pytest.mark.parametrize("config_path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_dry_run_plans_the_whole_matrix_offline(config_path: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    models, tasks = config["experiments"]["models"], config["experiments"]["tasks"]
    out = dry_run(config_path, tmp_path)
    counts = job_counts(out)
    assert counts["fetch"] == counts["cast"] == len(models)
    assert counts["prepare_task"] == len(tasks)
    assert counts["train"] == counts["convert_lora"] == len(models) * len(tasks)
    assert counts["infer"] == counts["evaluate"] == 2 * len(models) * len(tasks)
    assert counts.get("convert_int8", 0) == sum(bool(config["models"][m].get("cpu_int8")) for m in models)
    assert not (tmp_path / config["results"]).exists()  # planning wrote nothing


@pytest.mark.parametrize("config_path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_planned_jobs_carry_the_published_settings(config_path: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    out = dry_run(config_path, tmp_path)
    training = shell_specs(out, "train")
    assert training
    for spec in training:
        assert {key: spec[key] for key in PUBLISHED} == PUBLISHED
        assert spec["lora"]["rank"] == 8
        assert spec["lora"]["target"] == "all"
        assert isinstance(spec["kt"], dict)
        assert spec["kt"]
        # The paper config wins over the tiny default that config/config.yaml merges underneath.
        for key in ("save_steps", "logging_steps", "template", "epochs"):
            assert spec[key] == config["training"][key], key
    assert {spec["backend"] for spec in shell_specs(out, "infer")} == {"sglang"}
    for spec in shell_specs(out, "prepare-task"):
        assert spec["source"] in ("hf-dataset", "url")


def test_deepseek_runs_use_the_benchmark_recipe(tmp_path: Path) -> None:
    out = dry_run(REPO / "config/paper/deepseek.yaml", tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("Shell command: ktflow train ")]
    for line in lines:
        words = shlex.split(line.removeprefix("Shell command: "))
        task = words[words.index("--dataset-name") + 1]
        spec = json.loads(words[words.index("--spec") + 1])
        if task == "nekoqa":  # the throughput benchmark's settings
            assert (spec["gradient_accumulation_steps"], spec["cutoff_len"]) == (16, 512)
            assert (spec["lora"]["alpha"], spec["lora"]["dropout"]) == (32, 0.1)
        else:
            assert (spec["gradient_accumulation_steps"], spec["cutoff_len"], spec["epochs"]) == (8, 2048, 3)
    split = {s["adapter"]: s["split"] for s in shell_specs(out, "prepare-task")}
    assert split["translational-style"] == {"method": "head", "train_rows": 10568}


@pytest.mark.parametrize("config_path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_published_numbers_match_the_experiments(config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    for model, tasks in config.get("tables", {}).get("paper", {}).items():
        assert model in config["experiments"]["models"]
        for task, variants in tasks.items():
            kind = config["tasks"][task]["kind"]
            expected = set(GENERATION_COLUMNS) if kind == "generation" else {"accuracy"}
            assert set(variants) <= {"base", "lora"}
            for values in variants.values():
                assert set(values) == expected, (model, task)

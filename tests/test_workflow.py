"""The whole DAG on the embedded default, run for real by Snakemake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, REPO, ktflow_env, snakemake, snakemake_command

RULES = ("fetch", "cast", "train", "convert_lora", "infer", "evaluate", "tables")
CACHED = ("fetch", "cast", "train", "convert_lora", "infer")
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"]


def test_rules_do_not_need_the_venv_on_path(workdir: Path) -> None:
    """`.venv/bin/snakemake` from a plain shell: the jobs find ktflow without the caller's PATH."""
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8"}
    assert str(BIN) not in bare["PATH"]
    plan = subprocess.run(
        snakemake_command(workdir, "-n"), cwd=workdir, env=bare, capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "\ntiny_tasks " in plan.stdout
    target = "results/data/style/train.json"
    job = subprocess.run(
        snakemake_command(workdir, target), cwd=workdir, env=bare, capture_output=True, text=True
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    assert json.loads((workdir / target).read_text()), "tiny_tasks wrote no rows"


def test_dry_run_plans_every_step(workdir: Path) -> None:
    out = snakemake(workdir, "-n").stdout
    for rule in RULES:
        assert f"\n{rule} " in out, rule


@pytest.mark.slow
def test_default_pipeline_lora_beats_base_on_every_metric(finished: Path) -> None:
    generation = pd.read_csv(finished / "results/tables/generation.csv").set_index("Model")
    base, lora = generation.loc["Tiny-DeepSeek-V3 (no LoRA)"], generation.loc["Tiny-DeepSeek-V3 + LoRA"]
    for metric in METRICS:
        assert lora[metric] > base[metric], metric
    accuracy = pd.read_csv(finished / "results/tables/accuracy.csv").set_index("Model")["Accuracy (official)"]
    assert accuracy["Tiny-DeepSeek-V3 + LoRA"] > accuracy["Tiny-DeepSeek-V3 (no LoRA)"]
    for suffix in (".md", ".html"):
        assert (finished / f"results/tables/generation{suffix}").is_file()


@pytest.mark.slow
def test_every_step_leaves_its_artifacts_and_provenance(finished: Path) -> None:
    results = finished / "results"
    bf16 = json.loads((results / "models/tiny-v3/bf16/config.json").read_text())
    assert "quantization_config" not in bf16
    assert (results / "lora/tiny-v3/style/adapter/adapter_model.safetensors").is_file()
    assert (results / "lora/tiny-v3/style/sglang/adapter_config.json").is_file()
    rows = (results / "predictions/tiny-v3/style/lora.jsonl").read_text().splitlines()
    assert len(rows) == 60 and set(json.loads(rows[0])) >= {"id", "prompt", "predict", "label"}
    provenance = json.loads((results / "predictions/tiny-v3/style/lora.provenance.json").read_text())
    assert provenance["config"]["do_sample"] is False and provenance["inputs"]
    for rule in RULES:
        assert any((results / "logs" / rule).rglob("*.log")), rule
        # Cached rules cannot have a benchmark file (Snakemake forbids it); provenance times them.
        if rule not in CACHED:
            assert any((results / "benchmarks" / rule).rglob("*.tsv")), rule


@pytest.mark.slow
def test_second_run_does_nothing(finished: Path) -> None:
    out = snakemake(finished, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_lint_and_format_are_clean(workdir: Path) -> None:
    lint = snakemake(workdir, "--lint", check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_bad_config_names_the_key(workdir: Path) -> None:
    text = (workdir / "config.yaml").read_text().replace("epochs: 6", "epochs: six")
    (workdir / "config.yaml").write_text(text)
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert "epochs" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_cli_help_lists_every_step() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ktflow", "--help"], capture_output=True, text=True, env=ktflow_env()
    )
    for step in (
        "tiny-model",
        "fetch",
        "cast",
        "train",
        "convert-lora",
        "convert-int8",
        "infer",
        "evaluate",
        "tables",
    ):
        assert step in out.stdout

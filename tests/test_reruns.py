"""Partial reruns, on copies of the finished default run (``finished``: its results, its
.snakemake metadata and its between-workflow cache), so each case costs only the rerun.

A config change plans exactly the steps it reaches (checked on Snakemake's ``-n`` jobs),
a real rerun runs exactly those, a return to an earlier config restores the long steps'
artifacts from the cache instead of recomputing them, and ``ktflow status`` says which steps
would run and why.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, ktflow_env, snakemake

from ktflow.code_version import code_modules, code_version
from ktflow.status import explain, parse_dry_run

MODEL = "tiny-v3"
AGGREGATES = {
    ("tables", "tables/generation.csv"),
    ("tables_html", "report/tables.html"),
    ("plots", "plots/loss.png"),
}


def jobs(
    rule: str,
    pattern: str,
    tasks: tuple[str, ...] = ("style", "choice"),
    variants: tuple[str, ...] = ("base", "lora"),
) -> set[tuple[str, str]]:
    """(rule, first output under results/) for each task and variant the pattern names."""
    return {(rule, pattern.format(model=MODEL, task=t, variant=v)) for t in tasks for v in variants}


def copy_of(finished: Path, tmp_path: Path) -> Path:
    work = tmp_path / "run"
    # Outputs that are symlinks into finished's cache are copied as files: the copy owns them.
    shutil.copytree(finished, work)
    return work


def edit(workdir: Path, old: str, new: str) -> None:
    path = workdir / "config.yaml"
    text = path.read_text()
    assert text.count(old) == 1, f"config.yaml no longer has exactly one {old!r}"
    path.write_text(text.replace(old, new))


def ran(result: subprocess.CompletedProcess[str]) -> set[tuple[str, str]]:
    """The jobs a (dry) run lists, as (rule, first output under results/)."""
    steps = parse_dry_run(result.stdout + result.stderr)
    return {(step.rule, step.outputs[0].removeprefix("results/")) for step in steps}


def status(workdir: Path) -> list[dict[str, object]]:
    out = workdir / "status.json"
    command = [sys.executable, "-m", "ktflow", "status", "--snakefile", str(REPO / "Snakefile")]
    command += ["--configfile", "config.yaml", "--json", str(out), "--", "--cache"]
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, env=ktflow_env(), check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps: list[dict[str, object]] = json.loads(out.read_text())
    return steps


def by_output(steps: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(step["outputs"][0]).removeprefix("results/"): step for step in steps}  # type: ignore[index]


TRAIN = jobs("train", "lora/{model}/{task}/adapter", variants=("",))
CONVERT = jobs("convert_lora", "lora/{model}/{task}/sglang", variants=("",))
INFER_LORA = jobs("infer", "predictions/{model}/{task}/lora.jsonl", variants=("",))
EVAL_LORA = jobs("evaluate", "metrics/{model}/{task}/lora.json", variants=("",))
STYLE = ("style",)
CASES = {
    # `choice` keeps its own inference block and is an MCQ task (no generation flavour).
    "evaluation setting": (
        "flavour: paper", "flavour: standard",
        jobs("evaluate", "metrics/{model}/{task}/{variant}.json", STYLE) | AGGREGATES,
    ),
    "inference setting": (
        "max_new_tokens: 48", "max_new_tokens: 40",
        jobs("infer", "predictions/{model}/{task}/{variant}.jsonl", STYLE)
        | jobs("evaluate", "metrics/{model}/{task}/{variant}.json", STYLE) | AGGREGATES,
    ),
    "LoRA rank": (
        "lora: {rank: 16,", "lora: {rank: 8,",
        TRAIN | CONVERT | INFER_LORA | EVAL_LORA | AGGREGATES,
    ),
    "a comment": ("# ktflow default:", "# ktflow's default (this comment was edited):", set()),
    "nothing": ("", "", set()),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_change_plans_exactly_the_steps_it_reaches(finished: Path, tmp_path: Path, case: str) -> None:
    old, new, expected = CASES[case]
    work = copy_of(finished, tmp_path)
    if old:
        edit(work, old, new)
    planned = ran(snakemake(work, "-n", "--cache"))
    assert planned == expected
    assert not {"fetch", "cast", "tiny_model"} & {rule for rule, _ in planned}


@pytest.mark.slow
def test_a_real_rerun_runs_exactly_the_planned_steps_then_nothing(finished: Path, tmp_path: Path) -> None:
    work = copy_of(finished, tmp_path)
    edit(work, "  flavour: paper\n  workers: 2\n", "  flavour: paper\n  workers: 1\n")  # every evaluate job
    expected = jobs("evaluate", "metrics/{model}/{task}/{variant}.json") | AGGREGATES
    assert ran(snakemake(work, "-n", "--cache")) == expected
    assert ran(snakemake(work, "--cache")) == expected
    record = json.loads((work / "results/metrics/tiny-v3/style/lora.provenance.json").read_text())
    assert record["config"]["workers"] == 1
    untouched = "results/predictions/tiny-v3/style/lora.provenance.json"  # with its start and end times
    assert (work / untouched).read_text() == (finished / untouched).read_text()
    for table in ("generation.csv", "accuracy.csv"):  # the same predictions score the same
        expected_table = pd.read_csv(finished / "results/tables" / table)
        pd.testing.assert_frame_equal(pd.read_csv(work / "results/tables" / table), expected_table)
    again = snakemake(work, "-n", "--cache")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_returning_to_an_earlier_config_restores_its_artifacts_from_the_cache(
    finished: Path, tmp_path: Path
) -> None:
    work = copy_of(finished, tmp_path)
    original = (work / "config.yaml").read_text()
    # A cheap change that still retrains (one epoch of `style`): config B.
    style_block = "    tiny: {n_train: 400, n_test: 60}\n"
    edit(work, style_block, style_block + "    training: {epochs: 1}\n")
    style = {job for job in TRAIN | CONVERT | INFER_LORA | EVAL_LORA if "/style/" in job[1]}
    assert ran(snakemake(work, "--cache")) == style | AGGREGATES
    adapter = "results/lora/tiny-v3/style/adapter/train_metrics.json"
    assert (
        json.loads((work / adapter).read_text())["steps"]
        < json.loads((finished / adapter).read_text())["steps"]
    )

    # Back to config A: Snakemake reruns what B changed, and the cache has A's long steps.
    (work / "config.yaml").write_text(original)
    steps = by_output(status(work))
    assert steps["lora/tiny-v3/style/adapter"]["state"] == "restore"
    assert "epochs: 1 -> 6" in steps["lora/tiny-v3/style/adapter"]["why"]  # type: ignore[operator]
    assert steps["predictions/tiny-v3/style/lora.jsonl"]["state"] == "restore"
    assert steps["metrics/tiny-v3/style/lora.json"]["state"] == "rerun"  # cheap, not cached
    for output in (
        "models/tiny-v3/bf16",
        "lora/tiny-v3/choice/adapter",
        "predictions/tiny-v3/style/base.jsonl",
    ):
        assert steps[output]["state"] == "up to date", output

    back = snakemake(work, "--cache")
    assert ran(back) == style | AGGREGATES
    log = back.stdout + back.stderr
    for _, output in style - EVAL_LORA:
        assert re.search(rf"Symlinking output file results/{re.escape(output)}(/\S+)? from cache", log), (
            output
        )
    # Restored, not recomputed: the records of A's runs (wall times, start/end) come back.
    for record in (adapter, "results/predictions/tiny-v3/style/lora.provenance.json"):
        assert (work / record).read_text() == (finished / record).read_text()
    for table in ("generation.csv", "accuracy.csv"):
        expected = pd.read_csv(finished / "results/tables" / table)
        pd.testing.assert_frame_equal(pd.read_csv(work / "results/tables" / table), expected)
    again = snakemake(work, "-n", "--cache")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_status_says_what_would_rerun_and_why(finished: Path, tmp_path: Path) -> None:
    work = copy_of(finished, tmp_path)
    steps = by_output(status(work))
    assert {step["state"] for step in steps.values()} == {"up to date"}
    old, new, expected = CASES["LoRA rank"]
    edit(work, old, new)
    steps = by_output(status(work))
    rerun = {(str(step["rule"]), output) for output, step in steps.items() if step["state"] != "up to date"}
    assert rerun == expected
    for task in ("style", "choice"):
        assert "lora.rank: 16 -> 8" in steps[f"lora/tiny-v3/{task}/adapter"]["why"]  # type: ignore[operator]
        assert steps[f"predictions/tiny-v3/{task}/lora.jsonl"]["why"] == ["after train"]
        assert steps[f"predictions/tiny-v3/{task}/base.jsonl"]["state"] == "up to date"
    assert steps["models/tiny-v3/bf16"]["state"] == "up to date"


def test_status_explains_snakemakes_params_reason_as_config_keys() -> None:
    from snakemake.persistence import ParamsChange

    old = ['{"epochs":6,"lora":{"rank":16}}', "ktflow-code:train:0.1.0+aaaaaaaaaaaa"]
    new = ['{"epochs":6,"lora":{"rank":8},"seed":1}', "ktflow-code:train:0.1.0+bbbbbbbbbbbb"]
    change = ParamsChange(only_old={repr(v) for v in old}, only_new={repr(v) for v in new})
    reason = f"Code has changed since last execution; Params have changed since last execution: {change}"
    assert explain(reason, {}) == [
        "rule's command changed",
        "code of `ktflow train` changed",
        "lora.rank: 16 -> 8",
        "seed added (1)",
    ]
    updated = "Input files updated by another job: results/a, results/b"
    assert explain(updated, {"results/a": "train", "results/b": "cast"}) == ["after cast, train"]


def test_a_steps_code_version_covers_the_code_it_runs_and_no_other() -> None:
    train = code_modules("train")
    assert {"ktflow.train.training", "ktflow.train.spec", "ktflow.atomic", "ktflow.provenance"} <= set(train)
    assert "ktflow.steps.train" in train  # the command's entry module
    assert "ktflow.train.launch" in train  # started with `python -m`, not imported
    assert "ktflow.train.plan" not in train  # the Snakefile's, not the step's
    # Other steps' code: training reaches none of it (it used to, through doctor and infer).
    others = {
        "ktflow.metrics",
        "ktflow.cast",
        "ktflow.infer",
        "ktflow.fetch",
        "ktflow.steps.doctor",
        "ktflow.errors",
    }
    assert not others & set(train)
    assert "ktflow.train.doctor" in code_modules("doctor")  # the doctor rule now carries a version
    assert code_version("train").startswith("ktflow-code:train:")
    assert code_version("train").split("+")[1] != code_version("infer").split("+")[1]

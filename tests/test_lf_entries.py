"""LLaMA-Factory dataset entries as users have them: copied from its dataset_info.json, unedited.

tests/fixtures/llamafactory holds data in the layouts of LLaMA-Factory's demo sets
(alpaca_en_demo, dpo_en_demo, kto_en_demo) with the entries exactly as LLaMA-Factory ships
them. Each entry goes into ``training.dataset`` as it is: the config schema and the plan
accept it, ``ktflow train`` checks the rows by the entry's columns and tags and writes the
dataset_info LLaMA-Factory reads, and LLaMA-Factory really trains on the KTO one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, ktflow_env

from ktflow.config import check_config
from ktflow.errors import KtflowInputError
from ktflow.readers.rows import load_rows
from ktflow.train import plan
from ktflow.train.datasets import check_rows, dataset_entry

FIXTURES = REPO / "tests" / "fixtures" / "llamafactory"
ENTRIES: dict[str, dict[str, Any]] = json.loads((FIXTURES / "dataset_info.json").read_text())
STAGES = {"alpaca_en_demo": "sft", "dpo_en_demo": "dpo", "kto_en_demo": "kto"}
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SPEC: dict[str, Any] = {
    "backend": "hf", "lora": {"rank": 4, "alpha": 8, "target": "all"}, "learning_rate": 5e-3,
    "epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1, "cutoff_len": 64, "logging_steps": 1,
    "save_steps": 100, "llamafactory_args": {"max_steps": 2},
}  # fmt: skip


def workdir_with(tmp_path: Path, name: str) -> dict[str, Any]:
    """The working directory holds the demo file; the training block carries the entry unedited."""
    shutil.copy(FIXTURES / ENTRIES[name]["file_name"], tmp_path / ENTRIES[name]["file_name"])
    return {**SPEC, "stage": STAGES[name], "dataset": ENTRIES[name]}


@pytest.mark.parametrize("name", list(STAGES))
def test_the_config_schema_and_plan_take_the_entry_unedited(name: str, tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tasks"]["style"]["training"] = {"stage": STAGES[name], "dataset": ENTRIES[name]}
    check_config(config, "config.yaml", schema=SCHEMA)
    plan.check_training(config, "config.yaml")
    assert plan.train_data(config, "style", "results") == (ENTRIES[name]["file_name"],) * 2


def train_in(workdir: Path, *args: str) -> None:
    """``ktflow train`` run from the working directory, as the workflow's job runs it."""
    command = [sys.executable, "-m", "ktflow", "train", *args]
    result = subprocess.run(command, cwd=workdir, env=ktflow_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("name", list(STAGES))
def test_train_checks_the_rows_and_hands_lf_its_own_entry(name: str, tiny_bf16: Path, tmp_path: Path) -> None:
    spec = workdir_with(tmp_path, name)
    work = tmp_path / "work"
    train_in(tmp_path, str(tiny_bf16), ENTRIES[name]["file_name"], "out", "--work-dir", str(work),
             "--dataset-name", name, "--spec", json.dumps(spec), "--render-only")  # fmt: skip
    info = json.loads((work / "data" / "dataset_info.json").read_text())[name]
    assert info["file_name"] == str(tmp_path / ENTRIES[name]["file_name"])
    assert all(info[key] == value for key, value in ENTRIES[name].items() if key != "file_name")
    assert info.get("ranking", False) == (name == "dpo_en_demo")
    assert yaml.safe_load((work / "llamafactory.yaml").read_text())["stage"] == STAGES[name]


def test_a_ranked_entry_is_refused_for_a_stage_that_does_not_rank() -> None:
    with pytest.raises(KtflowInputError) as caught:
        dataset_entry("dpo_en_demo.json", "kto", {k: v for k, v in ENTRIES["dpo_en_demo"].items()})
    assert caught.value.field in ("training.dataset.ranking", "training.dataset.file_name")
    with pytest.raises(KtflowInputError) as caught:
        dataset_entry("x.json", "kto", {"ranking": True})
    assert caught.value.field == "training.dataset.ranking"


def test_kto_rows_against_the_demo_tags_name_row_and_field(tmp_path: Path) -> None:
    rows = load_rows(FIXTURES / "kto_en_demo.json")
    entry = dataset_entry("kto_en_demo.json", "kto", {k: v for k, v in ENTRIES["kto_en_demo"].items()
                                                       if k != "file_name"})  # fmt: skip
    check_rows("kto_en_demo.json", rows, "kto", entry)
    rows[2]["messages"][1]["role"] = "gpt"  # LLaMA-Factory's default tag, not this entry's
    with pytest.raises(KtflowInputError) as caught:
        check_rows("kto_en_demo.json", rows, "kto", entry)
    assert caught.value.field == "row 3.messages[1].role"


@pytest.mark.slow
def test_llamafactory_trains_kto_from_the_demo_entry(tiny_bf16: Path, tmp_path: Path) -> None:
    spec = workdir_with(tmp_path, "kto_en_demo")
    out = tmp_path / "adapter"
    train_in(tmp_path, str(tiny_bf16), "kto_en_demo.json", str(out), "--work-dir", str(tmp_path / "work"),
             "--dataset-name", "kto_en_demo", "--spec", json.dumps(spec),
             "--results-dir", str(tmp_path))  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file()
    info = json.loads((tmp_path / "work" / "data" / "dataset_info.json").read_text())["kto_en_demo"]
    assert info["tags"] == ENTRIES["kto_en_demo"]["tags"] and info["columns"]["kto_tag"] == "label"
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 2
    over = json.loads((out / "provenance.json").read_text())["extra"]["over_cutoff"]
    assert over["rows"] == 8 and over["over_cutoff"] == 0 and 0 < over["longest_text_tokens"] <= 64
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert next(entry["loss"] for entry in log if entry.get("loss") is not None) == pytest.approx(
        0.5, abs=0.02
    )

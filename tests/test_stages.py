"""Stages and pipeline wiring: SFT, DPO and KTO trained for real by LLaMA-Factory on the tiny
default, their tiny data, the per-task plan (data, environment, preflight) and the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN, REPO, ktflow_env, run_ktflow

from ktflow.errors import KtflowInputError
from ktflow.tiny.tasks import LETTERS, choice_task, derive, style_task
from ktflow.train import plan

SPEC: dict[str, Any] = {
    "backend": "hf",
    "lora": {"rank": 8, "alpha": 16, "target": "all"},
    "learning_rate": 5e-3,
    "epochs": 1,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 128,
    "warmup_ratio": 0.0,
    "logging_steps": 1,
    "save_steps": 100,
    "llamafactory_args": {"max_steps": 4},  # a few real optimizer steps per stage
}
# Loss at step 0, where the policy equals the reference: DPO -log sigmoid(0) = ln 2; KTO 1 - sigmoid(0).
START_LOSS = {"dpo": 0.6931, "kto": 0.5}
OFFLINE = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


# ---------------------------------------------------------------- tiny preference data
def test_derived_formats_keep_the_rows_and_add_wrong_answers() -> None:
    train, _ = style_task(42, 40, 0)
    assert derive("style", train, "alpaca", 42) is train  # the alpaca output is unchanged
    pairs = derive("style", train, "pairwise", 42)
    assert [p["id"] for p in pairs] == [r["id"] for r in train]
    assert all(
        p["chosen"] == r["output"] and p["rejected"] != p["chosen"] for p, r in zip(pairs, train, strict=True)
    )
    assert all(p["rejected"].lower() == r["input"].lower() for p, r in zip(pairs, train, strict=True))
    kto = derive("style", train, "kto", 42)
    assert [row["kto_tag"] for row in kto[:4]] == [True, False, True, False]
    assert sum(row["kto_tag"] for row in kto) == len(kto) // 2
    assert all(row["output"] == (r["output"] if row["kto_tag"] else p["rejected"])
               for row, r, p in zip(kto, train, pairs, strict=True))  # fmt: skip
    chat = derive("style", train, "sharegpt", 42)[0]["conversations"]
    assert chat[0]["value"] == f"{train[0]['instruction']}\n{train[0]['input']}"
    assert chat[1] == {"from": "gpt", "value": train[0]["output"]}


def test_choice_rejections_are_wrong_letters_and_seeded() -> None:
    train, _ = choice_task(42, 50, 0)
    pairs = derive("choice", train, "pairwise", 42)
    assert all(
        p["rejected"] in LETTERS and p["rejected"] != r["output"] for p, r in zip(pairs, train, strict=True)
    )
    assert pairs == derive("choice", train, "pairwise", 42)
    assert [p["rejected"] for p in pairs] != [p["rejected"] for p in derive("choice", train, "pairwise", 7)]


# ---------------------------------------------------------------- real training, one per stage
@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "fmt"), [("sft", "alpaca"), ("sft", "sharegpt"), ("dpo", "pairwise"), ("kto", "kto")]
)
def test_each_stage_trains_for_real(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path, stage: str, fmt: str
) -> None:
    data = tmp_path / "data"
    source = tiny_tasks / "style" / "train.json"
    run_ktflow("tiny-tasks", "style", str(data), "--format", fmt, "--from", str(source), "--seed", "42")
    spec = {**SPEC, "stage": stage, "format": fmt}
    if stage == "kto":
        # The backend's interpreter by another path: LLaMA-Factory runs under it (training.python).
        spec["python"] = {"hf": str(Path(sys.executable).parent / ".." / "bin" / Path(sys.executable).name)}
    out = tmp_path / "adapter"
    run_ktflow(
        "train", str(tiny_bf16), str(data / "train.json"), str(out), "--work-dir", str(tmp_path / "work"),
        "--dataset-name", "style", "--spec", json.dumps(spec), "--results-dir", str(tmp_path),
    )  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    rendered = yaml.safe_load((out / "llamafactory.yaml").read_text())
    assert rendered["stage"] == stage and rendered["use_cpu"] is True
    info = json.loads((tmp_path / "work" / "data" / "dataset_info.json").read_text())
    assert info["style"].get("ranking", False) == (stage == "dpo")
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_per_s"] > 0 and metrics["step_time_s"] > 0
    assert metrics["peak_host_rss_mb"] > 100 and metrics["stage"] == stage
    assert metrics["gpu_peak_allocated_mb"] is None  # recorded by the callback in the training process
    assert [r["max_allocated_bytes"] for r in metrics["gpu_ranks"]] == [None]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if entry.get("loss") is not None]
    if stage == "sft":
        assert losses[-1] < losses[0], losses
    else:  # the preference stages moved the policy towards the preferred answers
        assert losses[0] == pytest.approx(START_LOSS[stage], abs=0.02) and losses[-1] < START_LOSS[stage], (
            losses
        )
        assert any(out.glob("training_rewards_*.png"))
    if stage == "kto":
        assert metrics["python"] == os.path.normpath(spec["python"]["hf"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["extra"]["doctor"].startswith("HF backend: can run here")


# ---------------------------------------------------------------- plan (no Snakemake)
def config_with(**training: Any) -> dict[str, Any]:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["training"].pop("format", None)
    config["training"].update(training)
    return config


def test_plan_picks_data_environment_and_preflight_per_task() -> None:
    config = config_with(stage="dpo")
    assert plan.train_data(config, "style", "res") == ("res/data/style/pairwise/train.json",) * 2
    assert plan.train_data(config_with(), "choice", "res") == ("res/data/choice/train.json",) * 2
    config["tasks"]["choice"]["training"]["dataset"] = {"hf_hub_url": "org/prefs", "split": "train"}
    assert plan.train_data(config, "choice", "res") == (None, "hf:org/prefs")
    assert plan.preflight_tasks(config) == []
    kt = config_with(backend="kt")
    assert plan.preflight_tasks(kt) == ["style", "choice"] and plan.env_name(kt, "style") == "kt"
    kt["training"]["kt"] = {"generation": "legacy"}
    assert plan.env_name(kt, "style") == "kt-legacy"
    assert plan.env_name(config_with(backend="unsloth"), "choice") == "unsloth"
    assert plan.env_name(config, "style") == "ktflow"


def test_plan_refuses_a_preference_stage_without_preference_data() -> None:
    config = config_with(stage="kto")
    config["tasks"]["style"] = {
        "kind": "generation",
        "source": "file",
        "train_file": "a.json",
        "test_file": "b.json",
    }
    with pytest.raises(KtflowInputError) as caught:
        plan.check_training(config)
    assert (
        caught.value.field == "tasks.style.training.dataset" and "kto training data" in caught.value.message
    )
    config["tasks"]["style"]["training"] = {"dataset": {"file": "k.jsonl", "hf_hub_url": "org/k"}}
    with pytest.raises(KtflowInputError, match="not both"):
        plan.check_training(config)


# ---------------------------------------------------------------- the rules
def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=ktflow_env(**OFFLINE))
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def job_counts(out: str) -> dict[str, int]:
    table = out[out.index("Job stats:") :].split("\n\n")[0]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture
def default_config(tmp_path: Path) -> Path:
    """The default config; a stage switches with one key (the format follows the stage)."""
    text = (REPO / "config" / "config.yaml").read_text().replace("  format: alpaca\n", "")
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path / "config.yaml"


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_one_key_switches_the_stage(default_config: Path, stage: str) -> None:
    out = snakemake(default_config.parent, "--configfile", str(default_config), "-n", "-p", "--cores", "2",
                    "--config", f"training={{'stage': '{stage}'}}").stdout  # fmt: skip
    assert job_counts(out)["tiny_tasks_format"] == 2
    fmt = {"dpo": "pairwise", "kto": "kto"}[stage]
    derive_step = f"ktflow tiny-tasks style results/data/style/{fmt} --format {fmt}"
    assert f"{derive_step} --from results/data/style/train.json" in out
    assert f"ktflow train results/models/tiny-v3/bf16 results/data/style/{fmt}/train.json" in out


def test_gpu_backends_plan_a_preflight_offline(default_config: Path) -> None:
    for extra in (["--config", "training={'backend': 'kt'}"], []):
        out = snakemake(default_config.parent, "--configfile", str(default_config), *extra, "-n", "-p",
                        "--cores", "2").stdout  # fmt: skip
        counts = job_counts(out)
        assert counts.get("doctor", 0) == (2 if extra else 0)
    for example in sorted((REPO / "config" / "examples").glob("*.yaml")):
        out = snakemake(default_config.parent, "--configfile", str(default_config), str(example), "-n", "-p",
                        "--cores", "2").stdout  # fmt: skip
        assert job_counts(out)["doctor"] >= 1, example.name
        assert "ktflow doctor --training " in out


@pytest.mark.slow
def test_a_kt_run_stops_at_the_preflight_with_what_to_fix(default_config: Path) -> None:
    from ktflow.host.report import collect_host
    from ktflow.train.preflight import check_backend

    if not [p for p in check_backend(collect_host(), "kt", None) if p.severity == "error"]:
        pytest.skip("this host can run the KT backend")
    workdir = default_config.parent
    result = snakemake(workdir, "--configfile", str(default_config), "--cores", "1",
                       "--config", "training={'backend': 'kt'}", check=False)  # fmt: skip
    assert result.returncode != 0
    assert "ktflow doctor: hardware: KT backend: cannot run here" in result.stderr
    assert not (workdir / "results" / "models" / "tiny-v3" / "bf16").exists()  # nothing expensive ran first
    assert not (workdir / "results" / "lora").exists()


@pytest.mark.slow
def test_the_pipeline_trains_a_dpo_adapter_from_one_key(default_config: Path) -> None:
    workdir = default_config.parent
    config = yaml.safe_load(default_config.read_text())
    config["tasks"]["style"]["tiny"] = {"n_train": 32, "n_test": 8}  # short: the test's own settings
    config["training"]["llamafactory_args"] = {"max_steps": 4}
    default_config.write_text(yaml.safe_dump(config))
    target = "results/lora/tiny-v3/style/adapter"
    snakemake(workdir, "--configfile", str(default_config), "--cores", "2", target,
              "--config", "training={'stage': 'dpo'}")  # fmt: skip
    pairs = json.loads((workdir / "results/data/style/pairwise/train.json").read_text())
    assert len(pairs) == 32 and {"chosen", "rejected"} <= set(pairs[0])
    adapter = workdir / target
    assert yaml.safe_load((adapter / "llamafactory.yaml").read_text())["stage"] == "dpo"
    assert json.loads((adapter / "train_metrics.json").read_text())["steps"] == 4
    shutil.rmtree(workdir / "results")


# ---------------------------------------------------------------- device host (CUDA, AMX)
def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_gpu_peak_memory_is_recorded_on_cuda(tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    run_ktflow(
        "train", str(tiny_bf16), str(tiny_tasks / "style" / "train.json"), str(out), "--work-dir",
        str(tmp_path / "work"), "--dataset-name", "style", "--spec", json.dumps({**SPEC, "stage": "sft"}),
    )  # fmt: skip
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert (
        metrics["gpu_peak_allocated_mb"] > 0
        and metrics["gpu_peak_reserved_mb"] >= metrics["gpu_peak_allocated_mb"]
    )
    assert metrics["gpu_ranks"][0]["device"] and metrics["tokens_per_s"] > 0
    assert "use_cpu" not in yaml.safe_load((out / "llamafactory.yaml").read_text())


@pytest.mark.gpu
@pytest.mark.amx
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_kt_backend_trains_for_real(tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    """KTFLOW_KT_PYTHON: the KT environment's interpreter or venv (default: this one);
    KTFLOW_KT_MODEL: a BF16 MoE checkpoint KT supports, should the tiny geometry be refused."""
    from ktflow.host.packages import PACKAGES
    from ktflow.host.python_env import inspect_env, resolve_python
    from ktflow.host.report import collect_host
    from ktflow.train.backends.kt import resolve_generation
    from ktflow.train.preflight import check_backend, verdict

    python = resolve_python(os.environ.get("KTFLOW_KT_PYTHON"), "KTFLOW_KT_PYTHON")
    env = inspect_env(python, PACKAGES)
    label = "kt" if resolve_generation(None, env.packages) == "current" else "kt-legacy"
    problems = check_backend(collect_host(tmp_path, env), label, None)
    if any(p.severity == "error" for p in problems):
        pytest.skip(verdict(label, problems))
    model = Path(os.environ.get("KTFLOW_KT_MODEL", tiny_bf16))
    threads = max(1, (os.cpu_count() or 2) // 2)
    spec = {**SPEC, "stage": "sft", "backend": "kt", "bf16": True, "kt": {"num_threads": threads}}
    if python is not None:
        spec["python"] = {"kt": str(python)}
    out = tmp_path / "adapter"
    run_ktflow(
        "train", str(model), str(tiny_tasks / "style" / "train.json"), str(out), "--work-dir",
        str(tmp_path / "work"), "--dataset-name", "style", "--spec", json.dumps(spec),
    )  # fmt: skip
    rendered = yaml.safe_load((out / "llamafactory.yaml").read_text())
    assert rendered["use_kt"] is True and rendered["kt_config"]["kt_num_threads"] == threads
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["backend"] == label and metrics["steps"] == 4 and metrics["tokens_per_s"] > 0
    assert metrics["gpu_peak_allocated_mb"] > 0 and metrics["peak_host_rss_mb"] > 0
    assert (out / "adapter_model.safetensors").is_file()

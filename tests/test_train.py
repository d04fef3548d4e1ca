"""Training: dataset checks, YAML rendering per backend, and a real LLaMA-Factory SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_ktflow

from ktflow.errors import KtflowInputError
from ktflow.train.backends import backend_for
from ktflow.train.datasets import check_rows, load_rows
from ktflow.train.spec import TrainSpec

SPEC = {
    "stage": "sft",
    "backend": "hf",
    "lora": {"rank": 8, "alpha": 16, "target": "all"},
    "learning_rate": 5e-3,
    "epochs": 2,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 128,
    "warmup_ratio": 0.0,
    "logging_steps": 2,
    "save_steps": 4,
}


def spec_for(tmp: Path, **overrides: object) -> TrainSpec:
    return TrainSpec.from_config(
        {**SPEC, **overrides}, model_dir=tmp / "m", dataset_dir=tmp / "d", dataset="x", output_dir=tmp / "o"
    )


def test_hf_render_maps_config_and_passes_unknown_keys_through(tmp_path: Path) -> None:
    rendered = backend_for("hf").render(
        spec_for(tmp_path, llamafactory_args={"neftune_noise_alpha": 5, "seed": 7})
    )
    assert rendered["lora_rank"] == 8 and rendered["lora_alpha"] == 16
    assert rendered["stage"] == "sft" and rendered["finetuning_type"] == "lora"
    assert rendered["neftune_noise_alpha"] == 5
    assert rendered["seed"] == 7  # passthrough wins
    assert rendered["use_cpu"] is True  # no CUDA here


def llamafactory_train_keys() -> set[str]:
    import dataclasses

    from ktflow.lf_launch import import_llamafactory

    import_llamafactory()
    from llamafactory.hparams.parser import _TRAIN_ARGS

    return {field.name for cls in _TRAIN_ARGS for field in dataclasses.fields(cls)}


def test_hf_yaml_parses_with_llamafactory_on_this_host(tmp_path: Path) -> None:
    from llamafactory.hparams.parser import _parse_train_args

    llamafactory_train_keys()
    _, _, training_args, finetuning_args, _ = _parse_train_args(
        backend_for("hf").render(spec_for(tmp_path))
    )
    assert finetuning_args.lora_rank == 8 and training_args.use_cpu


@pytest.mark.parametrize("backend", ["hf", "kt", "unsloth"])
def test_rendered_keys_are_all_accepted_by_llamafactory(tmp_path: Path, backend: str) -> None:
    # LLaMA-Factory's parser rejects unknown keys ("Some keys are not used"); check the set.
    rendered = backend_for(backend).render(spec_for(tmp_path))
    assert set(rendered) - llamafactory_train_keys() == set()


@pytest.mark.parametrize(
    ("rows", "fmt", "field"),
    [
        ([{"instruction": "a"}], "alpaca", "row 0.output"),
        ([{"instruction": "a", "output": ""}], "alpaca", "row 0.output"),
        ([{"instruction": "a", "chosen": "x"}], "pairwise", "row 0.rejected"),
        ([{"instruction": "a", "output": "b", "kto_tag": "yes"}], "kto", "row 0.kto_tag"),
        (["not an object"], "alpaca", "row 0"),
    ],
)
def test_bad_rows_name_the_row_and_field(rows: list[object], fmt: str, field: str) -> None:
    with pytest.raises(KtflowInputError) as error:
        check_rows(Path("train.json"), rows, fmt)  # type: ignore[arg-type]
    assert error.value.field == field and error.value.path == "train.json"


def test_load_rows_rejects_invalid_utf8_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(KtflowInputError, match="UTF-8"):
        load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KtflowInputError, match="empty"):
        load_rows(empty)


def test_stage_format_mismatch_fails_before_training(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    result = run_ktflow(
        "train", str(tiny_bf16), str(tiny_tasks / "style" / "train.json"), str(tmp_path / "out"),
        "--work-dir", str(tmp_path / "work"), "--spec", json.dumps({**SPEC, "stage": "dpo"}), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "stage dpo needs data in" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_real_sft_run_publishes_adapter_and_metrics(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    run_ktflow(
        "train", str(tiny_bf16), str(tiny_tasks / "style" / "train.json"), str(out),
        "--work-dir", str(tmp_path / "work"), "--dataset-name", "style", "--spec", json.dumps(SPEC),
    )  # fmt: skip
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_log.jsonl",
        "training_loss.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 16 and metrics["tokens_per_s"] > 0 and metrics["peak_host_rss_mb"] > 100
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert losses[-1] < losses[0] * 0.7, losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    rendered = yaml.safe_load((out / "llamafactory.yaml").read_text())
    assert rendered["dataset"] == "style" and rendered["use_cpu"] is True
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["config"]["lora"]["rank"] == 8
    assert "llamafactory" in provenance["packages"]

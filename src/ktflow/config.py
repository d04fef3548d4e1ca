"""Config checks the JSON schema cannot express, and the per-task effective settings.

The Snakefile validates the config against ``workflow/schemas/config.schema.yaml``
first; ``check_config`` then catches cross-references and impossible combinations,
each with one message naming the config key, before any job starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath
from typing import Any

from ktflow.errors import KtflowInputError

# Architectures KTransformers' SFT path supports (upstream.md: "KT SFT architectures").
KT_ARCHITECTURES = (
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "KimiK2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3_5MoeForCausalLM",
    "Glm4MoeForCausalLM",
    "MixtralForCausalLM",
)
STAGE_FORMATS = {"sft": ("alpaca", "sharegpt"), "dpo": ("pairwise",), "kto": ("kto",)}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def effective_training(config: dict[str, Any], task: str) -> dict[str, Any]:
    settings = _merge(config.get("training", {}), config["tasks"][task].get("training", {}))
    settings.setdefault("seed", config.get("seed", 42))
    return settings


def effective_inference(config: dict[str, Any], model: str, task: str) -> dict[str, Any]:
    settings = _merge(config.get("inference", {}), config["tasks"][task].get("inference", {}))
    settings.setdefault("seed", config.get("seed", 42))
    settings["trust_remote_code"] = bool(config["models"][model].get("trust_remote_code", False))
    return settings


def as_json(data: Any) -> str:
    """Stable JSON for Snakemake params: key order never causes a rerun."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _check_relative(value: str, key: str) -> None:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise KtflowInputError(
            "config", key, f"{value!r} must be a relative path inside the working directory"
        )


def check_config(config: dict[str, Any], config_path: str = "config") -> None:
    """Cross-field checks; raises KtflowInputError naming the key."""
    _check_relative(config.get("results", "results"), "results")
    experiments = config["experiments"]
    for model in experiments["models"]:
        if model not in config["models"]:
            raise KtflowInputError(
                config_path, "experiments.models", f"{model!r} is not defined under models"
            )
    for task in experiments["tasks"]:
        if task not in config["tasks"]:
            raise KtflowInputError(config_path, "experiments.tasks", f"{task!r} is not defined under tasks")
    for task in experiments["tasks"]:
        training = effective_training(config, task)
        stage, data_format = training.get("stage", "sft"), training.get("format", "alpaca")
        if data_format not in STAGE_FORMATS[stage]:
            raise KtflowInputError(
                config_path,
                f"tasks.{task}.training.format",
                f"stage {stage} needs one of {list(STAGE_FORMATS[stage])}, got {data_format!r}",
            )
        spec = config["tasks"][task]
        for key in ("train_file", "test_file"):
            if spec.get("source") == "file" and not Path(spec[key]).is_file():
                raise KtflowInputError(
                    config_path, f"tasks.{task}.{key}", f"dataset file {spec[key]!r} not found"
                )
        if training.get("backend") in ("kt", "kt-legacy"):
            for model in experiments["models"]:
                _check_kt_model(config, model, config_path)


def _check_kt_model(config: dict[str, Any], model: str, config_path: str) -> None:
    spec = config["models"][model]
    if spec["source"] == "local":
        config_json = Path(spec["path"]) / "config.json"
        if config_json.is_file():
            architectures = json.loads(config_json.read_text()).get("architectures") or []
            if not set(architectures) & set(KT_ARCHITECTURES):
                raise KtflowInputError(
                    config_path,
                    f"models.{model}",
                    f"the KT backend supports {', '.join(KT_ARCHITECTURES)}; "
                    f"{config_json} declares {architectures}",
                )

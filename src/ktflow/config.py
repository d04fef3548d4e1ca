"""Config validation, the cross-field checks the JSON schema cannot express, and per-task settings.

``check_config`` runs before any job starts. With ``schema`` it first validates against
``workflow/schemas/config.schema.yaml`` (and fills its defaults), so a wrong type or an
unknown key gets the same one-line message as everything else: ``<config file>: <key>:
<what is wrong>``. Then it catches cross-references and impossible combinations: undefined
models or tasks, a data format the training stage cannot use, the KT backend on
an architecture KT does not support, missing local files, LLaMA-Factory pass-through keys
that would write outside the results directory, publish to the hub or carry a token, and
paths that would escape the results directory.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ktflow.errors import KtflowInputError
from ktflow.train.backends import BACKENDS
from ktflow.train.stages import STAGE_FORMATS, default_format

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
# LLaMA-Factory keys that must not come through `llamafactory_args`, and why.
_WORKFLOW_OWNED = "ktflow sets it from the workflow, under the results directory"
REFUSED_LLAMAFACTORY_KEYS = {
    "output_dir": _WORKFLOW_OWNED,
    "logging_dir": _WORKFLOW_OWNED,
    "dataset_dir": _WORKFLOW_OWNED,
    "dataset": _WORKFLOW_OWNED,
    "model_name_or_path": _WORKFLOW_OWNED,
    "export_dir": "exporting writes outside the results directory",
    "tokenized_path": "it writes the tokenized data set outside the results directory",
    "push_to_hub": "training never publishes to the hub",
    "hub_model_id": "training never publishes to the hub",
    "export_hub_model_id": "training never publishes to the hub",
    "trust_remote_code": "set models.<name>.trust_remote_code for the model instead",
    "save_safetensors": "adapters are always saved as safetensors (pickle is never written)",
}
TOKEN_KEYS = ("token", "hub_token", "hf_hub_token", "ms_hub_token", "om_hub_token", "use_auth_token")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")
TOKEN_ADVICE = "tokens come only from the environment (HF_TOKEN) or `hf auth login`, never from the config"


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def effective_training(config: dict[str, Any], task: str, model: str | None = None) -> dict[str, Any]:
    """The task's training block; with ``model``, also that model's ``trust_remote_code`` switch."""
    settings = _merge(config.get("training", {}), config["tasks"][task].get("training", {}))
    settings.setdefault("seed", config.get("seed", 42))
    if model is not None:
        settings["trust_remote_code"] = bool(config["models"][model].get("trust_remote_code", False))
    return settings


def effective_inference(config: dict[str, Any], model: str, task: str) -> dict[str, Any]:
    settings = _merge(config.get("inference", {}), config["tasks"][task].get("inference", {}))
    settings.setdefault("seed", config.get("seed", 42))
    settings["trust_remote_code"] = bool(config["models"][model].get("trust_remote_code", False))
    return settings


def as_json(data: Any) -> str:
    """Stable JSON for Snakemake params: key order never causes a rerun."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


# ---- schema ------------------------------------------------------------------------------------


def _key_path(parts: Iterator[str | int] | Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """Set the schema's ``default`` values where keys are absent (as Snakemake's validate does)."""
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra, root)


def validate_schema(config: dict[str, Any], schema_path: str | Path, config_path: str = "config") -> None:
    """Validate against the JSON schema and fill its defaults; one KtflowInputError naming the key."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    errors = list(Draft202012Validator(schema).iter_errors(config))
    # A conditional (if/then) failure is a consequence; report a plain one first when there is one.
    plain = [e for e in errors if "then" not in e.schema_path and "then" not in e.relative_schema_path]
    error = best_match(plain or errors)
    if error is not None:
        where = _key_path(error.absolute_path)
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            unknown = sorted(str(key) for key in error.instance if key not in allowed)
            if unknown:
                where = f"{where}.{unknown[0]}" if where else unknown[0]
                message = f"unknown key (allowed here: {', '.join(sorted(allowed))})"
        elif error.validator == "required" and isinstance(error.validator_value, list):
            missing = [key for key in error.validator_value if key not in (error.instance or {})]
            if missing:
                where = f"{where}.{missing[0]}" if where else missing[0]
                message = "required key is missing"
        raise KtflowInputError(config_path, where or "(top level)", message)
    _fill_defaults(config, schema, schema)


# ---- cross-field checks -----------------------------------------------------------------------


def _check_relative(value: str, key: str, config_path: str) -> None:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise KtflowInputError(
            config_path, key, f"{value!r} must be a relative path inside the working directory"
        )


def _walk(data: Any, where: str) -> Iterator[tuple[str, str | None, Any]]:
    """(key path, key, value) for every entry of nested dicts and lists."""
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            yield path, str(key), value
            yield from _walk(value, path)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            path = f"{where}[{index}]"
            yield path, None, value
            yield from _walk(value, path)


def _check_secrets(config: dict[str, Any], config_path: str) -> None:
    for where, key, value in _walk(config, ""):
        if key in TOKEN_KEYS or (isinstance(value, str) and _HF_TOKEN.search(value)):
            raise KtflowInputError(config_path, where, f"looks like an access token: {TOKEN_ADVICE}")


def _check_llamafactory_args(training: dict[str, Any], where: str, config_path: str) -> None:
    passthrough = training.get("llamafactory_args") or {}
    for key in sorted(passthrough):
        if key in REFUSED_LLAMAFACTORY_KEYS:
            if key == "save_safetensors" and passthrough[key] is True:
                continue
            raise KtflowInputError(
                config_path, f"{where}.llamafactory_args.{key}", f"refused: {REFUSED_LLAMAFACTORY_KEYS[key]}"
            )


def _check_lists(experiments: dict[str, Any], config: dict[str, Any], config_path: str) -> None:
    for block, plural in (("models", "models"), ("tasks", "tasks")):
        seen: set[str] = set()
        for name in experiments[block]:
            if name not in config[plural]:
                raise KtflowInputError(
                    config_path, f"experiments.{block}", f"{name!r} is not defined under {plural}"
                )
            if name in seen:
                raise KtflowInputError(config_path, f"experiments.{block}", f"{name!r} is listed twice")
            seen.add(name)


def _check_task(config: dict[str, Any], task: str, config_path: str) -> dict[str, Any]:
    spec = config["tasks"][task]
    training = effective_training(config, task)
    # No format means the stage's own; where the data come
    # from for a non-alpaca format is ktflow.train.plan's check.
    stage = training.get("stage", "sft")
    data_format = training.get("format") or default_format(stage)
    if data_format not in STAGE_FORMATS[stage]:
        own = spec.get("training", {})
        where = f"tasks.{task}.training" if "stage" in own or "format" in own else "training"
        raise KtflowInputError(
            config_path,
            f"{where}.format",
            f"stage {stage} needs one of {list(STAGE_FORMATS[stage])}, got {data_format!r}",
        )
    keys = {"file": ("train_file", "test_file"), "raw": ("raw_file",)}.get(spec.get("source", ""), ())
    for key in keys:
        if not Path(spec[key]).is_file():
            raise KtflowInputError(
                config_path, f"tasks.{task}.{key}", f"dataset file {spec[key]!r} not found"
            )
    _check_llamafactory_args(spec.get("training", {}), f"tasks.{task}.training", config_path)
    return training


def _check_local_model(config: dict[str, Any], model: str, config_path: str) -> None:
    spec = config["models"][model]
    if spec.get("source") != "local":
        return
    directory = Path(spec["path"])
    if not (directory / "config.json").is_file():
        what = "has no config.json" if directory.is_dir() else "is not a directory"
        raise KtflowInputError(config_path, f"models.{model}.path", f"{spec['path']!r} {what}")


def _check_kt_model(config: dict[str, Any], model: str, config_path: str) -> None:
    spec = config["models"][model]
    if spec["source"] != "local":
        return
    config_json = Path(spec["path"]) / "config.json"
    try:
        declared = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KtflowInputError(config_json, None, f"unreadable model config ({error})") from None
    architectures = declared.get("architectures") if isinstance(declared, dict) else None
    if not set(architectures or []) & set(KT_ARCHITECTURES):
        raise KtflowInputError(
            config_path,
            f"models.{model}",
            f"the KT backend supports {', '.join(KT_ARCHITECTURES)}; {config_json} declares {architectures}",
        )


def remote_code_models(config: dict[str, Any]) -> list[str]:
    """Models of this run whose checkpoint code may run (``trust_remote_code: true``)."""
    return [m for m in config["experiments"]["models"] if config["models"][m].get("trust_remote_code")]


def check_config(
    config: dict[str, Any], config_path: str = "config", schema: str | Path | None = None
) -> None:
    """Schema (when given) then cross-field checks; raises KtflowInputError naming the key.

    A model with ``trust_remote_code: true`` is announced on stderr: its checkpoint's Python
    code will run in training and inference.
    """
    if schema is not None:
        validate_schema(config, schema, config_path)
    _check_relative(config.get("results", "results"), "results", config_path)
    _check_secrets(config, config_path)
    experiments = config["experiments"]
    _check_lists(experiments, config, config_path)
    _check_llamafactory_args(config.get("training", {}), "training", config_path)
    for model in experiments["models"]:
        _check_local_model(config, model, config_path)
    for task in experiments["tasks"]:
        training = _check_task(config, task, config_path)
        backend = BACKENDS.get(training.get("backend", "hf"))
        if backend is not None and backend.kt_architectures_only:
            for model in experiments["models"]:
                _check_kt_model(config, model, config_path)
    for model in remote_code_models(config):
        print(
            f"ktflow: trust_remote_code is ON for model {model!r} (models.{model}.trust_remote_code): "
            "Python code shipped with its checkpoint will run in training and inference",
            file=sys.stderr,
        )

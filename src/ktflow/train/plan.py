"""What the ``train`` and ``doctor`` rules ask of a config: data, environment, preflight per task.

Plain functions of the (merged) config, so the rules stay declarative and these
decisions are tested without Snakemake. Nothing here touches the network or a GPU:
``snakemake -n`` plans KT configs on any machine; the ``doctor`` job, which runs
``ktflow doctor`` where training will run, is what fails (fast) on the wrong host.
"""

from __future__ import annotations

from typing import Any

from ktflow.config import effective_training
from ktflow.errors import KtflowInputError
from ktflow.train.backends import backend_for
from ktflow.train.datasets import HUB_PREFIX, local_file, location_count
from ktflow.train.stages import default_format

# Formats a tiny task's alpaca rows can be turned into (ktflow.tiny.tasks.derive).
DERIVED_FORMATS = ("sharegpt", "pairwise", "kto")


def data_format(config: dict[str, Any], task: str) -> str:
    training = effective_training(config, task)
    return str(training.get("format") or default_format(training.get("stage", "sft")))


def train_data(
    config: dict[str, Any], task: str, results: str, config_path: str = "config"
) -> tuple[str | None, str]:
    """(the input file, or None for a hub data set; the data argument of ``ktflow train``)."""
    source = effective_training(config, task).get("dataset") or {}
    if source.get("hf_hub_url"):
        return None, f"{HUB_PREFIX}{source['hf_hub_url']}"
    named = local_file(source)
    if named:
        return named, named
    spec = config["tasks"][task]
    fmt = data_format(config, task)
    if fmt == "alpaca":
        path = spec["train_file"] if spec["source"] == "file" else f"{results}/data/{task}/train.json"
        return path, path
    if spec["source"] == "tiny":
        path = f"{results}/data/{task}/{fmt}/train.json"
        return path, path
    raise KtflowInputError(
        config_path,
        f"tasks.{task}.training.dataset",
        f"this task's own data is alpaca; {fmt} training data must be named "
        "(training.dataset.file: a JSON/JSONL file, or training.dataset.hf_hub_url)",
    )


def check_training(config: dict[str, Any], config_path: str = "config") -> None:
    """Every experiment task has training data in its stage's format (raises KtflowInputError)."""
    for task in config["experiments"]["tasks"]:
        source = effective_training(config, task).get("dataset") or {}
        if location_count(source) > 1:
            message = "name one file (file or file_name) or a hub data set, not both"
            raise KtflowInputError(config_path, f"tasks.{task}.training.dataset", message)
        train_data(config, task, "results", config_path)


def backend(config: dict[str, Any], task: str) -> str:
    return str(effective_training(config, task).get("backend", "hf"))


def env_name(config: dict[str, Any], task: str) -> str:
    """The conda environment (envs/<name>.yaml) training ``task`` runs in."""
    training = effective_training(config, task)
    return backend_for(backend(config, task)).env_name(training.get("kt") or {})


def needs_preflight(config: dict[str, Any], task: str) -> bool:
    """Whether the host must be checked before ``task`` trains (GPU, KT kernels)."""
    return backend_for(backend(config, task)).preflight


def preflight_tasks(config: dict[str, Any]) -> list[str]:
    return [t for t in config["experiments"]["tasks"] if needs_preflight(config, t)]


def train_input(config: dict[str, Any], task: str, results: str) -> list[str]:
    path, _ = train_data(config, task, results)
    return [path] if path else []


def preflight_input(config: dict[str, Any], task: str, results: str) -> list[str]:
    return [f"{results}/preflight/{task}.json"] if needs_preflight(config, task) else []

"""The training settings ktflow models, and how they map onto LLaMA-Factory keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.train.backends import BACKENDS
from ktflow.train.stages import STAGE_FORMATS, default_format


def training_block(text: str, flag: str) -> dict[str, Any]:
    """The ``training`` block given as JSON on the command line (``flag`` names the option)."""
    try:
        training = json.loads(text)
    except json.JSONDecodeError as error:
        raise KtflowInputError(flag, None, f"invalid JSON ({error.msg})") from None
    if not isinstance(training, dict):
        raise KtflowInputError(flag, None, "expected a JSON object (the training block)")
    return training


def _one_file_key(source: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's ``file_name`` read as ktflow's ``file`` (the two name the same file)."""
    if "file_name" not in source:
        return source
    if source.get("file") not in (None, source["file_name"]):
        raise KtflowInputError("config", "training.dataset.file_name", "names another file than file")
    renamed = {key: value for key, value in source.items() if key != "file_name"}
    return {**renamed, "file": source["file_name"]}


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run depends on; built from the config's ``training`` block."""

    model_dir: Path
    dataset_dir: Path
    dataset: str
    output_dir: Path
    stage: str = "sft"
    backend: str = "hf"
    data_format: str = "alpaca"
    template: str | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target: str = "all"
    learning_rate: float = 1e-4
    epochs: float = 3.0
    batch_size: int = 1
    gradient_accumulation_steps: int = 8
    cutoff_len: int = 2048
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    bf16: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 50
    max_samples: int | None = None
    pref_beta: float = 0.1
    trust_remote_code: bool = False
    # training.dataset: where the data comes from beyond the task's own train file (a JSON /
    # JSONL file or a hub data set) and any dataset_info.json settings (columns, tags, split).
    data_source: dict[str, Any] = field(default_factory=dict)
    # training.python: {backend: interpreter or venv} for environments without conda.
    python: dict[str, str] = field(default_factory=dict)
    kt: dict[str, Any] = field(default_factory=dict)
    llamafactory_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, training: dict[str, Any], **paths: Any) -> TrainSpec:
        """Build from the config's ``training`` block; unknown keys name the config field."""
        stage = training.get("stage", "sft")
        if stage not in STAGE_FORMATS:
            message = f"unknown stage {stage!r}; use one of {list(STAGE_FORMATS)}"
            raise KtflowInputError("config", "training.stage", message)
        backend = training.get("backend", "hf")
        if backend not in BACKENDS:
            raise KtflowInputError(
                "config", "training.backend", f"unknown backend {backend!r}; use one of {list(BACKENDS)}"
            )
        data_format = training.get("format") or default_format(stage)
        if data_format not in STAGE_FORMATS[stage]:
            raise KtflowInputError(
                "config",
                "training.format",
                f"stage {stage} needs data in {list(STAGE_FORMATS[stage])}, got {data_format!r}",
            )
        renamed = {"format": "data_format", "dataset": "data_source"}
        flat = {renamed.get(k, k): v for k, v in training.items() if k not in ("lora", "formats")}
        flat["data_format"] = data_format
        if isinstance(flat.get("data_source"), dict):
            flat["data_source"] = _one_file_key(flat["data_source"])
        flat.update({f"lora_{key}": value for key, value in (training.get("lora") or {}).items()})
        known = {f.name for f in dataclasses.fields(cls)} - set(paths)
        for key in flat:
            if key not in known:
                original = next((k for k, v in renamed.items() if v == key), key)
                raise KtflowInputError("config", f"training.{original}", "unknown training setting")
        return cls(**paths, **flat)

    def llamafactory_yaml(self) -> dict[str, Any]:
        """The backend-independent part of the LLaMA-Factory training YAML."""
        args: dict[str, Any] = {
            "model_name_or_path": str(self.model_dir),
            "trust_remote_code": self.trust_remote_code,
            "stage": self.stage,
            "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_target": self.lora_target,
            "dataset": self.dataset,
            "dataset_dir": str(self.dataset_dir),
            "cutoff_len": self.cutoff_len,
            "overwrite_cache": True,
            "preprocessing_num_workers": 1,
            "dataloader_num_workers": 0,
            "output_dir": str(self.output_dir),
            "logging_steps": self.logging_steps,
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": 2,
            "plot_loss": True,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.epochs,
            "lr_scheduler_type": self.lr_scheduler,
            "warmup_ratio": self.warmup_ratio,
            "bf16": self.bf16,
            "seed": self.seed,
            "data_seed": self.seed,
            "report_to": "none",
            "include_num_input_tokens_seen": True,
        }
        if self.template:
            args["template"] = self.template
        if self.max_samples:
            args["max_samples"] = self.max_samples
        if self.stage in ("dpo", "kto"):
            args["pref_beta"] = self.pref_beta
        return args

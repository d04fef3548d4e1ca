"""The two KTransformers x LLaMA-Factory YAML generations, and which one an environment has.

One ktflow ``training.kt`` block maps to either generation (``num_threads`` is
``kt_config.kt_num_threads`` in one and ``cpu_infer`` in the other):

- ``current``: kt-kernel >= 0.6.1 with LLaMA-Factory >= 0.9.5 (upstream 0.9.5 plus
  transformers-kt / accelerate-kt, or llamafactory-kt 0.9.6.dev0 from ``ktransformers[sft]``).
  Top-level ``use_kt`` and ``kt_*`` model arguments, a ``kt_config`` mapping of kt-kernel's
  ``KTConfig`` fields, launched with ``accelerate launch`` and an FSDP2 accelerate config.
- ``legacy``: ktransformers 0.4.x with LLaMA-Factory 0.9.4 (the only release that accepts
  ``kt_optimize_rule`` / ``cpu_infer`` / ``chunk_size``), launched in one process with ``USE_KT=1``.

``generation: auto`` (the default) picks by the LLaMA-Factory version installed in the
training environment; ``current`` or ``legacy`` forces one.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from packaging.version import Version

from ktflow.errors import KtflowInputError
from ktflow.train.env import EnvReport
from ktflow.train.spec import TrainSpec

LEGACY_BELOW = Version("0.9.5")
# ktflow key -> the kt_-prefixed LLaMA-Factory model argument (current generation).
MODEL_KEYS = (
    "weight_path",
    "expert_checkpoint_path",
    "non_expert_weight_path",  # llamafactory-kt only
    "cpu_activation",  # llamafactory-kt only
    "use_lora_experts",
    "lora_expert_num",
    "lora_expert_intermediate_size",
)
# ktflow key -> kt_config.kt_<key>: the user-settable KTConfig fields of kt-kernel 0.7.2
# (kt_kernel/sft/config.py) that LLaMA-Factory does not derive from its own arguments.
CONFIG_KEYS = (
    "backend",
    "num_threads",
    "tp_enabled",
    "threadpool_count",
    "expert_weight_format",
    "weight_lifecycle",
    "num_gpu_experts",
    "share_backward_bb",
    "force_fused_expert_lora",
    "max_cache_depth",
    "model_max_length",
)
LEGACY_KEYS = ("optimize_rule", "cpu_infer", "chunk_size")
OWN_KEYS = ("generation", "accelerate_config", "gpus")
KNOWN_KEYS = frozenset((*MODEL_KEYS, *CONFIG_KEYS, *LEGACY_KEYS, *OWN_KEYS))


def lf_version(packages: dict[str, str | None]) -> str | None:
    """The installed LLaMA-Factory (the KT fork installs under its own distribution name)."""
    return packages.get("llamafactory-kt") or packages.get("llamafactory")


def resolve_generation(requested: str | None, packages: dict[str, str | None]) -> str:
    if requested in ("current", "legacy"):
        return requested
    if requested not in (None, "auto"):
        raise KtflowInputError(
            "config", "training.kt.generation", f"{requested!r}: use auto, current or legacy"
        )
    installed = lf_version(packages)
    return "legacy" if installed and Version(installed) < LEGACY_BELOW else "current"


def check_keys(kt: dict[str, Any]) -> None:
    unknown = sorted(set(kt) - KNOWN_KEYS)
    if unknown:
        raise KtflowInputError(
            "config",
            f"training.kt.{unknown[0]}",
            f"unknown KT setting (known: {', '.join(sorted(KNOWN_KEYS))}); "
            "put raw LLaMA-Factory keys under training.llamafactory_args",
        )


def accelerate_config(processes: int) -> dict[str, Any]:
    """FSDP2 for KT, as upstream's examples/ktransformers/accelerate/fsdp2_kt_*.yaml: the
    accelerate file holds FSDP settings only, every KT setting lives in the training YAML."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        },
        "mixed_precision": "bf16",
        "num_machines": 1,
        "num_processes": processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }


class KTGeneration(ABC):
    name: ClassVar[str]

    @abstractmethod
    def render(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` (the backend-independent YAML) with this generation's KT keys."""

    @abstractmethod
    def command(self, python: str, yaml_path: Path, accelerate_yaml: Path) -> list[str]: ...

    @abstractmethod
    def environment(self) -> dict[str, str]: ...

    def gpu_processes(self, spec: TrainSpec, env: EnvReport) -> int:
        return int(spec.kt.get("gpus") or len(env.gpus) or 1)


class Current(KTGeneration):
    name = "current"

    def render(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
        kt = spec.kt
        args = {**args, "use_kt": True, "bf16": True}
        args.update({f"kt_{key}": kt[key] for key in MODEL_KEYS if kt.get(key) is not None})
        if "kt_weight_path" not in args and "kt_expert_checkpoint_path" not in args:
            # Online conversion from the BF16 checkpoint when no pre-converted weights are named.
            args["kt_expert_checkpoint_path"] = str(spec.model_dir)
        config = {f"kt_{key}": kt[key] for key in CONFIG_KEYS if kt.get(key) is not None}
        if config:
            args["kt_config"] = config
        return args

    def command(self, python: str, yaml_path: Path, accelerate_yaml: Path) -> list[str]:
        launch = [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_yaml)]
        return [*launch, "-m", "ktflow.train.launch", "train", str(yaml_path)]

    def environment(self) -> dict[str, str]:
        return {"ACCELERATE_USE_KT": "true", "USE_KT": "1"}


class Legacy(KTGeneration):
    name = "legacy"

    def render(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
        kt = spec.kt
        if not kt.get("optimize_rule"):
            raise KtflowInputError(
                "config",
                "training.kt.optimize_rule",
                "the legacy KT generation (ktransformers 0.4.x) needs an optimize rule, "
                "e.g. DeepSeek-V3-Chat-sft-amx.yaml from LLaMA-Factory's examples/ktransformers",
            )
        threads = kt.get("cpu_infer") or kt.get("num_threads") or os.cpu_count() or 1
        return {
            **args,
            "use_kt": True,
            "bf16": True,
            "kt_optimize_rule": str(kt["optimize_rule"]),
            "cpu_infer": int(threads),
            "chunk_size": int(kt.get("chunk_size") or 8192),
        }

    def command(self, python: str, yaml_path: Path, accelerate_yaml: Path) -> list[str]:
        return [python, "-m", "ktflow.train.launch", "train", str(yaml_path)]

    def environment(self) -> dict[str, str]:
        return {"USE_KT": "1"}

    def gpu_processes(self, spec: TrainSpec, env: EnvReport) -> int:
        return 1  # the legacy integration places layers over GPUs itself, in one process


GENERATIONS: dict[str, KTGeneration] = {g.name: g for g in (Current(), Legacy())}


def generation_for(spec: TrainSpec, env: EnvReport) -> KTGeneration:
    requested = "legacy" if spec.backend == "kt-legacy" else spec.kt.get("generation")
    return GENERATIONS[resolve_generation(requested, env.packages)]

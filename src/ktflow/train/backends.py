"""Training backends: how one ``TrainSpec`` becomes a LLaMA-Factory YAML and a command.

- ``hf``: upstream LLaMA-Factory on transformers + PEFT (CPU or GPU).
- ``kt``: KTransformers experts on the CPU (AMX), LLaMA-Factory >= 0.9.5 keys,
  launched with ``accelerate launch`` and an FSDP2-KT accelerate config.
- ``kt-legacy``: ktransformers 0.4.x with ``kt_optimize_rule`` / ``cpu_infer``.
- ``unsloth``: LLaMA-Factory's ``use_unsloth`` (GPU only).
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ktflow.errors import HardwareError
from ktflow.train.spec import TrainSpec


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TrainingBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def render(self, spec: TrainSpec) -> dict[str, Any]:
        """The complete LLaMA-Factory YAML for this backend."""

    @abstractmethod
    def command(self, spec: TrainSpec, yaml_path: Path) -> list[str]:
        """The process to run (the rendered YAML is its last argument)."""

    def environment(self, spec: TrainSpec) -> dict[str, str]:
        return {}

    def check_host(self, spec: TrainSpec) -> None:
        """Raise HardwareError before any work if this host cannot run the backend."""

    def _with_passthrough(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
        # Keys ktflow does not model win last, so any LLaMA-Factory YAML can be reproduced.
        return {**args, **spec.llamafactory_args}


class HFBackend(TrainingBackend):
    name = "hf"

    def render(self, spec: TrainSpec) -> dict[str, Any]:
        args = spec.llamafactory_yaml()
        if not cuda_available():
            # LLaMA-Factory needs use_cpu for bf16 on CPU; on CPU we always set it.
            args["use_cpu"] = True
        return self._with_passthrough(spec, args)

    def command(self, spec: TrainSpec, yaml_path: Path) -> list[str]:
        return [sys.executable, "-m", "ktflow.lf_launch", "train", str(yaml_path)]


class UnslothBackend(HFBackend):
    name = "unsloth"

    def render(self, spec: TrainSpec) -> dict[str, Any]:
        return self._with_passthrough(spec, {**spec.llamafactory_yaml(), "use_unsloth": True})

    def check_host(self, spec: TrainSpec) -> None:
        if not cuda_available():
            raise HardwareError("the unsloth backend needs a CUDA GPU; this host has none (use backend: hf)")


def _require_kt_cpu() -> None:
    from ktflow.cpuinfo import has_amx, has_avx512

    if not has_avx512():
        raise HardwareError(
            "the KT backend needs a CPU with AVX512F+AVX512BW (AMX for the AMX kernels); "
            "this CPU has neither (run `ktflow doctor --backend kt`, or use backend: hf)"
        )
    if not has_amx():
        print("ktflow: warning: no AMX on this CPU; KT falls back to its AVX512 kernels", file=sys.stderr)


class KTBackend(TrainingBackend):
    """LLaMA-Factory >= 0.9.5 with kt-kernel >= 0.6.1 (``use_kt`` + accelerate FSDP2-KT)."""

    name = "kt"
    # The keys LLaMA-Factory 0.9.5's KTransformersArguments accepts (hparams/model_args.py).
    MODEL_KEYS: ClassVar[tuple[str, ...]] = (
        "kt_weight_path",
        "kt_expert_checkpoint_path",
        "kt_use_lora_experts",
        "kt_lora_expert_num",
        "kt_lora_expert_intermediate_size",
    )

    def render(self, spec: TrainSpec) -> dict[str, Any]:
        args = spec.llamafactory_yaml()
        args["use_kt"] = True
        args["bf16"] = True
        for key in self.MODEL_KEYS:
            if spec.kt.get(key) is not None:
                args[key] = spec.kt[key]
        if "kt_weight_path" not in args and "kt_expert_checkpoint_path" not in args:
            # Online conversion from the BF16 checkpoint when no pre-quantized weights are named.
            args["kt_expert_checkpoint_path"] = str(spec.model_dir)
        return self._with_passthrough(spec, args)

    def command(self, spec: TrainSpec, yaml_path: Path) -> list[str]:
        accelerate_config = spec.kt.get("accelerate_config")
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        if accelerate_config:
            launch += ["--config_file", str(accelerate_config)]
        return [*launch, "-m", "ktflow.lf_launch", "train", str(yaml_path)]

    def environment(self, spec: TrainSpec) -> dict[str, str]:
        env = {"ACCELERATE_USE_KT": "true"}
        if spec.kt.get("num_threads"):
            env["KT_NUM_THREADS"] = str(spec.kt["num_threads"])
        return env

    def check_host(self, spec: TrainSpec) -> None:
        _require_kt_cpu()
        if not cuda_available():
            raise HardwareError(
                "the KT backend needs a CUDA GPU for the non-expert layers; this host has none"
            )


class KTLegacyBackend(TrainingBackend):
    """ktransformers 0.4.x with LLaMA-Factory <= 0.9.4 (``USE_KT=1``, optimize rules)."""

    name = "kt-legacy"

    def render(self, spec: TrainSpec) -> dict[str, Any]:
        args = spec.llamafactory_yaml()
        args.update(
            {
                "use_kt": True,
                "kt_optimize_rule": str(spec.kt.get("optimize_rule", "")),
                "cpu_infer": int(spec.kt.get("cpu_infer", os.cpu_count() or 1)),
                "chunk_size": int(spec.kt.get("chunk_size", 8192)),
                "bf16": True,
            }
        )
        return self._with_passthrough(spec, args)

    def command(self, spec: TrainSpec, yaml_path: Path) -> list[str]:
        return [sys.executable, "-m", "ktflow.lf_launch", "train", str(yaml_path)]

    def environment(self, spec: TrainSpec) -> dict[str, str]:
        return {"USE_KT": "1"}

    def check_host(self, spec: TrainSpec) -> None:
        _require_kt_cpu()


BACKENDS: dict[str, type[TrainingBackend]] = {
    cls.name: cls for cls in (HFBackend, UnslothBackend, KTBackend, KTLegacyBackend)
}


def backend_for(name: str) -> TrainingBackend:
    return BACKENDS[name]()

"""``unsloth``: LLaMA-Factory's ``use_unsloth`` (one CUDA GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktflow.estimate import Requirements
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport
from ktflow.train.backends.base import LAUNCH, Problem, TrainingBackend, shortfall

if TYPE_CHECKING:
    from ktflow.train.spec import TrainSpec


class UnslothBackend(TrainingBackend):
    name = "unsloth"
    title = "Unsloth"
    conda_env = "unsloth"
    packages = ("torch", "unsloth", "llamafactory")
    pin_owners = ("unsloth", "llamafactory")
    gpu_reason = "Unsloth trains on a GPU"

    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        return {**spec.llamafactory_yaml(), "use_unsloth": True}

    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        return [env.executable, *LAUNCH, str(yaml_path)]

    def environment(self, spec: TrainSpec, env: EnvReport) -> dict[str, str]:
        # Unsloth trains on one GPU; pin it so a multi-GPU allocation does not trip it.
        return {"CUDA_VISIBLE_DEVICES": "0"} if len(env.gpus) > 1 else {}

    def memory_problems(self, host: HostReport, req: Requirements) -> list[Problem]:
        if not host.gpus:
            return []
        per_gpu = max(g.memory_bytes for g in host.gpus)
        # Unsloth can load 4-bit weights and need less than this BF16 figure: a warning only.
        what = "GPU memory for BF16 LoRA (per GPU):"
        return shortfall(self.name, req, per_gpu, req.hf_train_bytes, what, "warning")

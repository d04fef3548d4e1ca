"""Training backends: how one ``TrainSpec`` becomes a LLaMA-Factory YAML and a command.

- ``hf``: upstream LLaMA-Factory on transformers + PEFT (CPU or GPU; torchrun over
  several GPUs).
- ``unsloth``: LLaMA-Factory's ``use_unsloth`` (one CUDA GPU).
- ``kt``: KTransformers experts on the CPU, in whichever YAML generation the training
  environment has (:mod:`ktflow.train.kt`); ``kt-legacy`` forces the legacy one.

Every backend starts LLaMA-Factory through :mod:`ktflow.train.launch` with the backend
environment's interpreter, so the GPU-memory callback runs inside the training process.
Keys ktflow does not model (``llamafactory_args``) are applied last and win, so any
LLaMA-Factory YAML can be reproduced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ktflow.train.env import EnvReport
from ktflow.train.kt import accelerate_config, check_keys, generation_for
from ktflow.train.spec import TrainSpec

LAUNCH = ("-m", "ktflow.train.launch", "train")


class TrainingBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        """This backend's YAML before the pass-through keys."""

    @abstractmethod
    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        """The process to run (``env.executable`` is the training interpreter)."""

    def render(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        """The complete LLaMA-Factory YAML for ``spec`` in the environment ``env``."""
        return {**self.base_args(spec, env), **spec.llamafactory_args}

    def environment(self, spec: TrainSpec, env: EnvReport) -> dict[str, str]:
        return {}

    def extra_files(self, spec: TrainSpec, env: EnvReport) -> dict[str, dict[str, Any]]:
        """YAML files the command reads besides the training YAML, by name (written beside it)."""
        return {}

    def label(self, spec: TrainSpec, env: EnvReport) -> str:
        """The name ``ktflow doctor`` checks this run under."""
        return self.name


class HFBackend(TrainingBackend):
    name = "hf"

    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        args = spec.llamafactory_yaml()
        if not env.gpus:
            # LLaMA-Factory needs use_cpu for bf16 on CPU; on CPU we always set it.
            args["use_cpu"] = True
        return args

    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        if len(env.gpus) > 1:
            # LLaMA-Factory refuses DataParallel; its own launcher would re-exec itself under
            # torchrun without our callback, so ktflow starts torchrun itself.
            run = [env.executable, "-m", "torch.distributed.run", f"--nproc_per_node={len(env.gpus)}"]
            return [*run, *LAUNCH, str(yaml_path)]
        return [env.executable, *LAUNCH, str(yaml_path)]


class UnslothBackend(TrainingBackend):
    name = "unsloth"

    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        return {**spec.llamafactory_yaml(), "use_unsloth": True}

    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        return [env.executable, *LAUNCH, str(yaml_path)]

    def environment(self, spec: TrainSpec, env: EnvReport) -> dict[str, str]:
        # Unsloth trains on one GPU; pin it so a multi-GPU allocation does not trip it.
        return {"CUDA_VISIBLE_DEVICES": "0"} if len(env.gpus) > 1 else {}


class KTBackend(TrainingBackend):
    name = "kt"

    def base_args(self, spec: TrainSpec, env: EnvReport) -> dict[str, Any]:
        check_keys(spec.kt)
        return generation_for(spec, env).render(spec, spec.llamafactory_yaml())

    def command(self, spec: TrainSpec, env: EnvReport, yaml_path: Path) -> list[str]:
        accelerate_yaml = Path(spec.kt.get("accelerate_config") or yaml_path.parent / "accelerate_kt.yaml")
        return generation_for(spec, env).command(env.executable, yaml_path, accelerate_yaml)

    def extra_files(self, spec: TrainSpec, env: EnvReport) -> dict[str, dict[str, Any]]:
        generation = generation_for(spec, env)
        if generation.name != "current" or spec.kt.get("accelerate_config"):
            return {}
        return {"accelerate_kt.yaml": accelerate_config(generation.gpu_processes(spec, env))}

    def environment(self, spec: TrainSpec, env: EnvReport) -> dict[str, str]:
        variables = generation_for(spec, env).environment()
        if spec.kt.get("num_threads"):
            # kt-kernel sizes its CPU tensor pool from this (kt_kernel.sft.config.configure_omp_threads).
            variables["ACCELERATE_KT_OMP_NUM_THREADS"] = str(spec.kt["num_threads"])
        return variables

    def label(self, spec: TrainSpec, env: EnvReport) -> str:
        return "kt-legacy" if generation_for(spec, env).name == "legacy" else "kt"


BACKENDS: dict[str, type[TrainingBackend]] = {
    "hf": HFBackend,
    "unsloth": UnslothBackend,
    "kt": KTBackend,
    "kt-legacy": KTBackend,  # kt with the legacy generation forced (TrainSpec.backend says which)
}


def backend_for(name: str) -> TrainingBackend:
    return BACKENDS[name]()

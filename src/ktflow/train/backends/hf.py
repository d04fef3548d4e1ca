"""``hf``: upstream LLaMA-Factory on transformers + PEFT (CPU or GPU; torchrun over several GPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktflow.estimate import Requirements
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport
from ktflow.train.backends.base import LAUNCH, Problem, TrainingBackend, shortfall

if TYPE_CHECKING:
    from ktflow.train.spec import TrainSpec


class HFBackend(TrainingBackend):
    name = "hf"
    title = "HF"
    conda_env = "ktflow"
    packages = ("torch", "transformers", "peft", "trl", "llamafactory")
    pin_owners = ("llamafactory",)
    preflight = False  # runs anywhere, on the CPU if need be

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

    def memory_problems(self, host: HostReport, req: Requirements) -> list[Problem]:
        if host.gpus:
            per_gpu = max(g.memory_bytes for g in host.gpus)
            return shortfall(self.name, req, per_gpu, req.hf_train_bytes, "GPU memory (per GPU):")
        return shortfall(self.name, req, host.ram_available, req.hf_train_bytes, "host RAM for CPU training:")

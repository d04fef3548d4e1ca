"""``kt-legacy`` (and ``kt`` with the legacy generation): ktransformers 0.4.x with LLaMA-Factory 0.9.4.

0.9.4 is the only release that accepts ``kt_optimize_rule`` / ``cpu_infer`` / ``chunk_size``;
it is launched in one process with ``USE_KT=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktflow.errors import KtflowInputError
from ktflow.host.cpu import AMX_FLAGS, AVX512_FLAGS
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport
from ktflow.train.backends.base import LAUNCH, Problem
from ktflow.train.backends.kt import LEGACY_BELOW, KTBackend, installed_lf

if TYPE_CHECKING:
    from ktflow.train.spec import TrainSpec


class KTLegacyBackend(KTBackend):
    name = "kt-legacy"
    title = "KT (legacy)"
    conda_env = "kt-legacy"
    packages = ("torch", "llamafactory", "ktransformers")
    pin_owners = ("llamafactory", "ktransformers")
    generation = "legacy"
    forced_generation = "legacy"

    def python_keys(self) -> tuple[str, ...]:
        return (self.name, "kt")  # one KT environment may serve both generations

    def generation_args(self, spec: TrainSpec, args: dict[str, Any]) -> dict[str, Any]:
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

    def generation_command(self, python: str, yaml_path: Path, accelerate_yaml: Path) -> list[str]:
        return [python, *LAUNCH, str(yaml_path)]

    def generation_files(self, spec: TrainSpec, env: EnvReport) -> dict[str, dict[str, Any]]:
        return {}  # no accelerate launch

    def generation_environment(self) -> dict[str, str]:
        return {"USE_KT": "1"}

    def gpu_processes(self, spec: TrainSpec, env: EnvReport) -> int:
        return 1  # the legacy integration places layers over GPUs itself, in one process

    def host_problems(self, host: HostReport) -> list[Problem]:
        problems = []
        if not all(host.flags.get(f) for f in (*AMX_FLAGS, *AVX512_FLAGS)):
            problems.append(Problem(self.name, "error", (
                "CPU lacks AMX: the legacy KT SFT rules (<Model>-sft-amx.yaml) run AMX kernels "
                "(amx_tile/amx_bf16/amx_int8 with avx512f/avx512bw)"
            )))  # fmt: skip
        lf = installed_lf(host)
        if lf is not None and lf >= LEGACY_BELOW:
            problems.append(Problem(self.name, "error", (
                f"llamafactory {lf} rejects the legacy KT keys (use_kt + kt_optimize_rule need 0.9.4); "
                "use training.kt.generation: current (or auto)"
            )))  # fmt: skip
        return problems

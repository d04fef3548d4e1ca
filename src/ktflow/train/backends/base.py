"""What every training backend tells the driver: its YAML, its command, its environment, its needs.

A backend owns all its facts: the ``training.backend`` value it answers to, the conda
environment it trains in, the packages and hardware it needs (``ktflow doctor`` and the
preflight check them) and how it launches LLaMA-Factory. Every backend starts LLaMA-Factory
through :mod:`ktflow.train.launch` with the backend environment's interpreter, so the
GPU-memory callback runs inside the training process. Keys ktflow does not model
(``llamafactory_args``) are applied last and win, so any LLaMA-Factory YAML can be reproduced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ktflow.estimate import Requirements, gib
from ktflow.host.python_env import EnvReport
from ktflow.host.report import HostReport

if TYPE_CHECKING:  # spec.py validates backend names against the registry, which imports this
    from ktflow.train.spec import TrainSpec

LAUNCH = ("-m", "ktflow.train.launch", "train")


@dataclass
class Problem:
    backend: str
    severity: str  # "error": cannot run; "warning": runs, but read this
    message: str


def shortfall(
    backend: str, req: Requirements, have: int, want: int, what: str, severity: str = "error"
) -> list[Problem]:
    """One problem if ``want`` bytes exceed the ``have`` bytes of ``what``, else none."""
    if want <= have:
        return []
    return [Problem(backend, severity, f"{req.model_type}: {what} {gib(want)} needed, {gib(have)} here")]


class TrainingBackend(ABC):
    name: ClassVar[str]  # the config's training.backend value
    title: ClassVar[str]  # how verdicts name it ("KT backend: ...")
    conda_env: ClassVar[str]  # workflow/envs/<conda_env>.yaml
    packages: ClassVar[tuple[str, ...]]  # must be installed ("llamafactory": upstream or the KT fork)
    pin_owners: ClassVar[tuple[str, ...]]  # whose pins on torch/transformers/... must hold
    gpu_reason: ClassVar[str | None] = None  # why a CUDA GPU is required; None: optional
    preflight: ClassVar[bool] = True  # the workflow checks the host (`ktflow doctor`) before training
    kt_architectures_only: ClassVar[bool] = False  # the model must be one KT's SFT path supports

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

    def checked_as(self, kt: dict[str, Any], packages: dict[str, str | None]) -> str:
        """The backend ``ktflow doctor`` checks this run under, given the training environment."""
        return self.name

    def label(self, spec: TrainSpec, env: EnvReport) -> str:
        """The name ``ktflow doctor`` checks this run under."""
        return self.checked_as(spec.kt, env.packages)

    def env_name(self, kt: dict[str, Any]) -> str:
        """The conda environment (envs/<name>.yaml) a run with this ``training.kt`` block trains in."""
        return self.conda_env

    def python_keys(self) -> tuple[str, ...]:
        """The ``training.python`` keys naming this backend's interpreter, first found wins."""
        return (self.name,)

    def host_problems(self, host: HostReport) -> list[Problem]:
        """What this backend's own hardware/software needs find wrong with ``host``."""
        return []

    @abstractmethod
    def memory_problems(self, host: HostReport, req: Requirements) -> list[Problem]:
        """Where ``host`` has less memory than this backend needs to train the model of ``req``."""

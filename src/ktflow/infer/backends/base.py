"""The inference backend family: what one ``inference.backend`` value needs, reads and runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ktflow.infer.base import InferenceBackend, Sampling


@dataclass(frozen=True)
class InferInputs:
    """What ``ktflow infer`` was given beside the test rows."""

    model_dir: Path
    adapter: Path | None = None
    adapter_name: str = "lora"
    int8_dir: Path | None = None
    server_log: Path | None = None


class Backend(ABC):
    """One inference backend's facts and how it starts generating."""

    name: ClassVar[str]
    # Inference settings only this backend reads, and those of them that never change a prediction.
    spec_keys: ClassVar[frozenset[str]] = frozenset()
    operational_keys: ClassVar[frozenset[str]] = frozenset()
    # The adapter dir the workflow hands it: training's ("adapter") or convert-lora's ("sglang").
    adapter_input: ClassVar[str] = "adapter"
    # Whether it serves a cpu_int8 model's INT8 experts (the output of ``ktflow convert-int8``).
    loads_int8: ClassVar[bool] = False
    # Whether ktflow loads the model from model_dir (refusing pickles there) or a server has its own.
    loads_local_weights: ClassVar[bool] = True

    def check(self, spec: dict[str, Any]) -> None:
        """Refuse, before anything starts, settings this backend cannot run with."""

    @abstractmethod
    def create(self, spec: dict[str, Any], sampling: Sampling, inputs: InferInputs) -> InferenceBackend:
        """The running backend (model loaded or server healthy); the caller closes it."""

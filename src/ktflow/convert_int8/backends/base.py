"""The INT8 backend interface: one class per way of running KT's quantizer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ktflow.convert_int8.checkpoint import MoeCheckpoint


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why."""


class Int8Backend(ABC):
    name: ClassVar[str]
    # What would make this backend available, for the error when none is.
    remedy: ClassVar[str]

    @classmethod
    @abstractmethod
    def found(cls, kt_checkout: Path | None) -> Int8Backend:
        """This backend ready to run, or BackendUnavailable saying why not."""

    @abstractmethod
    def convert(self, checkpoint: MoeCheckpoint, out: Path, threads: int, pools: int) -> dict[str, Any]:
        """Write the INT8 shards into ``out``; return facts for ktflow_int8.json."""

"""The LoRA converter interface: one class per implementation of ``ktflow convert-lora``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ktflow.convert_lora.plan import AdapterPlan


class LoraConverter(ABC):
    """Writes a validated :class:`AdapterPlan` as one PEFT dir SGLang loads."""

    name: ClassVar[str]

    def check(self, plan: AdapterPlan) -> None:
        """Raise KtflowInputError when this converter cannot convert this adapter."""

    def load(self) -> None:
        """Raise ImportError saying what is missing when the converter's code is not usable here."""

    @abstractmethod
    def write(self, plan: AdapterPlan, out: Path, base_model: str, lora_alpha: float | None) -> int:
        """Write the adapter's weights and config into the empty dir ``out``; return the tensor count."""

    @classmethod
    def installed(cls) -> dict[str, Any]:
        """Facts for provenance about what is installed for this converter, whichever one ran."""
        return {}

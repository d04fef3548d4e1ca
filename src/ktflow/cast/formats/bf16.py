"""Unquantized bf16 checkpoints: shards are linked (or copied) whole, never re-encoded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ktflow.cast.formats.base import OutTensor, Sink, WeightFormat, Workspace
from ktflow.cast.shards import Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import TensorSlot


class Bf16Passthrough(WeightFormat):
    """Already bf16: the format of a config without a quantization config."""

    name = "bf16"
    quant_method = None
    label = "bf16"
    tensor_label = "bf16"
    links_shards = True

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], quant: Any, path: Path | str, key: str
    ) -> Bf16Passthrough:
        text = config.get("text_config")
        nested = text if isinstance(text, Mapping) else {}
        dtype = (
            config.get("torch_dtype")
            or config.get("dtype")
            or nested.get("torch_dtype")
            or nested.get("dtype")
        )
        if dtype not in (None, "bfloat16"):
            raise KtflowInputError(
                path, "torch_dtype", f"{dtype} checkpoints are not cast; only bf16 is passed through"
            )
        return cls()

    @classmethod
    def claims(cls, slot: TensorSlot) -> bool:
        return False  # a bf16 tensor may sit in any checkpoint

    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        for slot in table.values():
            if any(other.claims(slot) for other in WeightFormat.__subclasses__()):
                raise KtflowInputError(
                    slot.path, slot.name, "quantized tensor, but config.json declares no quantization"
                )
        return [self.copied(slot) for slot in table.values()]

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        raise AssertionError("bf16 checkpoints have nothing to dequantize")

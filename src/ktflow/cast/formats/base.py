"""The interface every checkpoint weight format implements, and the helpers formats share.

Every quantized output tensor is bf16(float32(q) * float32(scale)), rounded to nearest even,
exactly as the reference formula. The kernels work on row chunks of ~1M elements so the working
set stays in cache and memory does not grow with tensor or shard size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ktflow.cast.finite import BF16_MAX, FLOAT_DTYPES, Tally, count_nonfinite, nonfinite_error
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.safetensors_header import TensorSlot

CHUNK_ELEMENTS = 1 << 20
COPY_CHUNK = 1 << 23
SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
Sink = Callable[[memoryview], None]


@dataclass(frozen=True, slots=True)
class OutTensor:
    """One output tensor: what is written, and the source tensors it is computed from.

    ``inputs[0]`` decides the output shard, so a weight stays in its shard even when its scale
    lives elsewhere.
    """

    entry: Entry
    kind: str
    inputs: tuple[TensorSlot, ...]


class Workspace:
    """Grow-only per-worker buffers, so steady-state casting allocates nothing."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    return tensor.view(torch.uint8).numpy().data


def read_tensor(reader: Reader, slot: TensorSlot, dtype: torch.dtype) -> torch.Tensor:
    if not slot.nbytes:  # frombuffer refuses an empty buffer
        return torch.empty(slot.shape, dtype=dtype)
    return torch.frombuffer(reader.read(slot), dtype=dtype).view(slot.shape)


def copy_tensor(reader: Reader, slot: TensorSlot, work: Workspace, sink: Sink) -> None:
    """Copy the bytes through unchanged; float tensors must hold no NaN / Inf (no real checkpoint does)."""
    buffer = work.take("copy", min(COPY_CHUNK, slot.nbytes), torch.uint8)
    kind = FLOAT_DTYPES.get(slot.dtype)
    tally = Tally(slot.path, slot.name, slot.numel, slot.dtype)
    for offset in range(0, slot.nbytes, COPY_CHUNK):
        count = min(COPY_CHUNK, slot.nbytes - offset)
        piece = as_bytes(buffer[:count])
        reader.readinto(slot, offset, piece)
        if kind is not None:
            tally.add(count_nonfinite(buffer[:count].view(kind)))
        sink(piece)
    tally.raise_if_any()


def checked_scale(reader: Reader, out: OutTensor, largest: float) -> tuple[torch.Tensor, Tally | None]:
    """The scale (``out.inputs[1]``) as float32, refused if any value is non-finite, and a tally for
    the outputs when a product ``largest * scale`` could round to Inf in bf16 (no real checkpoint's)."""
    slot = out.inputs[1]
    scale = read_tensor(reader, slot, SCALE_DTYPES[slot.dtype]).to(torch.float32)
    bad = count_nonfinite(scale)
    if bad:
        raise nonfinite_error(slot.path, slot.name, bad, scale.numel(), "scale")
    if scale.numel() and float(scale.abs().max()) * largest >= BF16_MAX:
        numel = math.prod(out.entry.shape)
        return scale, Tally(out.inputs[0].path, out.entry.name, numel, "bf16 output (scale too large)")
    return scale, None


def scale_beside(table: Mapping[str, TensorSlot], name: str, weight: TensorSlot) -> TensorSlot:
    """The scale tensor ``name`` of ``weight``, which must exist and be a float type."""
    scale = table.get(name)
    if scale is None:
        raise KtflowInputError(weight.path, weight.name, f"missing scale tensor {name}")
    if scale.dtype not in SCALE_DTYPES:
        raise KtflowInputError(scale.path, name, f"scale dtype {scale.dtype} is not F32/BF16/F16")
    return scale


def check_scale_shape(scale: TensorSlot, expected: tuple[int, ...], weight: TensorSlot, why: str) -> None:
    if scale.shape != expected:
        raise KtflowInputError(
            scale.path,
            scale.name,
            f"scale shape {list(scale.shape)} does not match weight {weight.name} "
            f"{list(weight.shape)}: expected {list(expected)} ({why})",
        )


class WeightFormat(ABC):
    """How one checkpoint format maps source tensors to bf16 output tensors.

    A format owns its facts: the ``quant_method`` a model config names it by (the registry key),
    how it reads its settings from that config, which source tensors belong to it, and its kernel.
    """

    name: ClassVar[str]
    # ``quantization_config.quant_method`` in config.json; None: the format of unquantized configs.
    quant_method: ClassVar[str | None]
    # What the config calls this format, and its tensors, in errors about a mixed checkpoint.
    label: ClassVar[str]
    tensor_label: ClassVar[str]
    # How the unknown-method error lists this format among the supported ones.
    supported: ClassVar[str] = ""
    # True when shards are already in the output format and are linked or copied whole.
    links_shards: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any], quant: Any, path: Path | str, key: str) -> WeightFormat:
        """The format for a model config (``quant``: its quantization config at ``key``, if any);
        unsupported settings fail naming the key at fault."""

    @classmethod
    @abstractmethod
    def claims(cls, slot: TensorSlot) -> bool:
        """True for a source tensor only this format's checkpoints hold (a weight or its parameters)."""

    @abstractmethod
    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        """Every output tensor, checked before any work: scales fold into their weights."""

    @abstractmethod
    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        """Stream the bf16 bytes of one quantized output tensor into ``sink``."""

    def produce(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        if not out.entry.nbytes:
            return
        if out.kind == "copy":
            copy_tensor(reader, out.inputs[0], work, sink)
        else:
            self.dequantize(out, reader, work, sink)

    @staticmethod
    def copied(slot: TensorSlot) -> OutTensor:
        return OutTensor(Entry(slot.name, slot.dtype, slot.shape), "copy", (slot,))

    def refuse_foreign(self, slot: TensorSlot) -> None:
        """A tensor another format claims has no place in a checkpoint whose config names this one."""
        for other in WeightFormat.__subclasses__():
            if other is not type(self) and other.claims(slot):
                raise KtflowInputError(
                    slot.path,
                    slot.name,
                    f"an {other.tensor_label} tensor in a checkpoint whose config says {self.label}",
                )

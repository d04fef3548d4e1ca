"""The interface every checkpoint weight format implements, and the helpers formats share.

Every quantized output tensor is bf16(float32(q) * float32(scale)), rounded to nearest even,
exactly as the reference formula. The kernels work on row chunks of ~256K elements so the working
set stays in cache and memory does not grow with tensor or shard size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ktflow.cast.finite import BF16_MAX, Tally, count_nonfinite_floats, nonfinite_error
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.nonfinite import FLOAT_DTYPES, count_nonfinite
from ktflow.readers.safetensors_header import TensorSlot

CHUNK_ELEMENTS = 1 << 18
# Copied tensors go in 1 MiB pieces: they and the NaN check's scratch stay in a core's cache.
COPY_CHUNK = 1 << 20
SCALE_DTYPES = ("F32", "BF16", "F16")
# torch's float32 -> bf16 conversion gives every NaN this one pattern.
BF16_NAN = 0x7FC0


class Sink:
    """Where a kernel's output bytes go, in order. ``write`` takes bytes; a sink that owns an output
    buffer also lends room in it (``reserve``), so a kernel computes its chunk in place and
    ``commit``s it, with no copy on the way out (the cast's shard sink does)."""

    def __init__(self, write: Callable[[memoryview], None]) -> None:
        self.write = write

    def reserve(self, nbytes: int) -> memoryview | None:
        return None

    def commit(self, nbytes: int) -> None:
        raise RuntimeError("commit without a reserve")


def output_chunk(sink: Sink, work: Workspace, numel: int) -> tuple[np.ndarray, bool]:
    """Room for the next ``numel`` bf16 values: in the sink's buffer when it lends one (True), else
    a workspace buffer; hand it back with ``emit``."""
    room = sink.reserve(numel * 2)
    if room is None:
        return work.take("out", numel, np.uint16), False
    return np.frombuffer(room, dtype=np.uint16), True


def emit(sink: Sink, result: np.ndarray, reserved: bool) -> None:
    if reserved:
        sink.commit(result.nbytes)
    else:
        sink.write(as_bytes(result))


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
    """Grow-only per-worker buffers, so steady-state casting allocates nothing (a fresh large
    array is a fresh mmap: page faults, i.e. system time, on every chunk)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, key: str, numel: int, dtype: type[np.generic]) -> np.ndarray:
        nbytes = numel * np.dtype(dtype).itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < nbytes:
            buffer = self._buffers[key] = np.empty(nbytes, dtype=np.uint8)
        return buffer[:nbytes].view(dtype)


def as_bytes(array: np.ndarray) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


def read_scale(reader: Reader, slot: TensorSlot) -> np.ndarray:
    """A scale tensor as float32 (exact from BF16 / F16)."""
    raw = np.frombuffer(reader.read(slot), dtype=np.uint8)
    if slot.dtype == "BF16":
        widened = raw.view(np.uint16).astype(np.uint32) << 16
        return widened.view(np.float32).reshape(slot.shape)
    return raw.view(np.float16 if slot.dtype == "F16" else np.float32).astype(np.float32).reshape(slot.shape)


def round_to_bf16(values: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """float32 ``values`` (overwritten) -> bf16 bits in ``out``: round to nearest even, the way torch
    converts; NaN has to be handled by the caller (no kernel produces one from finite inputs)."""
    bits = values.reshape(-1).view(np.uint32)
    carry = scratch[: bits.size]
    np.right_shift(bits, 16, out=carry)
    np.bitwise_and(carry, 1, out=carry)
    np.add(carry, 0x7FFF, out=carry)
    np.add(bits, carry, out=bits)
    # Shift, then narrow contiguously: a strided copy of the high uint16 halves cost twice as much.
    np.right_shift(bits, 16, out=bits)
    np.copyto(out.reshape(-1), bits, casting="unsafe")


def copy_tensor(reader: Reader, slot: TensorSlot, work: Workspace, sink: Sink) -> None:
    """Copy the bytes through unchanged; float tensors must hold no NaN / Inf (no real checkpoint does)."""
    buffer = work.take("copy", min(COPY_CHUNK, slot.nbytes), np.uint8)
    kind = FLOAT_DTYPES.get(slot.dtype)
    tally = Tally(slot.path, slot.name, slot.numel, slot.dtype)
    for offset in range(0, slot.nbytes, COPY_CHUNK):
        count = min(COPY_CHUNK, slot.nbytes - offset)
        piece = buffer[:count]
        reader.readinto(slot, offset, as_bytes(piece))
        if kind is not None:
            bits_type, exponent = kind
            scratch = work.take("finite", count // np.dtype(bits_type).itemsize, bits_type)
            tally.add(count_nonfinite(piece.view(bits_type), exponent, scratch))
        sink.write(as_bytes(piece))
    tally.raise_if_any()


def checked_scale(reader: Reader, out: OutTensor, largest: float) -> tuple[np.ndarray, Tally | None]:
    """The scale (``out.inputs[1]``) as float32, refused if any value is non-finite, and a tally for
    the outputs when a product ``largest * scale`` could round to Inf in bf16 (no real checkpoint's)."""
    slot = out.inputs[1]
    scale = read_scale(reader, slot)
    bad = count_nonfinite_floats(scale)
    if bad:
        raise nonfinite_error(slot.path, slot.name, bad, scale.size, "scale")
    if scale.size and float(np.abs(scale).max()) * largest >= BF16_MAX:
        numel = math.prod(out.entry.shape)
        return scale, Tally(out.inputs[0].path, out.entry.name, numel, "bf16 output (scale too large)")
    return scale, None


def count_bf16_nonfinite(result: np.ndarray, work: Workspace) -> int:
    """NaN / Inf among bf16 output bits (only looked at when a scale is large enough to overflow)."""
    return count_nonfinite(result, FLOAT_DTYPES["BF16"][1], work.take("finite", result.size, np.uint16))


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

"""Checkpoint weight formats: one class per format behind one small interface.

Every quantized output tensor is bf16(float32(q) * float32(scale)), rounded to nearest even,
exactly as the reference formula. The kernels work on row chunks of ~1M elements so the working
set stays in cache and memory does not grow with tensor or shard size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ktflow.cast.finite import BF16_MAX, FLOAT_DTYPES, Tally, count_nonfinite, fp8_nan_count, nonfinite_error
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import DTYPE_SIZES, TensorSlot

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


class WeightFormat(ABC):
    """How one checkpoint format maps source tensors to bf16 output tensors."""

    name: ClassVar[str]
    # True when shards are already in the output format and are linked or copied whole.
    links_shards: ClassVar[bool] = False

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


def _scale(slot: TensorSlot, table: Mapping[str, TensorSlot], name: str, weight: TensorSlot) -> TensorSlot:
    scale = table.get(name)
    if scale is None:
        raise KtflowInputError(weight.path, weight.name, f"missing scale tensor {name}")
    if scale.dtype not in SCALE_DTYPES:
        raise KtflowInputError(scale.path, name, f"scale dtype {scale.dtype} is not F32/BF16/F16")
    return scale


def _check_shape(scale: TensorSlot, expected: tuple[int, ...], weight: TensorSlot, why: str) -> None:
    if scale.shape != expected:
        raise KtflowInputError(
            scale.path,
            scale.name,
            f"scale shape {list(scale.shape)} does not match weight {weight.name} "
            f"{list(weight.shape)}: expected {list(expected)} ({why})",
        )


class Fp8Block(WeightFormat):
    """DeepSeek-V3 / Kimi-K2-Instruct: float8_e4m3fn weights with float32 block scales ``*_scale_inv``."""

    name = "fp8-block"
    SUFFIX = "_scale_inv"
    # float8 bits shifted into a float32 give x * 2**-120; the factor folds into the scale,
    # exact while the scaled scale stays finite (|scale| < 2**7 leaves ample headroom).
    BIAS = 2.0**120
    SAFE_SCALE = 2.0**7
    LARGEST = 448.0  # largest finite float8_e4m3fn

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        outs: list[OutTensor] = []
        for name, slot in table.items():
            if name.endswith(self.SUFFIX):
                weight = table.get(name.removesuffix(self.SUFFIX))
                if weight is None or DTYPE_SIZES[weight.dtype] != 1:
                    raise KtflowInputError(slot.path, name, "scale without an FP8 weight beside it")
            elif slot.dtype == "F8_E4M3":
                outs.append(self._planned(slot, table))
            elif Int4Pack.claims(slot):
                raise KtflowInputError(
                    slot.path, name, "an int4 tensor in a checkpoint whose config says fp8"
                )
            elif DTYPE_SIZES[slot.dtype] == 1 and slot.dtype not in ("U8", "I8", "BOOL"):
                raise KtflowInputError(slot.path, name, f"{slot.dtype} weights are not supported (e4m3 only)")
            else:
                outs.append(self.copied(slot))
        return outs

    @classmethod
    def claims(cls, slot: TensorSlot) -> bool:
        return slot.dtype.startswith("F8_") or slot.name.endswith(cls.SUFFIX)

    def _planned(self, weight: TensorSlot, table: Mapping[str, TensorSlot]) -> OutTensor:
        if len(weight.shape) != 2:
            raise KtflowInputError(
                weight.path, weight.name, f"FP8 weight must be 2-D, got {list(weight.shape)}"
            )
        scale = _scale(weight, table, weight.name + self.SUFFIX, weight)
        rows, cols = weight.shape
        expected = (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        _check_shape(scale, expected, weight, f"{self.block[0]}x{self.block[1]} blocks")
        return OutTensor(Entry(weight.name, "BF16", weight.shape), self.name, (weight, scale))

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        weight = out.inputs[0]
        rows, cols = weight.shape
        block_rows, block_cols = self.block
        scale, overflow = checked_scale(reader, out, self.LARGEST)
        safe = scale.numel() == 0 or bool(scale.abs().max() < self.SAFE_SCALE)
        bias = self.BIAS if safe else 1.0
        nans = Tally(weight.path, weight.name, weight.numel, "F8_E4M3")
        # One scale row per 128 weight rows, expanded along columns only: tiny, and broadcast
        # over the block's rows by the multiply.
        per_col = (scale * bias).repeat_interleave(block_cols, dim=1)[:, :cols].contiguous()
        step = max(1, CHUNK_ELEMENTS // (block_rows * max(cols, 1))) * block_rows
        for start in range(0, rows, step):
            count = min(step, rows - start)
            raw = work.take("raw", count * cols, torch.uint8)
            reader.readinto(weight, start * cols, as_bytes(raw))
            # The NaN codes 0x7F / 0xFF: the two maxima are taken anyway to pick the widening.
            has_nan = int(raw.max()) == 0xFF or int(raw.view(torch.int8).max()) == 0x7F
            if has_nan:
                nans.add(fp8_nan_count(raw))
            values = self._widen(raw, work, bias, has_nan)
            result = work.take("out", count * cols, torch.bfloat16)
            first, whole = start // block_rows, count // block_rows
            split = whole * block_rows * cols
            if whole:
                torch.mul(
                    values[:split].view(whole, block_rows, cols),
                    per_col[first : first + whole].unsqueeze(1),
                    out=result[:split].view(whole, block_rows, cols),
                )
            if split < count * cols:
                torch.mul(
                    values[split:].view(-1, cols), per_col[first + whole], out=result[split:].view(-1, cols)
                )
            if overflow is not None:
                overflow.add(count_nonfinite(result))
            sink(as_bytes(result))
        nans.raise_if_any()
        if overflow is not None:
            overflow.raise_if_any()

    @staticmethod
    def _widen(raw: torch.Tensor, work: Workspace, bias: float, has_nan: bool) -> torch.Tensor:
        """float8 bytes -> float32 values times 1/bias, exactly."""
        values = work.take("f32", raw.numel(), torch.float32)
        # The NaN codes 0x7F / 0xFF have no float32 bit pattern in the trick below.
        if bias == 1.0 or has_nan:
            values.copy_(raw.view(torch.float8_e4m3fn))
            if bias != 1.0:
                values.mul_(1.0 / bias)
            return values
        # Sign-extend, then keep sign + exponent + mantissa in float32's bit positions: the
        # e4m3 exponent bias (7) then reads as float32's (127), i.e. a factor of 2**-120, and
        # e4m3 subnormals land on float32 subnormals with the same mantissa.
        bits = values.view(torch.int32)
        bits.copy_(raw.view(torch.int8))
        bits.bitwise_left_shift_(20)
        bits.bitwise_and_(_as_int32(0x87F00000))
        return values


def _as_int32(mask: int) -> int:
    return mask - (1 << 32) if mask >= 1 << 31 else mask


class Int4Pack(WeightFormat):
    """Kimi-K2-Thinking / K2.5: compressed-tensors pack-quantized int4, symmetric, group scales."""

    name = "int4-pack"
    PARTS = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, group: int) -> None:
        self.group = group

    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        outs: list[OutTensor] = []
        for name, slot in table.items():
            module, _, part = name.rpartition(".")
            if part == "weight_packed":
                outs.append(self._planned(module, table, reader))
            elif part in self.PARTS:
                if f"{module}.weight_packed" not in table:
                    raise KtflowInputError(
                        slot.path, name, "quantization parameter without weight_packed beside it"
                    )
            elif part == "weight_zero_point":
                raise KtflowInputError(slot.path, name, "asymmetric int4 (zero points) is not supported")
            elif f"{module}.weight_packed" in table and part == "weight":
                raise KtflowInputError(slot.path, name, "both weight and weight_packed present")
            elif Fp8Block.claims(slot):
                raise KtflowInputError(
                    slot.path, name, "an FP8 tensor in a checkpoint whose config says int4"
                )
            else:
                outs.append(self.copied(slot))
        return outs

    @classmethod
    def claims(cls, slot: TensorSlot) -> bool:
        return slot.name.rpartition(".")[2] in (*cls.PARTS, "weight_zero_point")

    def _planned(self, module: str, table: Mapping[str, TensorSlot], reader: Reader) -> OutTensor:
        packed = table[f"{module}.weight_packed"]
        shape_slot = table.get(f"{module}.weight_shape")
        if shape_slot is None:
            raise KtflowInputError(packed.path, packed.name, f"missing {module}.weight_shape")
        if shape_slot.dtype not in ("I32", "I64") or shape_slot.shape != (2,):
            raise KtflowInputError(shape_slot.path, shape_slot.name, "weight_shape must be 2 integers")
        kind = np.int32 if shape_slot.dtype == "I32" else np.int64
        rows, cols = (int(v) for v in np.frombuffer(reader.read(shape_slot), dtype=kind))
        if packed.dtype != "I32" or packed.shape != (rows, math.ceil(cols / 8)):
            raise KtflowInputError(
                packed.path,
                packed.name,
                f"{packed.dtype} {list(packed.shape)} is not I32 [{rows}, {math.ceil(cols / 8)}] "
                f"for weight_shape [{rows}, {cols}]",
            )
        scale = _scale(packed, table, f"{module}.weight_scale", packed)
        _check_shape(scale, (rows, math.ceil(cols / self.group)), packed, f"group size {self.group}")
        return OutTensor(Entry(f"{module}.weight", "BF16", (rows, cols)), self.name, (packed, scale))

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        packed, scale_slot = out.inputs
        rows, cols = out.entry.shape
        width = packed.shape[1] * 8
        groups = scale_slot.shape[1]
        scale, overflow = checked_scale(reader, out, 8.0)  # |q - 8| <= 8
        aligned = width == cols == groups * self.group
        step = max(1, CHUNK_ELEMENTS // max(width, 1))
        for start in range(0, rows, step):
            count = min(step, rows - start)
            raw = work.take("raw", count * width // 2, torch.uint8)
            reader.readinto(packed, start * width // 2, as_bytes(raw))
            values = self._unpack(raw, work).view(count, width)
            result = work.take("out", count * cols, torch.bfloat16).view(count, cols)
            local = scale[start : start + count]
            if aligned:
                torch.mul(
                    values.view(count, groups, self.group),
                    local.unsqueeze(-1),
                    out=result.view(count, groups, self.group),
                )
            else:
                torch.mul(values[:, :cols], local.repeat_interleave(self.group, dim=1)[:, :cols], out=result)
            if overflow is not None:
                overflow.add(count_nonfinite(result))
            sink(as_bytes(result))
        if overflow is not None:
            overflow.raise_if_any()

    @staticmethod
    def _unpack(raw: torch.Tensor, work: Workspace) -> torch.Tensor:
        """Packed bytes (low nibble first) -> float32 q - 8, exactly."""
        pairs = work.take("pairs", raw.numel(), torch.int32)
        high = work.take("high", raw.numel(), torch.int32)
        # b + (b >> 4) * (2**16 - 16) puts the low nibble in the low int16 and the high nibble in
        # the high int16 of each int32: read as int16s, the nibbles in element order.
        pairs.copy_(raw)
        torch.bitwise_right_shift(pairs, 4, out=high)
        pairs.add_(high, alpha=0xFFF0)
        halves = pairs.view(torch.int16).sub_(8)
        values = work.take("f32", halves.numel(), torch.float32)
        return values.copy_(halves)


class Bf16Passthrough(WeightFormat):
    """Already bf16: shards are linked (or copied) whole, never re-encoded."""

    name = "bf16"
    links_shards = True

    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        for slot in table.values():
            if Fp8Block.claims(slot) or Int4Pack.claims(slot):
                raise KtflowInputError(
                    slot.path, slot.name, "quantized tensor, but config.json declares no quantization"
                )
        return [self.copied(slot) for slot in table.values()]

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        raise AssertionError("bf16 checkpoints have nothing to dequantize")

"""FP8 block format (DeepSeek-V3 / Kimi-K2-Instruct): float8_e4m3fn weights, float32 block scales."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ktflow.cast.finite import Tally, count_nonfinite, fp8_nan_count
from ktflow.cast.formats.base import (
    CHUNK_ELEMENTS,
    OutTensor,
    Sink,
    WeightFormat,
    Workspace,
    as_bytes,
    check_scale_shape,
    checked_scale,
    scale_beside,
)
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.safetensors_header import DTYPE_SIZES, TensorSlot


class Fp8Block(WeightFormat):
    """float8_e4m3fn weights with float32 block scales ``*_scale_inv``."""

    name = "fp8-block"
    quant_method = "fp8"
    label = "fp8"
    tensor_label = "FP8"
    supported = "fp8 (block)"
    SUFFIX = "_scale_inv"
    # float8 bits shifted into a float32 give x * 2**-120; the factor folds into the scale,
    # exact while the scaled scale stays finite (|scale| < 2**7 leaves ample headroom).
    BIAS = 2.0**120
    SAFE_SCALE = 2.0**7
    LARGEST = 448.0  # largest finite float8_e4m3fn

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    @classmethod
    def from_config(cls, config: Mapping[str, Any], quant: Any, path: Path | str, key: str) -> Fp8Block:
        if quant.get("fmt", "e4m3") != "e4m3":
            raise KtflowInputError(path, f"{key}.fmt", f"{quant.get('fmt')!r} is not supported (e4m3 only)")
        block = quant.get("weight_block_size")
        if not (
            isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)
        ):
            raise KtflowInputError(
                path, f"{key}.weight_block_size", f"need [rows, cols] block sizes, got {block!r}"
            )
        return cls((block[0], block[1]))

    @classmethod
    def claims(cls, slot: TensorSlot) -> bool:
        return slot.dtype.startswith("F8_") or slot.name.endswith(cls.SUFFIX)

    def plan(self, table: Mapping[str, TensorSlot], reader: Reader) -> list[OutTensor]:
        outs: list[OutTensor] = []
        for name, slot in table.items():
            if name.endswith(self.SUFFIX):
                weight = table.get(name.removesuffix(self.SUFFIX))
                if weight is None or DTYPE_SIZES[weight.dtype] != 1:
                    raise KtflowInputError(slot.path, name, "scale without an FP8 weight beside it")
            elif slot.dtype == "F8_E4M3":
                outs.append(self._planned(slot, table))
            else:
                self.refuse_foreign(slot)
                if DTYPE_SIZES[slot.dtype] == 1 and slot.dtype not in ("U8", "I8", "BOOL"):
                    raise KtflowInputError(
                        slot.path, name, f"{slot.dtype} weights are not supported (e4m3 only)"
                    )
                outs.append(self.copied(slot))
        return outs

    def _planned(self, weight: TensorSlot, table: Mapping[str, TensorSlot]) -> OutTensor:
        if len(weight.shape) != 2:
            raise KtflowInputError(
                weight.path, weight.name, f"FP8 weight must be 2-D, got {list(weight.shape)}"
            )
        scale = scale_beside(table, weight.name + self.SUFFIX, weight)
        rows, cols = weight.shape
        expected = (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        check_scale_shape(scale, expected, weight, f"{self.block[0]}x{self.block[1]} blocks")
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

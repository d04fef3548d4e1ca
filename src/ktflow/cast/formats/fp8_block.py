"""FP8 block format (DeepSeek-V3 / Kimi-K2-Instruct): float8_e4m3fn weights, float32 block scales."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ktflow.cast.finite import Tally, fp8_nan_count
from ktflow.cast.formats import base
from ktflow.cast.formats.base import OutTensor, Sink, WeightFormat, Workspace
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import DTYPE_SIZES, TensorSlot


class Fp8Block(WeightFormat):
    """float8_e4m3fn weights with float32 block scales ``*_scale_inv``."""

    name = "fp8-block"
    quant_method = "fp8"
    label = "fp8"
    tensor_label = "FP8"
    supported = "fp8 (block)"
    SUFFIX = "_scale_inv"
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
        scale = base.scale_beside(table, weight.name + self.SUFFIX, weight)
        rows, cols = weight.shape
        expected = (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        base.check_scale_shape(scale, expected, weight, f"{self.block[0]}x{self.block[1]} blocks")
        return OutTensor(Entry(weight.name, "BF16", weight.shape), self.name, (weight, scale))

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        weight = out.inputs[0]
        rows, cols = weight.shape
        block_rows, block_cols = self.block
        scale, overflow = base.checked_scale(reader, out, self.LARGEST)
        nans = Tally(weight.path, weight.name, weight.numel, "F8_E4M3")
        # Column c of a row reads table (c // block_cols) of its block row: code + this offset.
        offsets = (np.arange(cols, dtype=np.int32) // block_cols) << 8
        step = min(block_rows, max(1, base.CHUNK_ELEMENTS // max(cols, 1)))
        for block_row in range(scale.shape[0]):
            tables = self._tables(scale[block_row], work)
            first = block_row * block_rows
            for start in range(first, min(first + block_rows, rows), step):
                count = min(step, first + block_rows - start, rows - start)
                raw = work.take("raw", count * cols, np.uint8).reshape(count, cols)
                reader.readinto(weight, start * cols, base.as_bytes(raw))
                # The NaN codes 0x7F / 0xFF are the largest unsigned or signed bytes: two cheap maxima.
                if int(raw.max()) == 0xFF or int(raw.view(np.int8).max()) == 0x7F:
                    nans.add(fp8_nan_count(raw))
                index = work.take("index", count * cols, np.int32).reshape(count, cols)
                np.add(raw, offsets, out=index)
                result, reserved = base.output_chunk(sink, work, count * cols)
                np.take(tables, index.reshape(-1), out=result, mode="wrap")
                if overflow is not None:
                    overflow.add(base.count_bf16_nonfinite(result, work))
                base.emit(sink, result, reserved)
        nans.raise_if_any()
        if overflow is not None:
            overflow.raise_if_any()

    @staticmethod
    def _tables(scales: np.ndarray, work: Workspace) -> np.ndarray:
        """For each block of one block row, the bf16 bits of every code times the block's scale:
        the same float32 product and rounding as the elementwise formula, looked up per element."""
        products = work.take("products", scales.size * 256, np.float32).reshape(scales.size, 256)
        with np.errstate(over="ignore"):  # an Inf product is counted (overflow tally), not warned
            np.multiply(scales[:, None], FP8_VALUES, out=products)
        tables = work.take("tables", products.size, np.uint16)
        base.round_to_bf16(products, tables, work.take("carry", products.size, np.uint32))
        tables.reshape(scales.size, 256)[:, FP8_NAN_CODES] = base.BF16_NAN
        return tables


def _fp8_values() -> np.ndarray:
    """float8_e4m3fn code -> float32, exactly (sign, 4 exponent bits with bias 7, 3 mantissa bits)."""
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(
        exponent == 0, mantissa * 2.0**-9, (8 + mantissa) * 2.0 ** (exponent.astype(np.float64) - 10)
    )
    values = np.where(codes & 0x80, -magnitude, magnitude)
    values[FP8_NAN_CODES] = np.nan
    return values.astype(np.float32)


FP8_NAN_CODES = [0x7F, 0xFF]
FP8_VALUES = _fp8_values()

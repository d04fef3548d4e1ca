"""INT4 pack-quantized format (Kimi-K2-Thinking / K2.5): compressed-tensors, symmetric, group scales."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ktflow.cast.formats import base
from ktflow.cast.formats.base import OutTensor, Sink, WeightFormat, Workspace
from ktflow.cast.shards import Entry, Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import TensorSlot

# The only weight settings the kernel implements, by their config key.
SUPPORTED_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}


class Int4Pack(WeightFormat):
    """Eight 4-bit values per int32 (low nibble first), stored as q + 8; bf16 scales per group."""

    name = "int4-pack"
    quant_method = "compressed-tensors"
    label = "int4"
    tensor_label = "int4"
    supported = "compressed-tensors pack-quantized int4"
    PARTS = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, group: int) -> None:
        self.group = group

    @classmethod
    def from_config(cls, config: Mapping[str, Any], quant: Any, path: Path | str, key: str) -> Int4Pack:
        if quant.get("format") != "pack-quantized":
            raise KtflowInputError(
                path, f"{key}.format", f"{quant.get('format')!r} is not supported (pack-quantized)"
            )
        groups = quant.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise KtflowInputError(path, f"{key}.config_groups", "missing")
        sizes = set()
        for group_name, group in groups.items():
            weights = group.get("weights") if isinstance(group, Mapping) else None
            field = f"{key}.config_groups.{group_name}.weights"
            if not isinstance(weights, Mapping):
                raise KtflowInputError(path, field, "missing")
            for name, value in SUPPORTED_WEIGHTS.items():
                if weights.get(name) != value:
                    raise KtflowInputError(
                        path, f"{field}.{name}", f"{weights.get(name)!r} is not supported ({value!r})"
                    )
            sizes.add(weights.get("group_size"))
        if len(sizes) != 1 or not isinstance(size := sizes.pop(), int) or size <= 0:
            raise KtflowInputError(
                path, f"{key}.config_groups", "need one positive group_size for all groups"
            )
        return cls(size)

    @classmethod
    def claims(cls, slot: TensorSlot) -> bool:
        return slot.name.rpartition(".")[2] in (*cls.PARTS, "weight_zero_point")

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
            else:
                self.refuse_foreign(slot)
                outs.append(self.copied(slot))
        return outs

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
        scale = base.scale_beside(table, f"{module}.weight_scale", packed)
        base.check_scale_shape(
            scale, (rows, math.ceil(cols / self.group)), packed, f"group size {self.group}"
        )
        return OutTensor(Entry(f"{module}.weight", "BF16", (rows, cols)), self.name, (packed, scale))

    def dequantize(self, out: OutTensor, reader: Reader, work: Workspace, sink: Sink) -> None:
        packed = out.inputs[0]
        rows, cols = out.entry.shape
        width = packed.shape[1] * 8
        scale, overflow = base.checked_scale(reader, out, 8.0)  # |q - 8| <= 8
        step = max(1, base.CHUNK_ELEMENTS // max(width, 1))
        for start in range(0, rows, step):
            count = min(step, rows - start)
            raw = work.take("raw", count * width // 2, np.uint8)
            reader.readinto(packed, start * width // 2, base.as_bytes(raw))
            # One lookup per byte gives its two values, q - 8 as float32, low nibble first.
            pairs = work.take("pairs", raw.size, np.uint64)
            np.take(NIBBLE_PAIRS, raw, out=pairs, mode="wrap")
            values = pairs.view(np.float32).reshape(count, width)
            products = work.take("f32", count * cols, np.float32)
            local = scale[start : start + count]
            with np.errstate(over="ignore"):  # an Inf product is counted (overflow tally), not warned
                self._multiply(values, local, products.reshape(count, cols))
            result, reserved = base.output_chunk(sink, work, count * cols)
            base.round_to_bf16(products, result, work.take("carry", count * cols, np.uint32))
            if overflow is not None:
                overflow.add(base.count_bf16_nonfinite(result, work))
            base.emit(sink, result, reserved)
        if overflow is not None:
            overflow.raise_if_any()

    def _multiply(self, values: np.ndarray, scale: np.ndarray, products: np.ndarray) -> None:
        """float32(q - 8) * float32(scale of its group), one IEEE multiply per element, as torch did."""
        count, cols = products.shape
        groups = scale.shape[1]
        if values.shape[1] == cols == groups * self.group:
            np.multiply(
                values.reshape(count, groups, self.group),
                scale[:, :, None],
                out=products.reshape(count, groups, self.group),
            )
        else:
            np.multiply(values[:, :cols], np.repeat(scale, self.group, axis=1)[:, :cols], out=products)


def _nibble_pairs() -> np.ndarray:
    """Byte -> its low and high nibble minus 8, as two float32 in one uint64 (exact: |q - 8| <= 8)."""
    byte = np.arange(256)
    values = np.stack([(byte & 0xF) - 8, (byte >> 4) - 8], axis=1).astype(np.float32)
    return values.view(np.uint64).reshape(256)


NIBBLE_PAIRS = _nibble_pairs()

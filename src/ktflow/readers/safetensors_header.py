"""The safetensors header of one file, read and checked at least as strictly as the library.

Shared by every step that opens safetensors without loading them (cast, fetch, convert-lora,
convert-int8): a step that only needs the layout must not import another step to get it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
# A header larger than this is corrupt, not large: the safetensors crate rejects > 100 MB too.
MAX_HEADER = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor's bytes sit in a source shard (``start``/``end`` are absolute file offsets)."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorSlot]:
    """Parse and check a shard's header against its size: truncated, garbled or overlapping data fails.

    At least what the safetensors library enforces: a sane header length, a JSON object without
    duplicate keys, string metadata, byte counts that match dtype x shape, and data offsets that,
    in order, tile the data section exactly (no gap, no overlap, nothing after the last tensor).
    """
    size, raw = _header_bytes(path)
    header = _parse_header(path, raw)
    base = 8 + len(raw)
    slots = {name: _slot(path, name, entry, base) for name, entry in header.items() if name != "__metadata__"}
    _check_layout(path, slots, base, size)
    return slots


def tensor_layouts(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of every tensor in a checked header, without reading tensor data."""
    return {name: (slot.shape, slot.dtype) for name, slot in read_header(path).items()}


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """(file size, raw JSON header bytes) once the length prefix is known to fit the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise KtflowInputError(path, None, f"not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise KtflowInputError(
                    path, None, f"not a safetensors file: header length {length} exceeds {MAX_HEADER}"
                )
            if 8 + length > size:
                raise KtflowInputError(
                    path, None, f"corrupt or truncated: header of {length} bytes, file {size}"
                )
            return size, handle.read(length)
    except FileNotFoundError as error:
        raise KtflowInputError(path, None, "shard file is missing") from error


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {key!r} appears twice")
        found[key] = value
    return found


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise KtflowInputError(path, None, f"corrupt header: {error}") from error
    if not isinstance(header, dict):
        raise KtflowInputError(path, None, "corrupt header: not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise KtflowInputError(path, "__metadata__", "corrupt header: must map strings to strings")
    return header


def _check_layout(path: Path, slots: dict[str, TensorSlot], base: int, size: int) -> None:
    """Tensors sorted by offset must follow each other from the data start to the end of the file."""
    at, previous = base, None
    for slot in sorted(slots.values(), key=lambda s: (s.start, s.end)):
        if slot.start < at:
            raise KtflowInputError(path, slot.name, f"corrupt header: data overlaps tensor {previous}")
        if slot.start > at:
            raise KtflowInputError(
                path, slot.name, f"corrupt header: {slot.start - at} unaccounted bytes before this tensor"
            )
        if slot.end > size:
            raise KtflowInputError(
                path, slot.name, f"truncated shard: tensor data ends at byte {slot.end}, file has {size}"
            )
        at, previous = slot.end, slot.name
    if at != size:
        raise KtflowInputError(path, None, f"corrupt shard: data ends at byte {at}, file has {size}")


def _slot(path: Path, name: str, entry: Any, base: int) -> TensorSlot:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
            raise TypeError("shape and offsets must be non-negative integers")
    except (KeyError, TypeError, ValueError) as error:
        raise KtflowInputError(path, name, f"corrupt header entry: {error}") from error
    if dtype not in DTYPE_SIZES:
        raise KtflowInputError(path, name, f"unknown dtype {dtype!r}")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise KtflowInputError(path, name, f"corrupt header: {end - begin} bytes for {dtype} {list(shape)}")
    return TensorSlot(name, path, dtype, shape, base + begin, base + end)

"""NaN / Inf in safetensors data, read as raw bits: one check for the cast and for training.

A float is NaN or Inf exactly when its exponent field is all ones, so the check needs no float
type numpy lacks (bf16) and no torch. Counting happens only once something is wrong: a clean
tensor pays for one mask and one max.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ktflow.readers.safetensors_header import read_header

# safetensors float dtype -> (unsigned type of its width, its exponent field).
FLOAT_DTYPES: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "BF16": (np.uint16, 0x7F80),
    "F16": (np.uint16, 0x7C00),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}


def count_nonfinite(bits: np.ndarray, exponent: int, scratch: np.ndarray) -> int:
    """NaN / Inf among float values given as raw unsigned bits; ``scratch``: as many of the same type."""
    if not bits.size:
        return 0
    fields = np.bitwise_and(bits, exponent, out=scratch[: bits.size].reshape(bits.shape))
    if int(fields.max()) != exponent:
        return 0
    return int(np.count_nonzero(fields == exponent))


def nonfinite_message(count: int, total: int, what: str) -> str:
    return f"{count} of {total} {what} values are NaN or Inf"


def nonfinite_tensors(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, NaN/Inf count, values) of each float tensor of a safetensors file that holds any,
    by name; the file is small (an adapter), so each tensor is read whole."""
    slots = read_header(path)
    with open(path, "rb") as handle:
        for name in sorted(slots):
            slot, kind = slots[name], FLOAT_DTYPES.get(slots[name].dtype)
            if kind is None:
                continue
            handle.seek(slot.start)
            bits = np.frombuffer(handle.read(slot.nbytes), dtype=kind[0])
            bad = count_nonfinite(bits, kind[1], np.empty_like(bits))
            if bad:
                yield name, bad, bits.size

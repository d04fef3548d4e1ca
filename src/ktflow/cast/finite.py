"""Non-finite values (NaN, Inf) stop a cast: no real checkpoint holds one, and a single NaN scale
would otherwise poison training, adapters and every table downstream without an error.

The checks ride on the cast's single pass and read raw bits, so they need no float type numpy
lacks (bf16): a value is NaN or Inf exactly when its exponent field is all ones. FP8 NaN codes are
found by the maxima the kernel takes anyway, scales are small, and pass-through tensors get one
mask and one max per chunk. Counting happens only once something is wrong, so a clean checkpoint
pays for the max alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ktflow.errors import KtflowInputError
from ktflow.nonfinite import nonfinite_message

# Largest finite bf16 (0x7F7F): a float32 product at or beyond it rounds to Inf.
BF16_MAX = float(np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0])


def count_nonfinite_floats(values: np.ndarray) -> int:
    """NaN / Inf in a small float array (scales)."""
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def fp8_nan_count(raw: np.ndarray) -> int:
    """float8_e4m3fn has no Inf; its NaN codes are 0x7F and 0xFF."""
    return int(np.count_nonzero((raw & 0x7F) == 0x7F))


def nonfinite_error(path: Path | str, name: str, count: int, total: int, what: str) -> KtflowInputError:
    return KtflowInputError(
        path,
        name,
        f"{nonfinite_message(count, total, what)}: refusing to cast a checkpoint that would silently "
        "train on NaN (re-download the shard, or fix the tensor)",
    )


class Tally:
    """Non-finite values seen in one tensor, chunk by chunk; raised once the tensor is done so the
    message can say how many there are in all."""

    def __init__(self, path: Path | str, name: str, total: int, what: str) -> None:
        self.path, self.name, self.total, self.what = path, name, total, what
        self.count = 0

    def add(self, count: int) -> None:
        self.count += count

    def raise_if_any(self) -> None:
        if self.count:
            raise nonfinite_error(self.path, self.name, self.count, self.total, self.what)

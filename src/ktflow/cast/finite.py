"""Non-finite values (NaN, Inf) stop a cast: no real checkpoint holds one, and a single NaN scale
would otherwise poison training, adapters and every table downstream without an error.

The checks ride on the cast's single pass: FP8 NaN codes are already looked for by the widening,
scales are small, and pass-through tensors get one ``aminmax`` reduction per chunk (~5 GB/s on one
core, where ``isfinite().all()`` manages 0.2 GB/s on bf16). Counting happens only once something
is wrong, so a clean checkpoint pays for the reduction alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ktflow.errors import KtflowInputError

FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# Largest finite bf16 (0x7F7F): a float32 product at or beyond it rounds to Inf.
BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def all_finite(values: torch.Tensor) -> bool:
    """One reduction: min and max are both finite iff every value is (NaN propagates through both)."""
    if not values.numel():
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def count_nonfinite(values: torch.Tensor) -> int:
    return 0 if all_finite(values) else int((~torch.isfinite(values)).sum())


def fp8_nan_count(raw: torch.Tensor) -> int:
    """float8_e4m3fn has no Inf; its NaN codes are 0x7F and 0xFF."""
    return int(((raw & 0x7F) == 0x7F).sum())


def nonfinite_message(count: int, total: int, what: str) -> str:
    return f"{count} of {total} {what} values are NaN or Inf"


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

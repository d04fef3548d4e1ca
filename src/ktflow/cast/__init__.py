"""The weight cast step: FP8 block / INT4 pack-quantized / bf16 checkpoints to a complete bf16 model dir.

Bit-exact (float32 product, round to nearest even), streaming (memory does not grow with shard
size), parallel across shards, resumable after a kill, and verified before it is marked complete.

The kernels are numpy (torch is not imported: its ~1.3 s import was most of a small cast's time).
The public names load on first use, so ``ktflow.steps.cast`` and ``ktflow.cast.shards`` import fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ktflow.cast.detect import detect_format
    from ktflow.cast.run import CastReport, cast_checkpoint
    from ktflow.cast.shards import CAST_MARKER
    from ktflow.cast.verify import VerifyReport, verify_checkpoint

_HOMES = {
    "CAST_MARKER": "ktflow.cast.shards",
    "CastReport": "ktflow.cast.run",
    "cast_checkpoint": "ktflow.cast.run",
    "detect_format": "ktflow.cast.detect",
    "VerifyReport": "ktflow.cast.verify",
    "verify_checkpoint": "ktflow.cast.verify",
}

__all__ = [
    "CAST_MARKER",
    "CastReport",
    "VerifyReport",
    "cast_checkpoint",
    "detect_format",
    "verify_checkpoint",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ktflow.cast' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

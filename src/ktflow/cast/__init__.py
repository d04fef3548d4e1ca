"""The weight cast step: FP8 block / INT4 pack-quantized / bf16 checkpoints to a complete bf16 model dir.

Bit-exact (float32 product, round to nearest even), streaming (memory does not grow with shard
size), parallel across shards, resumable after a kill, and verified before it is marked complete.
"""

from ktflow.cast.detect import detect_format
from ktflow.cast.run import CAST_MARKER, CastReport, cast_checkpoint
from ktflow.cast.verify import VerifyReport, verify_checkpoint

__all__ = [
    "CAST_MARKER",
    "CastReport",
    "VerifyReport",
    "cast_checkpoint",
    "detect_format",
    "verify_checkpoint",
]

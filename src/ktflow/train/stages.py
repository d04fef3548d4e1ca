"""LLaMA-Factory training stages and the data formats each trains on."""

from __future__ import annotations

# Each stage with the data formats it trains on; the first is the default.
STAGE_FORMATS = {"sft": ("alpaca", "sharegpt"), "dpo": ("pairwise",), "kto": ("kto",)}


def default_format(stage: str) -> str:
    return STAGE_FORMATS[stage][0]

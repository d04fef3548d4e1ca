"""Which weight format a model config declares: a registry lookup by ``quant_method``; each format
parses, and names the key of, its own unsupported settings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ktflow.cast.formats import FORMATS, UNQUANTIZED
from ktflow.cast.formats.base import WeightFormat
from ktflow.errors import KtflowInputError


def quantization_config(config: Mapping[str, Any]) -> tuple[str, Any]:
    """The quantization config and its key path; K2.5 keeps it under ``text_config``."""
    if "quantization_config" in config:
        return "quantization_config", config["quantization_config"]
    text = config.get("text_config")
    if isinstance(text, Mapping) and "quantization_config" in text:
        return "text_config.quantization_config", text["quantization_config"]
    return "", None


def make_format(config: Mapping[str, Any], path: Path | str = "config.json") -> WeightFormat:
    """The format object for a model config; unknown or unsupported settings fail with the key at fault."""
    key, quant = quantization_config(config)
    if quant is None:
        return UNQUANTIZED.from_config(config, None, path, key)
    if not isinstance(quant, Mapping):
        raise KtflowInputError(path, key, "must be an object")
    method = quant.get("quant_method")
    fmt = FORMATS.get(method) if isinstance(method, str) else None
    if fmt is None:
        supported = " and ".join(known.supported for known in FORMATS.values())
        raise KtflowInputError(
            path, f"{key}.quant_method", f"unknown quantization method {method!r}: supported are {supported}"
        )
    return fmt.from_config(config, quant, path, key)


def detect_format(config: dict[str, Any]) -> str:
    """``fp8-block``, ``int4-pack`` or ``bf16``; raises KtflowInputError for anything else."""
    return make_format(config).name

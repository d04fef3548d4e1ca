"""Which weight format a model config declares, with every unsupported setting named by its key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ktflow.cast.formats import Bf16Passthrough, Fp8Block, Int4Pack, WeightFormat
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
        text = config.get("text_config")
        nested = text if isinstance(text, Mapping) else {}
        dtype = (
            config.get("torch_dtype")
            or config.get("dtype")
            or nested.get("torch_dtype")
            or nested.get("dtype")
        )
        if dtype not in (None, "bfloat16"):
            raise KtflowInputError(
                path, "torch_dtype", f"{dtype} checkpoints are not cast; only bf16 is passed through"
            )
        return Bf16Passthrough()
    if not isinstance(quant, Mapping):
        raise KtflowInputError(path, key, "must be an object")
    method = quant.get("quant_method")
    if method == "fp8":
        return _fp8(quant, path, key)
    if method == "compressed-tensors":
        return _int4(quant, path, key)
    raise KtflowInputError(
        path,
        f"{key}.quant_method",
        f"unknown quantization method {method!r}: supported are fp8 (block) "
        "and compressed-tensors pack-quantized int4",
    )


def _fp8(quant: Mapping[str, Any], path: Path | str, key: str) -> WeightFormat:
    if quant.get("fmt", "e4m3") != "e4m3":
        raise KtflowInputError(path, f"{key}.fmt", f"{quant.get('fmt')!r} is not supported (e4m3 only)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
        raise KtflowInputError(
            path, f"{key}.weight_block_size", f"need [rows, cols] block sizes, got {block!r}"
        )
    return Fp8Block((block[0], block[1]))


def _int4(quant: Mapping[str, Any], path: Path | str, key: str) -> WeightFormat:
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
        wanted = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        for name, value in wanted.items():
            if weights.get(name) != value:
                raise KtflowInputError(
                    path, f"{field}.{name}", f"{weights.get(name)!r} is not supported ({value!r})"
                )
        sizes.add(weights.get("group_size"))
    if len(sizes) != 1 or not isinstance(size := sizes.pop(), int) or size <= 0:
        raise KtflowInputError(path, f"{key}.config_groups", "need one positive group_size for all groups")
    return Int4Pack(size)


def detect_format(config: dict[str, Any]) -> str:
    """``fp8-block``, ``int4-pack`` or ``bf16``; raises KtflowInputError for anything else."""
    return make_format(config).name

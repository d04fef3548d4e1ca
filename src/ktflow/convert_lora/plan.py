"""Validate an adapter dir from its JSON and safetensors headers and derive the SGLang adapter."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from ktflow.atomic import sha256_file
from ktflow.convert_lora.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FUSED_KEY,
    FUSED_LAYOUT,
    FUSED_WEIGHTS,
    KT_MANIFEST,
    clean_key,
)
from ktflow.errors import KtflowInputError
from ktflow.readers.json_file import read_json_object
from ktflow.readers.safetensors_header import tensor_layouts

log = logging.getLogger(__name__)

# SGLang's usual module order first, anything else sorted after (matches kt_kernel's converter).
# fmt: off
_MODULE_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "embed_tokens", "lm_head",
)
# fmt: on
# adapter_config.json fields that make an adapter more than plain LoRA A/B matrices
_UNSERVABLE = (
    ("use_dora", "DoRA"),
    ("target_parameters", "LoRA on fused 3-D parameters (peft >= 0.19 does this to MoE experts)"),
    ("modules_to_save", "fully trained modules"),
    ("trainable_token_indices", "trained token embeddings"),
)
_RANK_AXIS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
_LORA_MATRIX = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.|$)")


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """The validated adapter and the exact output, derived from headers only."""

    adapter_dir: Path
    config: dict[str, Any]
    plain_keys: dict[str, str]  # output key -> key in adapter_model.safetensors
    fused_keys: tuple[str, ...]
    rank: int
    alpha: float
    expert_tensor_count: int
    manifest_checked: bool


def _base_dims(base_model: str) -> dict[str, int]:
    """Expert geometry from a local base checkpoint's config.json (empty for a hub id)."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return {}
    config = read_json_object(path)
    text = config.get("text_config", config)
    found = {
        "experts": text.get("n_routed_experts", text.get("num_experts")),
        "hidden": text.get("hidden_size"),
        "intermediate": text.get("moe_intermediate_size"),
        "layers": text.get("num_hidden_layers"),
    }
    return {name: value for name, value in found.items() if isinstance(value, int)}


def _fused_plan(path: Path, dims: dict[str, int]) -> tuple[tuple[str, ...], int, set[str], int]:
    """Validate the fused file's keys and shapes; return (keys, rank, projections, per-expert count)."""
    headers = tensor_layouts(path)
    if not headers:
        raise KtflowInputError(path, None, "holds no tensors")
    bound = dict(dims)
    origin = {name: "the base model's config.json" for name in bound}
    layers: dict[int, set[str]] = {}
    for key, (shape, _dtype) in sorted(headers.items()):
        match = FUSED_KEY.match(key)
        if match is None or match.group(2) not in FUSED_LAYOUT:
            raise KtflowInputError(
                path, key, "unexpected key (want layers.{L}.experts.{gate,up,down}_lora_{a,b})"
            )
        layer = int(match.group(1))
        if "layers" in bound and layer >= bound["layers"]:
            raise KtflowInputError(
                path, key, f"layer {layer} but the base model has {bound['layers']} layers"
            )
        layers.setdefault(layer, set()).add(match.group(2))
        meaning = ("experts", *FUSED_LAYOUT[match.group(2)][2])
        if len(shape) != 3:
            raise KtflowInputError(
                path, key, f"expected a 3-D [{', '.join(meaning)}] tensor, got {list(shape)}"
            )
        for name, size in zip(meaning, shape, strict=True):
            if bound.setdefault(name, size) != size:
                raise KtflowInputError(
                    path,
                    key,
                    f"shape {list(shape)} = [{', '.join(meaning)}] gives {name}={size}, "
                    f"but {origin[name]} gives {name}={bound[name]}",
                )
            origin.setdefault(name, key)
    for layer, names in sorted(layers.items()):
        if missing := sorted(set(FUSED_LAYOUT) - names):
            raise KtflowInputError(path, f"layers.{layer}.experts.{missing[0]}", "missing")
    projections = {FUSED_LAYOUT[name][0] for name in FUSED_LAYOUT}
    return tuple(sorted(headers)), bound["rank"], projections, len(headers) * bound["experts"]


def _check_manifest(adapter_dir: Path, rank: int, alpha: float) -> bool:
    """Check kt_adapter_manifest.json against the files beside it; False when there is none."""
    path = adapter_dir / KT_MANIFEST
    if not path.exists():
        log.warning("%s: no %s; converting without checking the KT artifact hashes", adapter_dir, KT_MANIFEST)
        return False
    manifest = read_json_object(path)
    for field, want in (("version", 1), ("status", "ready")):
        if manifest.get(field) != want:
            raise KtflowInputError(path, field, f"expected {want!r}, got {manifest.get(field)!r}")
    lora = manifest.get("lora", {})
    if isinstance(lora, dict) and lora.get("rank", rank) != rank:
        raise KtflowInputError(path, "lora.rank", f"{lora['rank']} but {FUSED_WEIGHTS} has rank {rank}")
    if isinstance(lora, dict) and float(lora.get("alpha", alpha)) != alpha:
        raise KtflowInputError(path, "lora.alpha", f"{lora['alpha']} but the adapter's lora_alpha is {alpha}")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or FUSED_WEIGHTS not in artifacts:
        raise KtflowInputError(path, "artifacts", f"must be an object listing {FUSED_WEIGHTS}")
    for name, record in sorted(artifacts.items()):
        target = adapter_dir / name
        if not isinstance(record, dict) or Path(name).name != name or not target.is_file():
            raise KtflowInputError(path, f"artifacts.{name}", "listed but missing beside the manifest")
        if record.get("size") != target.stat().st_size or record.get("sha256") != sha256_file(target):
            raise KtflowInputError(path, f"artifacts.{name}", "size/sha256 do not match the file (edited?)")
    contract = artifacts[FUSED_WEIGHTS].get("tensors")
    if isinstance(contract, dict):
        actual = tensor_layouts(adapter_dir / FUSED_WEIGHTS)
        for key in sorted(set(contract) | set(actual)):
            want, have = contract.get(key, {}), actual.get(key)
            if (
                have is None
                or not isinstance(want, dict)
                or [list(have[0]), have[1]] != [want.get("shape"), want.get("dtype")]
            ):
                raise KtflowInputError(
                    path,
                    f"artifacts.{FUSED_WEIGHTS}.tensors.{key}",
                    f"manifest says {want or 'nothing'}, file has {have and [list(have[0]), have[1]]}",
                )
    return True


def _module_name(key: str) -> str:
    if "lora_embedding_" in key:
        return "embed_tokens" if "embed_tokens" in key else "lm_head"
    return key.split(".lora_", 1)[0].rsplit(".", 1)[-1]


def _ordered(modules: set[str]) -> list[str]:
    return [m for m in _MODULE_ORDER if m in modules] + sorted(modules - set(_MODULE_ORDER))


def plan_conversion(adapter_dir: Path, base_model: str, lora_alpha: float | None = None) -> AdapterPlan:
    """Validate an adapter dir (headers and JSON only) and derive the SGLang adapter it becomes."""
    config_path, weights_path, fused_path = (
        adapter_dir / n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FUSED_WEIGHTS)
    )
    if not weights_path.is_file():
        raise KtflowInputError(
            weights_path, None, "missing (PEFT adapter weights; .bin adapters are not supported)"
        )
    config = read_json_object(config_path)
    config_rank = config.get("r")
    if isinstance(config_rank, bool) or not isinstance(config_rank, int) or config_rank <= 0:
        raise KtflowInputError(config_path, "r", f"missing or not a positive integer: {config_rank!r}")
    if config.get("peft_type", "LORA") != "LORA":
        raise KtflowInputError(config_path, "peft_type", f"{config['peft_type']!r}: only LORA converts")
    for field, why in _UNSERVABLE:
        if config.get(field):
            raise KtflowInputError(config_path, field, f"{why}: SGLang cannot load it")
    alpha = config.get("lora_alpha", lora_alpha)
    if alpha is None:
        raise KtflowInputError(
            config_path, "lora_alpha", "missing; pass --lora-alpha (the value used in training)"
        )
    if lora_alpha is not None and float(alpha) != float(lora_alpha):
        raise KtflowInputError(config_path, "lora_alpha", f"{alpha} conflicts with --lora-alpha {lora_alpha}")

    fused_keys: tuple[str, ...] = ()
    rank, expert_count, targets = config_rank, 0, set[str]()
    if fused_path.exists():
        fused_keys, rank, targets, expert_count = _fused_plan(fused_path, _base_dims(base_model))
        if rank != config_rank:
            raise KtflowInputError(config_path, "r", f"{config_rank} but {FUSED_WEIGHTS} has rank {rank}")
    plain_keys: dict[str, str] = {}
    for key, (shape, _dtype) in sorted(tensor_layouts(weights_path).items()):
        out_key = clean_key(key)
        matrix = _LORA_MATRIX.search(out_key)
        if matrix is None:
            raise KtflowInputError(weights_path, key, "not a LoRA A/B matrix (SGLang loads nothing else)")
        if out_key in plain_keys:
            raise KtflowInputError(weights_path, key, f"collides with {plain_keys[out_key]} once cleaned")
        if len(shape) != 2 or shape[_RANK_AXIS[matrix.group(1)]] != rank:
            raise KtflowInputError(weights_path, key, f"shape {list(shape)} does not have rank {rank}")
        plain_keys[out_key] = key
        targets.add(_module_name(out_key))
    listed = config.get("target_modules")
    if isinstance(listed, list):  # a regex string or "all-linear" names nothing by itself
        targets.update(str(name).rsplit(".", 1)[-1] for name in listed)
    manifest_checked = bool(fused_keys) and _check_manifest(adapter_dir, rank, float(alpha))
    out_config = {
        **config,
        "peft_type": config.get("peft_type", "LORA"),
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": _ordered(targets),
        "bias": config.get("bias", "none"),
        "task_type": config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model,
    }
    return AdapterPlan(
        adapter_dir, out_config, plain_keys, fused_keys, rank, float(alpha), expert_count, manifest_checked
    )

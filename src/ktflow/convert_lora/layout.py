"""File names and key layout of the adapters ktflow reads (HF/KT trainers) and writes (SGLang)."""

from __future__ import annotations

import re

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FUSED_WEIGHTS = "fused_expert_lora.safetensors"
KT_MANIFEST = "kt_adapter_manifest.json"
FUSED_KEY = re.compile(r"^layers\.(\d+)\.experts\.([a-z_]+)$")
# fused name -> (projection, PEFT matrix, meaning of the two dims after the expert dim)
FUSED_LAYOUT: dict[str, tuple[str, str, tuple[str, str]]] = {
    "gate_lora_a": ("gate_proj", "lora_A", ("rank", "hidden")),
    "gate_lora_b": ("gate_proj", "lora_B", ("intermediate", "rank")),
    "up_lora_a": ("up_proj", "lora_A", ("rank", "hidden")),
    "up_lora_b": ("up_proj", "lora_B", ("intermediate", "rank")),
    "down_lora_a": ("down_proj", "lora_A", ("rank", "intermediate")),
    "down_lora_b": ("down_proj", "lora_B", ("hidden", "rank")),
}


def expert_key(layer: int, expert: int, projection: str, matrix: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.{matrix}.weight"


def clean_key(key: str) -> str:
    return key.replace("base_model.model.", "").replace(".orig_module", "")

"""ktflow's own converter: needs nothing beyond safetensors and torch."""

from __future__ import annotations

from pathlib import Path

from ktflow.atomic import write_json
from ktflow.convert_lora.converters.base import LoraConverter
from ktflow.convert_lora.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FUSED_KEY,
    FUSED_LAYOUT,
    FUSED_WEIGHTS,
    expert_key,
)
from ktflow.convert_lora.plan import AdapterPlan


class BuiltinConverter(LoraConverter):
    """Pure safetensors + torch: each fused ``[E, ...]`` tensor is split into one A/B pair per expert."""

    name = "builtin"

    def write(self, plan: AdapterPlan, out: Path, base_model: str, lora_alpha: float | None) -> int:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        plain = load_file(str(plan.adapter_dir / ADAPTER_WEIGHTS))
        tensors = {out_key: plain[key] for out_key, key in plan.plain_keys.items()}
        if plan.fused_keys:
            with safe_open(str(plan.adapter_dir / FUSED_WEIGHTS), framework="pt") as handle:
                for key in plan.fused_keys:
                    match = FUSED_KEY.match(key)
                    assert match is not None  # validated by plan_conversion
                    projection, matrix, _dims = FUSED_LAYOUT[match.group(2)]
                    fused = handle.get_tensor(key).contiguous()
                    for expert in range(fused.shape[0]):
                        # a dim-0 slice of a contiguous tensor is itself contiguous: no copy needed
                        tensors[expert_key(int(match.group(1)), expert, projection, matrix)] = fused[expert]
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(out / ADAPTER_CONFIG, plan.config)
        return len(tensors)

"""The BF16 MoE checkpoint read from headers, and the INT8 layout every backend must produce."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ktflow.errors import KtflowInputError
from ktflow.readers.json_file import read_json_object
from ktflow.readers.safetensors_header import tensor_layouts

# The layout every backend writes: what sglang-kt reads with --kt-method AMXINT8.
KT_METHOD = "AMXINT8"
PROJECTIONS = ("gate", "up", "down")
_EXPERT_KEY = re.compile(
    r"^(?:language_model\.)?model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"
)


@dataclasses.dataclass(frozen=True)
class MoeCheckpoint:
    """A validated BF16 checkpoint: geometry plus where each routed expert weight lives."""

    model_dir: Path
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    # layer -> (expert, projection) -> (shard file, tensor key)
    experts: dict[int, dict[tuple[int, str], tuple[Path, str]]]

    @property
    def layers(self) -> list[int]:
        return sorted(self.experts)


def read_checkpoint(model_dir: Path) -> MoeCheckpoint:
    """Validate config.json and every routed expert tensor from headers, before any tensor is read."""
    config_path = model_dir / "config.json"
    config = read_json_object(config_path)
    text = config.get("text_config", config)
    if text.get("quantization_config") or config.get("quantization_config"):
        raise KtflowInputError(config_path, "quantization_config", "not a BF16 checkpoint (cast it first)")
    geometry: dict[str, int] = {}
    for field, names in (
        ("num_experts", ("n_routed_experts", "num_experts")),
        ("top_k", ("num_experts_per_tok",)),
        ("hidden_size", ("hidden_size",)),
        ("intermediate_size", ("moe_intermediate_size",)),
    ):
        value = next((text[name] for name in names if name in text), None)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KtflowInputError(config_path, names[0], f"missing or not a positive integer: {value!r}")
        geometry[field] = value
    hidden, inter = geometry["hidden_size"], geometry["intermediate_size"]
    want_shape = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise KtflowInputError(model_dir, None, "no *.safetensors files")
    experts: dict[int, dict[tuple[int, str], tuple[Path, str]]] = {}
    for shard in shards:
        for key, (shape, dtype) in tensor_layouts(shard).items():
            if ".mlp.experts." not in key or ".shared_experts." in key:
                continue
            match = _EXPERT_KEY.match(key)
            if match is None:
                raise KtflowInputError(
                    shard, key, "unexpected routed-expert key (want per-expert *_proj.weight)"
                )
            layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
            if dtype != "BF16" or shape != want_shape[proj]:
                raise KtflowInputError(
                    shard,
                    key,
                    f"{dtype} {list(shape)}: expected BF16 {list(want_shape[proj])} from config.json",
                )
            if expert >= geometry["num_experts"]:
                raise KtflowInputError(
                    shard, key, f"expert {expert} >= n_routed_experts {geometry['num_experts']}"
                )
            experts.setdefault(layer, {})[(expert, proj)] = (shard, key)
    if not experts:
        raise KtflowInputError(
            model_dir, None, "no routed expert weights (model.layers.{L}.mlp.experts.{E}.*)"
        )
    for layer, found in sorted(experts.items()):
        for expert in range(geometry["num_experts"]):
            for proj in PROJECTIONS:
                if (expert, proj) not in found:
                    key = f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"
                    raise KtflowInputError(model_dir, key, "missing (every MoE layer needs every expert)")
    return MoeCheckpoint(model_dir, experts=experts, **geometry)


def expected_keys(layers: list[int], num_experts: int, pools: int) -> list[str]:
    return [
        f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{part}"
        for layer in layers
        for proj in PROJECTIONS
        for expert in range(num_experts)
        for numa in range(pools)
        for part in ("weight", "scale")
    ]


def verify_layout(out: Path, checkpoint: MoeCheckpoint, pools: int) -> list[str]:
    """Check the output holds every expected int8 weight / float32 scale; return its shard names."""
    found: dict[str, str] = {}
    shards = sorted(out.glob("*.safetensors"))
    for shard in shards:
        found.update((key, dtype) for key, (_shape, dtype) in tensor_layouts(shard).items())
    for key in expected_keys(checkpoint.layers, checkpoint.num_experts, pools):
        want = "I8" if key.endswith(".weight") else "F32"
        if found.get(key) != want:
            raise RuntimeError(
                f"KT's converter left {out} incomplete: {key} is {found.get(key)}, want {want}"
            )
    return [shard.name for shard in shards]

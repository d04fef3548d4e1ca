"""Synthetic releases in the real layouts (DeepSeek-V3 FP8, Kimi-K2 INT4), for tests and benchmarks.

Shards are written with the ``safetensors`` library itself, so the cast is exercised on files
that ktflow's own writer did not produce. Values are random bytes, which covers every FP8 code
(NaNs excluded: real releases have none) and every INT4 nibble, padding nibbles included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
QUANT_PARTS = ("_scale_inv", ".weight_scale", ".weight_shape")


@dataclass(frozen=True)
class Dims:
    """DeepSeek-V3 architecture sizes (the real model: 7168 / 2048 / 18432, 256 experts)."""

    hidden: int = 200
    inter: int = 136
    moe_inter: int = 72
    vocab: int = 160
    layers: int = 2
    dense_layers: int = 1
    experts: int = 4
    heads: int = 2
    q_lora: int = 96
    kv_lora: int = 40
    nope: int = 16
    rope: int = 8
    v_head: int = 16

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "moe_intermediate_size": self.moe_inter,
            "num_hidden_layers": self.layers,
            "first_k_dense_replace": self.dense_layers,
            "n_routed_experts": self.experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": min(2, self.experts),
            "n_group": 1,
            "topk_group": 1,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "q_lora_rank": self.q_lora,
            "kv_lora_rank": self.kv_lora,
            "qk_nope_head_dim": self.nope,
            "qk_rope_head_dim": self.rope,
            "v_head_dim": self.v_head,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }


def linears(dims: Dims, layer: int) -> Iterator[tuple[str, tuple[int, int], bool]]:
    """(name, [out, in], is a routed expert) for every linear weight of one decoder layer."""
    d = dims
    attn = f"model.layers.{layer}.self_attn"
    yield f"{attn}.q_a_proj.weight", (d.q_lora, d.hidden), False
    yield f"{attn}.q_b_proj.weight", (d.heads * (d.nope + d.rope), d.q_lora), False
    yield f"{attn}.kv_a_proj_with_mqa.weight", (d.kv_lora + d.rope, d.hidden), False
    yield f"{attn}.kv_b_proj.weight", (d.heads * (d.nope + d.v_head), d.kv_lora), False
    yield f"{attn}.o_proj.weight", (d.hidden, d.heads * d.v_head), False
    mlp = f"model.layers.{layer}.mlp"
    blocks = (
        [(mlp, d.inter, False)]
        if layer < d.dense_layers
        else [
            (f"{mlp}.shared_experts", d.moe_inter, False),
            *((f"{mlp}.experts.{e}", d.moe_inter, True) for e in range(d.experts)),
        ]
    )
    for prefix, inner, routed in blocks:
        yield f"{prefix}.gate_proj.weight", (inner, d.hidden), routed
        yield f"{prefix}.up_proj.weight", (inner, d.hidden), routed
        yield f"{prefix}.down_proj.weight", (d.hidden, inner), routed


def plain(dims: Dims, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Norms, router and bias of one layer: never quantized in either release."""
    base = f"model.layers.{layer}"
    yield f"{base}.input_layernorm.weight", torch.ones(dims.hidden, dtype=torch.bfloat16)
    yield f"{base}.post_attention_layernorm.weight", torch.ones(dims.hidden, dtype=torch.bfloat16)
    yield f"{base}.self_attn.q_a_layernorm.weight", torch.ones(dims.q_lora, dtype=torch.bfloat16)
    yield f"{base}.self_attn.kv_a_layernorm.weight", torch.ones(dims.kv_lora, dtype=torch.bfloat16)
    if layer >= dims.dense_layers:
        yield f"{base}.mlp.gate.weight", _normal((dims.experts, dims.hidden), layer)
        yield f"{base}.mlp.gate.e_score_correction_bias", torch.zeros(dims.experts, dtype=torch.float32)


def _normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _fp8(shape: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # 254 codes: all but the NaNs 0x7F and 0xFF (0..253, shifted up by one from 0x7F on).
    raw = torch.randint(0, 254, shape, dtype=torch.uint8, generator=generator)
    raw.add_((raw >= 0x7F).to(torch.uint8))
    blocks = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    scale = torch.rand(blocks, generator=generator) * 2e-4 + 1e-5
    return raw.view(torch.float8_e4m3fn), scale


def _int4(shape: tuple[int, int], group: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    rows, cols = shape
    packed = torch.randint(
        -(2**31), 2**31 - 1, (rows, math.ceil(cols / 8)), dtype=torch.int32, generator=generator
    )
    scale = (torch.rand((rows, math.ceil(cols / group)), generator=generator) * 1e-2 + 1e-4).to(
        torch.bfloat16
    )
    return {
        "weight_packed": packed,
        "weight_scale": scale,
        "weight_shape": torch.tensor(shape, dtype=torch.int64),
    }


def _save(
    dst: Path,
    tensors: list[tuple[str, torch.Tensor]],
    shard_bytes: int,
    config: dict[str, Any],
    moves: dict[str, int] | None = None,
) -> Path:
    """Fill shards in order up to ``shard_bytes``; ``moves`` sends named tensors to another shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        # Quantization parameters follow their weight; only ``moves`` separates them.
        if size and size + tensor.nbytes > shard_bytes and not name.endswith(QUANT_PARTS):
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    for name, offset in (moves or {}).items():
        home = next(i for i, shard in enumerate(shards) if name in shard)
        target = (home + offset) % len(shards)
        shards[target][name] = shards[home].pop(name)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shards = [shard for shard in shards if shard]
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(tensor.nbytes for _, tensor in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return dst


def _embeddings(dims: Dims) -> list[tuple[str, torch.Tensor]]:
    return [
        ("model.embed_tokens.weight", _normal((dims.vocab, dims.hidden), 1)),
        ("model.norm.weight", torch.ones(dims.hidden, dtype=torch.bfloat16)),
        ("lm_head.weight", _normal((dims.vocab, dims.hidden), 2)),
    ]


def write_fp8_release(
    dst: Path, dims: Dims = Dims(), shard_bytes: int = 1 << 16, seed: int = 0, scales_apart: bool = True
) -> Path:
    """DeepSeek-V3 / Kimi-K2-Instruct layout: every linear weight FP8 with 128x128 float32 scales.

    ``scales_apart`` moves every other scale into the next shard, as happens at real shard edges.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = _embeddings(dims)[:1]
    moves: dict[str, int] = {}
    for layer in range(dims.layers):
        for i, (name, shape, _) in enumerate(linears(dims, layer)):
            weight, scale = _fp8(shape, generator)
            tensors += [(name, weight), (f"{name}_scale_inv", scale)]
            if scales_apart and i % 2:
                moves[f"{name}_scale_inv"] = 1
        tensors += list(plain(dims, layer))
    tensors += _embeddings(dims)[1:]
    config = dims.config() | {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    return _save(dst, tensors, shard_bytes, config, moves)


def int4_quantization_config(group: int = 32) -> dict[str, Any]:
    """Kimi-K2-Thinking's compressed-tensors config: routed experts only, symmetric int4 groups."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            r"re:.*mlp\.(gate|up|down)_proj.*",
        ],
        "kv_cache_scheme": None,
    }


def write_int4_release(
    dst: Path,
    dims: Dims = Dims(),
    shard_bytes: int = 1 << 16,
    seed: int = 0,
    group: int = 32,
    k25: bool = False,
) -> Path:
    """Kimi-K2-Thinking layout (routed experts int4, the rest bf16); ``k25`` gives K2.5's
    ``language_model.`` prefixes and a config nested under ``text_config``."""
    generator = torch.Generator().manual_seed(seed)
    tensors: list[tuple[str, torch.Tensor]] = []
    prefix = "language_model." if k25 else ""
    for layer in range(dims.layers):
        for name, shape, routed in linears(dims, layer):
            module = name.removesuffix(".weight")
            if routed:
                tensors += [(f"{module}.{part}", t) for part, t in _int4(shape, group, generator).items()]
            else:
                tensors.append((name, _normal(shape, layer)))
        tensors += list(plain(dims, layer))
    tensors = [(prefix + name, t) for name, t in [*_embeddings(dims), *tensors]]
    text = dims.config() | {"quantization_config": int4_quantization_config(group)}
    config = text
    if k25:
        tensors.append(("vision_tower.patch_embed.weight", _normal((16, 3 * 14 * 14), 3)))
        config = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": text,
        }
    return _save(dst, tensors, shard_bytes, config)


# DeepSeek-V3's per-layer matrix sizes (vocab cut): what a realistic synthetic release uses.
REAL_SIZES: dict[str, int] = {
    "hidden": 7168,
    "inter": 18432,
    "moe_inter": 2048,
    "vocab": 4096,
    "q_lora": 1536,
    "kv_lora": 512,
    "heads": 16,
    "nope": 128,
    "rope": 64,
    "v_head": 128,
}


def write_int4_weight(path: Path, packed: torch.Tensor, scale: torch.Tensor, cols: int) -> Path:
    """One pack-quantized weight ``m`` (its packed words, scales and shape) alone in a shard."""
    shape = torch.tensor([packed.shape[0], cols], dtype=torch.int32)
    save_file({"m.weight_packed": packed, "m.weight_scale": scale, "m.weight_shape": shape}, path)
    return path

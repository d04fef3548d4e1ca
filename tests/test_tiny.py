"""The embedded default: tiny FP8 release and seeded tasks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ktflow.tiny.fp8 import is_fp8_weight, quantize_fp8_block
from ktflow.tiny.tasks import LETTERS, choice_task, corpus, style_task


def test_release_has_deepseek_v3_fp8_layout(tiny_release: Path) -> None:
    config = json.loads((tiny_release / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["n_routed_experts"] == 8 and config["n_shared_experts"] == 1
    assert config["first_k_dense_replace"] == 1
    index = json.loads((tiny_release / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4
    total = 0
    seen_fp8 = seen_router = False
    for shard in shards:
        with safe_open(tiny_release / shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
                if key.endswith("experts.3.up_proj.weight"):
                    assert tensor.dtype == torch.float8_e4m3fn
                    seen_fp8 = True
                if key.endswith("mlp.gate.weight"):
                    assert tensor.dtype == torch.bfloat16  # routers stay high precision
                    seen_router = True
                if tensor.dtype == torch.float8_e4m3fn:
                    assert f"{key}_scale_inv" in index["weight_map"]
    assert seen_fp8 and seen_router
    assert index["metadata"]["total_size"] == total
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_release / name).is_file()


def test_fp8_block_quantization_round_trips_within_e4m3_precision() -> None:
    torch.manual_seed(0)
    weight = torch.randn(160, 300) * 0.1
    quantized, scale = quantize_fp8_block(weight)
    assert scale.shape == (2, 3)
    restored = quantized.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:160, :300]
    # e4m3 has 3 mantissa bits: relative error per element is at most 2^-4.
    assert torch.all((restored - weight).abs() <= weight.abs() * 2**-4 + scale.max() * 2**-9)
    assert not is_fp8_weight("model.layers.1.mlp.gate.weight", weight)
    assert is_fp8_weight("model.layers.1.mlp.experts.0.up_proj.weight", weight)


def test_tokenizer_chat_template_matches_llamafactory_parse(tiny_release: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_release)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert text == "<|bos|><|user|>hi\n<|assistant|>yo<|eos|>\n"
    assert tokenizer.decode(tokenizer.encode("")) == "<|bos|>"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"


def test_tasks_are_seeded_disjoint_and_well_formed() -> None:
    train, test = style_task(42, 100, 20)
    assert (train, test) == style_task(42, 100, 20)
    assert style_task(7, 100, 20) != (train, test)
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert all(r["output"].startswith("It was ") for r in train)
    train, test = choice_task(42, 100, 20)
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert {r["output"] for r in train + test} <= set(LETTERS)
    assert len({r["id"] for r in train + test}) == 120
    assert all(r["input"].count("\n") == 5 for r in test)
    assert any("sunday" in text for text in corpus())

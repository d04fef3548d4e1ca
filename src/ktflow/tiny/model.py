"""Build the tiny DeepSeek-V3-architecture MoE and write it the way DeepSeek releases V3.

The command is ``ktflow tiny-model`` (:mod:`ktflow.steps.tiny_model`).

The model is made with transformers' own ``DeepseekV3Config`` (MLA attention, a dense
first layer, 8 routed experts, 1 shared expert), the tokenizer is a byte-level BPE
trained here with ``tokenizers``, and the weights are written as FP8 (e4m3) with
128x128 block ``weight_scale_inv`` in sharded safetensors with an index, plus a
``quantization_config`` in config.json. The default pipeline therefore exercises the
real cast path. Dimensions are chosen so some FP8 blocks are partial (160 = 128 + 32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ktflow.atomic import atomic_dir, write_json
from ktflow.tiny.fp8 import BLOCK, is_fp8_weight, quantize_fp8_block

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# LLaMA-Factory parses this template (llamafactory.data.template.parse_template) when
# no template is configured, so training and ktflow's own inference format prompts alike.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 160,
    "intermediate_size": 320,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
}
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"], *ROLE_TOKENS]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id(SPECIAL["bos"])
    core.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A",
        pair=f"{SPECIAL['bos']} $A $B",
        special_tokens=[(SPECIAL["bos"], bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=MODEL_DIMS["max_position_embeddings"],
    )


def build_model(tokenizer: Any, seed: int) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_DIMS,
    )
    torch.manual_seed(seed)
    model: Any = DeepseekV3ForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def release_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Per-expert DeepSeek key layout, as save_pretrained writes it (transformers fuses on load)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def quantize_release(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if is_fp8_weight(name, tensor):
            out[name], out[f"{name}_scale_inv"] = quantize_fp8_block(tensor)
        else:
            out[name] = tensor.to(torch.bfloat16).contiguous()
    return out


def write_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, n_shards: int) -> None:
    """Shards by layer range, keys in sorted order, like DeepSeek's release."""
    names = sorted(tensors)
    per_shard = -(-len(names) // n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(n_shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        file_name = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(
            {name: tensors[name] for name in chunk}, str(out_dir / file_name), metadata={"format": "pt"}
        )
        for name in chunk:
            weight_map[name] = file_name
            total += tensors[name].numel() * tensors[name].element_size()
    write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def build_release(out_dir: Path, seed: int, vocab_size: int, n_shards: int) -> None:
    from ktflow.tiny.tasks import corpus

    with atomic_dir(out_dir) as tmp:
        tokenizer = build_tokenizer(corpus(seed), vocab_size)
        model = build_model(tokenizer, seed)
        staging = tmp / ".staging"
        model.save_pretrained(staging)
        tensors = release_state_dict(staging)
        config = json.loads((staging / "config.json").read_text())
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
        write_sharded(quantize_release(tensors), tmp, n_shards)
        config["quantization_config"] = QUANTIZATION_CONFIG
        config["torch_dtype"] = "bfloat16"
        config.pop("dtype", None)
        write_json(tmp / "config.json", config)
        tokenizer.save_pretrained(tmp)
        model.generation_config.do_sample = False
        model.generation_config.save_pretrained(tmp)

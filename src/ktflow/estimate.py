"""Memory and parameter estimates from a model's config.json, for ``ktflow doctor``.

Parameters are summed tensor by tensor from the architecture's dimensions (one
:class:`Family` subclass per architecture), so the counts equal what transformers
builds; the memory formulas are in :func:`estimate_requirements`'s docstring.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

GiB = 1 << 30
GPU_OVERHEAD = 1 * GiB  # CUDA context + allocator slack per process
HOST_OVERHEAD = 4 * GiB  # Python, tokenizer, data loader, pinned transfer buffers


@dataclass(frozen=True)
class Block:
    """``count`` tensors of ``rows`` x ``cols`` (cols=1: a vector); ``where`` says who holds them."""

    rows: int
    cols: int = 1
    count: int = 1
    where: str = "base"  # "base": non-expert (GPU under KT); "routed": routed experts; "mtp": MTP layers
    lora: bool = False  # a linear layer LoRA (target: all) adapts


class _Parts(list[Block]):
    """The tensors of one decoder layer, all placed at ``where`` unless said otherwise."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        # Experts of an MTP layer count as MTP (checkpoint only), not as routed experts to train.
        self.experts_at = "routed" if where == "base" else where

    def vec(self, size: int, count: int = 1) -> None:
        self.append(Block(size, 1, count, self.where))

    def lin(self, rows: int, cols: int, count: int = 1, lora: bool = True) -> None:
        self.append(Block(rows, cols, count, self.where, lora))

    def mlp(self, hidden: int, inter: int, count: int = 1, routed: bool = False) -> None:
        where = self.experts_at if routed else self.where
        self += [Block(inter, hidden, 2 * count, where, True), Block(hidden, inter, count, where, True)]


class _Cfg:
    """Typed reads of config.json; a missing or bad field is a KtflowInputError naming it."""

    def __init__(self, data: dict[str, Any], source: str | Path | None) -> None:
        # Kimi K2.5 and other multimodal releases nest the language model under text_config.
        nested = data.get("text_config")
        self.data = {**data, **nested} if isinstance(nested, dict) else data
        self.source = source
        self.model_type = str(self.data.get("model_type"))

    def num(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KtflowInputError(self.source, key, f"missing or not a non-negative integer ({value!r})")
        return value

    def opt(self, key: str) -> int | None:
        return None if self.data.get(key) is None else self.num(key)

    def flag(self, key: str) -> bool:
        return bool(self.data.get(key))


class Family(abc.ABC):
    """One architecture family: the tensors of each layer and the KV-cache bytes per token."""

    model_types: tuple[str, ...] = ()

    @abc.abstractmethod
    def layer(self, c: _Cfg, index: int, parts: _Parts) -> None: ...

    @abc.abstractmethod
    def kv_bytes_per_token(self, c: _Cfg) -> int: ...

    def blocks(self, c: _Cfg) -> list[Block]:
        hidden, vocab, layers = c.num("hidden_size"), c.num("vocab_size"), c.num("num_hidden_layers")
        out = [Block(vocab, hidden), Block(hidden)]  # embeddings, final norm
        if not c.flag("tie_word_embeddings"):
            out.append(Block(vocab, hidden))
        for index in range(layers + c.num("num_nextn_predict_layers", 0)):
            parts = _Parts("base" if index < layers else "mtp")
            if index >= layers:  # DeepSeek-style MTP: enorm, hnorm, eh_proj, own embed, head and norm
                parts += [Block(hidden, 1, 3, "mtp"), Block(hidden, 2 * hidden, 1, "mtp")]
                parts.append(Block(vocab, hidden, 2, "mtp"))
            self.layer(c, index, parts)
            out += parts
        return out


class DeepSeek(Family):
    """DeepSeek V2 / V3 and Kimi K2 (MLA attention, shared + routed experts)."""

    model_types = ("deepseek_v2", "deepseek_v3", "kimi_k2")

    def kv_bytes_per_token(self, c: _Cfg) -> int:
        return 2 * c.num("num_hidden_layers") * (c.num("kv_lora_rank") + c.num("qk_rope_head_dim"))

    def layer(self, c: _Cfg, index: int, parts: _Parts) -> None:
        h, heads, q_rank = c.num("hidden_size"), c.num("num_attention_heads"), c.opt("q_lora_rank")
        kv_rank, rope = c.num("kv_lora_rank"), c.num("qk_rope_head_dim")
        nope, v = c.num("qk_nope_head_dim"), c.num("v_head_dim")
        parts.vec(h, 2)
        parts.lin(kv_rank + rope, h)
        parts.vec(kv_rank)
        parts.lin(heads * (nope + v), kv_rank)
        parts.lin(h, heads * v)
        if q_rank:
            parts.lin(q_rank, h)
            parts.vec(q_rank)
        parts.lin(heads * (nope + rope), q_rank or h)
        experts = c.num("n_routed_experts", 0)
        if not experts or index < c.num("first_k_dense_replace", 0) or index % c.num("moe_layer_freq", 1):
            parts.mlp(h, c.num("intermediate_size"))
            return
        inter = c.num("moe_intermediate_size")
        parts.mlp(h, inter, experts, routed=True)
        parts.mlp(h, inter * c.num("n_shared_experts", 0))
        parts.lin(experts, h, lora=False)  # router
        if c.model_type != "deepseek_v2" or c.data.get("topk_method") == "noaux_tc":
            parts.vec(experts)  # e_score_correction_bias


class GqaMoe(Family):
    """Grouped-query attention + an MoE MLP; subclasses say where experts and dense layers are."""

    def head_dim(self, c: _Cfg) -> int:
        return c.opt("head_dim") or c.num("hidden_size") // c.num("num_attention_heads")

    def kv_bytes_per_token(self, c: _Cfg) -> int:
        return 2 * 2 * c.num("num_hidden_layers") * c.num("num_key_value_heads") * self.head_dim(c)

    def qkv_bias(self, c: _Cfg) -> bool:
        return c.flag("attention_bias")

    def qk_norm(self, c: _Cfg) -> bool:
        return c.flag("use_qk_norm")

    def layer(self, c: _Cfg, index: int, parts: _Parts) -> None:
        h, d = c.num("hidden_size"), self.head_dim(c)
        q, kv = c.num("num_attention_heads") * d, c.num("num_key_value_heads") * d
        parts.vec(h, 2)
        parts.lin(q, h)
        parts.lin(kv, h, 2)
        parts.lin(h, q)
        if self.qkv_bias(c):
            parts.vec(q + 2 * kv)
        if self.qk_norm(c):
            parts.vec(d, 2)
        self.mlp(c, index, parts)

    @abc.abstractmethod
    def mlp(self, c: _Cfg, index: int, parts: _Parts) -> None: ...


class QwenMoe(GqaMoe):
    model_types = ("qwen2_moe", "qwen3_moe")

    def qkv_bias(self, c: _Cfg) -> bool:
        return c.model_type == "qwen2_moe"

    def qk_norm(self, c: _Cfg) -> bool:
        return c.model_type == "qwen3_moe"

    def mlp(self, c: _Cfg, index: int, parts: _Parts) -> None:
        # Releases say num_experts; transformers 5 writes num_local_experts for Qwen3 MoE.
        h, experts = c.num("hidden_size"), c.opt("num_experts") or c.num("num_local_experts", 0)
        dense_only = c.data.get("mlp_only_layers") or []
        if not experts or index in dense_only or (index + 1) % c.num("decoder_sparse_step", 1):
            parts.mlp(h, c.num("intermediate_size"))
            return
        parts.mlp(h, c.num("moe_intermediate_size"), experts, routed=True)
        parts.lin(experts, h, lora=False)
        shared = c.num("shared_expert_intermediate_size", 0)
        if shared:
            parts.mlp(h, shared)
            parts.lin(1, h, lora=False)  # shared_expert_gate


class Mixtral(GqaMoe):
    model_types = ("mixtral",)

    def mlp(self, c: _Cfg, index: int, parts: _Parts) -> None:
        h, experts = c.num("hidden_size"), c.num("num_local_experts")
        parts.mlp(h, c.num("intermediate_size"), experts, routed=True)
        parts.lin(experts, h, lora=False)


class Glm4Moe(GqaMoe):
    model_types = ("glm4_moe",)

    def mlp(self, c: _Cfg, index: int, parts: _Parts) -> None:
        h, experts = c.num("hidden_size"), c.num("n_routed_experts")
        if index < c.num("first_k_dense_replace", 0):
            parts.mlp(h, c.num("intermediate_size"))
            return
        inter = c.num("moe_intermediate_size")
        parts.mlp(h, inter, experts, routed=True)
        parts.mlp(h, inter * c.num("n_shared_experts", 0))
        parts.lin(experts, h, lora=False)
        parts.vec(experts)  # e_score_correction_bias


FAMILIES: tuple[Family, ...] = (DeepSeek(), QwenMoe(), Mixtral(), Glm4Moe())


@dataclass
class Requirements:
    model_type: str
    params_total: int  # what transformers builds (no MTP)
    params_routed: int  # routed experts: CPU under KT
    params_non_expert: int
    params_mtp: int  # multi-token-prediction layers: in the checkpoint, unused for LoRA
    params_active: int  # per token: non-expert + routed x top_k / experts
    lora_params_gpu: int
    lora_params_experts: int
    kv_bytes_per_token: int
    bf16_disk_bytes: int
    kt_train_host_bytes: int
    kt_train_gpu_bytes: int
    hf_train_bytes: int
    serve_gpu_bytes: int
    serve_host_bytes: dict[str, int]
    assumptions: dict[str, int]


def estimate_requirements(
    config_json: dict[str, Any],
    *,
    source: str | Path | None = None,
    lora_rank: int = 8,
    seq_len: int = 512,
    batch_size: int = 1,
    serve_tokens: int = 8192,
    hf_weight_bytes: int = 2,
) -> Requirements:
    """Parameter counts and memory needs from a config.json (defaults: the paper's r=8, qlen 512).

    Parameters are summed tensor by tensor from the architecture's dimensions. With
    P_routed (routed experts), P_ne (everything else), P_mtp (MTP layers), T = batch x seq,
    h hidden, L layers, V vocab, R = LoRA params (r x (in + out) per adapted linear):

    - BF16 on disk (cast output) = 2 (P_total + P_mtp)
    - activations A = 2 T h L (checkpointed layer inputs, bf16) + 34 T h (one layer recomputed,
      Korthikanti et al.'s per-layer term without attention scores: flash attention) + 8 T V
      (fp32 logits and their gradient)
    - KT LoRA, GPU = 2 P_ne + 16 R_ne (fp32 weight, grad, Adam m and v) + A + 1 GiB (CUDA context)
    - KT LoRA, host = 2 P_routed + 16 R_experts + 4 GiB (process, buffers)
    - HF LoRA (one device) = w P_total + 16 R_ne + A + 1 GiB, w = hf_weight_bytes (2 for bf16, 4 for
      fp32 training); R_ne only, as transformers 5 cannot put LoRA on fused routed experts
    - serving (KT), GPU = 2 P_ne + KV bytes/token x serve_tokens + 1 GiB; host = {2, 1} P_routed + 4 GiB
      for BF16 or INT8 CPU experts

    These are floors: the paper measured 6.08 GB (KT) and 32.12 GB (HF) on GPU for V2-Lite.
    """
    c = _Cfg(config_json, source)
    model_type = c.model_type
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None:
        known = ", ".join(t for f in FAMILIES for t in f.model_types)
        raise KtflowInputError(source, "model_type", f"{model_type!r} has no estimate (known: {known})")
    blocks = family.blocks(c)
    total = {
        w: sum(b.rows * b.cols * b.count for b in blocks if b.where == w) for w in ("base", "routed", "mtp")
    }
    lora = {w: sum(lora_rank * (b.rows + b.cols) * b.count for b in blocks if b.lora and b.where == w)
            for w in ("base", "routed")}  # fmt: skip
    params_total = total["base"] + total["routed"]
    experts = c.opt("n_routed_experts") or c.opt("num_experts") or c.opt("num_local_experts") or 1
    top_k = c.num("num_experts_per_tok", 0)
    tokens, hidden, vocab = batch_size * seq_len, c.num("hidden_size"), c.num("vocab_size")
    act = 2 * tokens * hidden * c.num("num_hidden_layers") + 34 * tokens * hidden + 8 * tokens * vocab
    kv = family.kv_bytes_per_token(c)
    return Requirements(
        model_type=model_type,
        params_total=params_total,
        params_routed=total["routed"],
        params_non_expert=total["base"],
        params_mtp=total["mtp"],
        params_active=total["base"] + total["routed"] * top_k // experts,
        lora_params_gpu=lora["base"],
        lora_params_experts=lora["routed"],
        kv_bytes_per_token=kv,
        bf16_disk_bytes=2 * (params_total + total["mtp"]),
        kt_train_host_bytes=2 * total["routed"] + 16 * lora["routed"] + HOST_OVERHEAD,
        kt_train_gpu_bytes=2 * total["base"] + 16 * lora["base"] + act + GPU_OVERHEAD,
        hf_train_bytes=hf_weight_bytes * params_total + 16 * lora["base"] + act + GPU_OVERHEAD,
        serve_gpu_bytes=2 * total["base"] + kv * serve_tokens + GPU_OVERHEAD,
        serve_host_bytes={"bf16": 2 * total["routed"] + HOST_OVERHEAD,
                          "int8": total["routed"] + HOST_OVERHEAD},
        assumptions={"lora_rank": lora_rank, "seq_len": seq_len, "batch_size": batch_size,
                     "serve_tokens": serve_tokens, "hf_weight_bytes": hf_weight_bytes},
    )  # fmt: skip


def gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / (1 << 20):,.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def describe(name: str, r: Requirements) -> list[str]:
    """The report lines for one model."""
    a, serve = r.assumptions, r.serve_host_bytes
    return [
        f"Model     {name} ({r.model_type}): {_count(r.params_total)} params = {_count(r.params_routed)} "
        f"routed experts + {_count(r.params_non_expert)} other (+{_count(r.params_mtp)} MTP); "
        f"{_count(r.params_active)} active",
        f"          LoRA r={a['lora_rank']}: {r.lora_params_gpu / 1e6:,.1f}M params "
        f"(+{r.lora_params_experts / 1e6:,.1f}M on routed experts under KT); BF16 on disk "
        f"{gib(r.bf16_disk_bytes)}",
        f"          train (seq {a['seq_len']} x batch {a['batch_size']}): "
        f"KT host {gib(r.kt_train_host_bytes)} + GPU {gib(r.kt_train_gpu_bytes)}; "
        f"HF {gib(r.hf_train_bytes)} on one device",
        f"          serve (KT, KV for {a['serve_tokens']} tokens): GPU {gib(r.serve_gpu_bytes)}, "
        f"host {gib(serve['bf16'])} BF16 / {gib(serve['int8'])} INT8 experts",
    ]


def model_config_paths(config: dict[str, Any], results: Path) -> dict[str, Path]:
    """config.json of each configured model already on disk: fetched, a local dir, or the hub cache."""
    found: dict[str, Path] = {}
    for name, model in (config.get("models") or {}).items():
        fetched = results / "models" / name / "release" / "config.json"  # `ktflow fetch` output in the DAG
        if not isinstance(model, dict):
            continue
        if fetched.is_file():
            found[name] = fetched
        elif model.get("source") == "local" and model.get("path"):
            found[name] = Path(model["path"]) / "config.json"
        elif model.get("source") == "hf" and model.get("repo_id"):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model["repo_id"], "config.json", revision=model.get("revision"))
            if isinstance(cached, str):
                found[name] = Path(cached)
    return found


def read_model_config(path: Path) -> dict[str, Any]:
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise KtflowInputError(path, None, f"cannot read the model's config.json ({error})") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "config.json must be a JSON object")
    return data

"""``ktflow doctor``: preflight before any expensive step (host, versions, memory estimates, verdicts).

It answers, per training backend (hf, kt, unsloth), "can this run here?", from
what the host has (CPU ISA, NUMA, RAM, disk, GPUs, package versions and their
pins) and what the model needs (estimated from its config.json by
:func:`estimate_requirements`; the formulas are in its docstring).
"""

from __future__ import annotations

import abc
import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import Version

from ktflow import cpuinfo
from ktflow.atomic import write_json
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.provenance import recorded

GiB = 1 << 30
BACKENDS = ("hf", "kt", "kt-legacy", "unsloth")
KT_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
            "avx512_bf16", "avx2")  # fmt: skip
# kt-kernel 0.7.2 ships one CPU build per row and loads the first whose flags the host has
# (kt_kernel/_cpu_detect.py). Only the amx and avx512_bf16 builds export the *_SFT_MOE
# classes LoRA training needs (checked in the wheel's extensions); avx512_bf16 runs them
# without AMX tiles, slower.
KT_VARIANTS = (
    ("amx", ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi",
             "avx512_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx2", ("avx2",)),
)  # fmt: skip
KT_SFT_VARIANTS = ("amx", "avx512_bf16")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory", "kt-kernel",
            "ktransformers", "sglang", "sglang-kt", "accelerate-kt", "unsloth")  # fmt: skip
PINNED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# The integration packages whose pins on PINNED decide whether a backend starts at all.
PIN_OWNERS = ("llamafactory", "kt-kernel", "ktransformers", "sglang-kt", "accelerate-kt", "sglang", "unsloth")
# Pins of distributions that are usually absent here (docs: upstream.md, "Packages on the registry").
# Installed distributions are checked against their own metadata instead.
KNOWN_PINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llamafactory": ("0.9.5", ("transformers>=4.55.0,<=5.6.0", "peft>=0.18.0,<=0.18.1",
                               "trl>=0.18.0,<=0.24.0", "accelerate>=1.3.0,<=1.11.0")),
    "kt-kernel": ("0.7.2", ("torch==2.9.1",)),
    "sglang-kt": ("0.7.2", ("torch==2.9.1",)),
    "accelerate-kt": ("0.7.2", ("torch==2.9.1",)),
    "sglang": ("0.5.23", ("torch==2.14.1",)),
}  # fmt: skip


# ---------------------------------------------------------------- estimates from config.json
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


# ---------------------------------------------------------------- host
@dataclass
class GpuInfo:
    name: str
    memory_bytes: int


@dataclass
class PinCheck:
    owner: str
    owner_version: str | None  # None: owner not installed, pin taken from KNOWN_PINS
    requirement: str
    installed: str | None
    ok: bool


@dataclass
class HostReport:
    cpu_model: str
    flags: dict[str, bool]
    kt_variant: str | None  # the kt-kernel CPU build this host would load
    logical_cpus: int
    physical_cores: int | None
    numa_nodes: int
    ram_total: int
    ram_available: int
    disk_path: str
    disk_free: int
    gpus: list[GpuInfo]
    nvidia_smi: str | None
    glibc: str | None
    python: str
    torch: str | None
    torch_cuda: str | None
    packages: dict[str, str | None]
    pins: list[PinCheck] = field(default_factory=list)
    kt_probe: dict[str, Any] | None = None  # what an installed kt_kernel reports about itself


@dataclass
class Problem:
    backend: str
    severity: str  # "error": cannot run; "warning": runs, but read this
    message: str


def _has(flags: frozenset[str], flag: str) -> bool:
    # The kernel spells some AVX512 flags without the underscore (avx512vbmi).
    return flag in flags or flag.replace("_", "") in flags


def kt_variant(flags: frozenset[str]) -> str | None:
    return next((name for name, need in KT_VARIANTS if all(_has(flags, f) for f in need)), None)


def _numa_nodes() -> int:
    nodes = Path("/sys/devices/system/node")
    return max(1, sum(1 for p in nodes.glob("node[0-9]*"))) if nodes.is_dir() else 1


def _disk(path: Path) -> tuple[str, int]:
    probe = path.absolute()
    while not probe.exists():  # the results dir may not exist yet: measure where it will be
        probe = probe.parent
    return str(probe), shutil.disk_usage(probe).free


def _run(command: list[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _gpus() -> tuple[str | None, str | None, list[GpuInfo]]:
    try:
        import torch
    except ImportError:
        return None, None, []
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(props.name, int(props.total_memory)))
    return torch.__version__, torch.version.cuda, gpus


def _kt_probe() -> dict[str, Any]:
    """Import kt_kernel in a child process (a wrong CPU build can kill its importer) and ask it."""
    code = (
        "import json, kt_kernel; ext = kt_kernel.kt_kernel_ext; moe = getattr(ext, 'moe', None)\n"
        "print(json.dumps({'variant': getattr(kt_kernel, '__cpu_variant__', None),"
        " 'sft': hasattr(moe, 'AMXBF16_SFT_MOE')}))"
    )
    output = _run([sys.executable, "-c", code], timeout=120)
    if output is None:
        return {"error": "`import kt_kernel` failed in this interpreter"}
    parsed: dict[str, Any] = json.loads(output.splitlines()[-1])
    return parsed


def _pins(packages: dict[str, str | None]) -> list[PinCheck]:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {key: str(value) for key, value in default_environment().items()} | {"extra": ""}
    checks = []
    for owner in PIN_OWNERS:
        if packages.get(owner):
            raw = importlib.metadata.requires(owner) or []
        elif owner in KNOWN_PINS:
            raw = list(KNOWN_PINS[owner][1])
        else:
            continue
        for requirement in map(Requirement, raw):
            if requirement.name not in PINNED or (
                requirement.marker and not requirement.marker.evaluate(environment)
            ):
                continue
            installed = packages.get(requirement.name)
            ok = installed is not None and requirement.specifier.contains(installed, prereleases=True)
            checks.append(PinCheck(owner, packages.get(owner), str(requirement), installed, ok))
    return checks


def collect_host(results_dir: Path = Path("results")) -> HostReport:
    """Everything doctor reports about this machine and environment (no side effects)."""
    import psutil

    flags = cpuinfo.cpu_flags()
    torch_version, torch_cuda, gpus = _gpus()
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    memory = psutil.virtual_memory()
    disk_path, disk_free = _disk(results_dir)
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    # "glibc 2.36" where the C library is glibc
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    return HostReport(
        cpu_model=cpuinfo.cpu_model(),
        flags={flag: _has(flags, flag) for flag in KT_FLAGS},
        kt_variant=kt_variant(flags),
        logical_cpus=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        numa_nodes=_numa_nodes(),
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        disk_path=disk_path,
        disk_free=disk_free,
        gpus=gpus,
        nvidia_smi=smi,
        glibc=glibc.split()[-1] if glibc else None,
        python=platform.python_version(),
        torch=torch_version,
        torch_cuda=torch_cuda,
        packages=packages,
        pins=_pins(packages),
        kt_probe=_kt_probe() if packages.get("kt-kernel") else None,
    )


def _gb(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / (1 << 20):,.1f} MiB"


def _b(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


@dataclass(frozen=True)
class _Backend:
    label: str
    packages: tuple[str, ...]  # must be installed
    pin_owners: tuple[str, ...]  # whose pins on torch/transformers/... must hold
    gpu: str | None  # why a CUDA GPU is required; None: optional


_BACKENDS = {
    "hf": _Backend("HF", ("torch", "transformers", "peft", "trl", "llamafactory"), ("llamafactory",), None),
    "kt": _Backend("KT", ("torch", "llamafactory", "kt-kernel"), ("llamafactory", "kt-kernel"),
                   "KT trains the non-expert layers on a GPU"),
    "kt-legacy": _Backend("KT (legacy)", ("torch", "llamafactory", "ktransformers"),
                          ("llamafactory", "ktransformers"), "KT trains the non-expert layers on a GPU"),
    "unsloth": _Backend("Unsloth", ("torch", "unsloth"), ("unsloth",), "Unsloth trains on a GPU"),
}  # fmt: skip
# kt-kernel's CPU extension links no libtorch, so its torch pin is advisory (upstream.md).
_ADVISORY_PINS = ("kt-kernel", "accelerate-kt")


def _kt_cpu_problems(host: HostReport) -> list[Problem]:
    variant = host.kt_variant
    if variant not in KT_SFT_VARIANTS:
        lacking = ", ".join(f for f in KT_VARIANTS[1][1] if not host.flags.get(f))
        return [Problem("kt", "error", (
            f"CPU lacks AMX/AVX512-BF16 ({lacking} missing; kt-kernel would load its {variant or 'no'} "
            "build, which has no SFT kernels): KT LoRA needs avx512f+avx512bw+avx512_vnni+avx512_vbmi+"
            "avx512_bf16 at least, and AMX (amx_tile/amx_bf16/amx_int8) for the AMX BF16/INT8 kernels"
        ))]  # fmt: skip
    problems = []
    if variant != "amx":
        message = "no AMX: kt-kernel runs its AVX512-BF16 SFT kernels (slower than the AMX ones in the paper)"
        problems.append(Problem("kt", "warning", message))
    probe = host.kt_probe or {}
    if probe.get("error"):
        problems.append(Problem("kt", "error", str(probe["error"])))
    elif probe and not probe.get("sft"):
        problems.append(
            Problem("kt", "error", f"the installed kt_kernel ({probe.get('variant')}) has no SFT kernels")
        )
    return problems


def _kt_legacy_problems(host: HostReport) -> list[Problem]:
    problems = []
    if not all(host.flags.get(f) for f in (*cpuinfo.AMX_FLAGS, *cpuinfo.AVX512_FLAGS)):
        problems.append(Problem("kt-legacy", "error", (
            "CPU lacks AMX: the legacy KT SFT rules (<Model>-sft-amx.yaml) run AMX kernels "
            "(amx_tile/amx_bf16/amx_int8 with avx512f/avx512bw)"
        )))  # fmt: skip
    installed = host.packages.get("llamafactory")
    if installed and Version(installed) >= Version("0.9.5"):
        problems.append(Problem("kt-legacy", "error", (
            f"llamafactory {installed} rejects the legacy KT keys (use_kt + kt_optimize_rule need <= 0.9.4); "
            "use backend kt"
        )))  # fmt: skip
    return problems


def check_backend(host: HostReport, backend: str, requirements: Requirements | None) -> list[Problem]:
    """What stops (errors) or hampers (warnings) ``backend`` training this model on this host."""
    if backend not in _BACKENDS:
        raise KtflowInputError(None, "backend", f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    spec = _BACKENDS[backend]
    problems = [
        Problem(backend, "error", f"{n} is not installed") for n in spec.packages if not host.packages.get(n)
    ]
    for pin in host.pins:
        if pin.owner in spec.pin_owners and pin.owner_version and not pin.ok:
            severity = "warning" if pin.owner in _ADVISORY_PINS else "error"
            message = (
                f"{pin.owner} {pin.owner_version} wants {pin.requirement}, installed {pin.installed or '-'}"
            )
            problems.append(Problem(backend, severity, message))
    if backend == "kt":
        problems += _kt_cpu_problems(host)
    elif backend == "kt-legacy":
        problems += _kt_legacy_problems(host)
    if not host.gpus:
        if spec.gpu:
            problems.append(Problem(backend, "error", f"no CUDA GPU visible to torch ({spec.gpu})"))
        else:
            problems.append(
                Problem(backend, "warning", "no CUDA GPU: training runs on the CPU (tiny models only)")
            )
    if requirements is not None:
        problems += _memory_problems(host, backend, requirements)
    return problems


def _memory_problems(host: HostReport, backend: str, req: Requirements) -> list[Problem]:
    problems: list[Problem] = []

    def need(have: int, want: int, what: str, severity: str = "error") -> None:
        if want > have:
            message = f"{req.model_type}: {what} {_gb(want)} needed, {_gb(have)} here"
            problems.append(Problem(backend, severity, message))

    need(host.disk_free, req.bf16_disk_bytes, f"disk at {host.disk_path} for the BF16 cast:")
    per_gpu = max((g.memory_bytes for g in host.gpus), default=0)
    if backend in ("kt", "kt-legacy"):
        need(host.ram_available, req.kt_train_host_bytes, "host RAM (routed experts, BF16):")
        if host.gpus:
            need(sum(g.memory_bytes for g in host.gpus), req.kt_train_gpu_bytes, "GPU memory (all GPUs):")
    elif backend == "unsloth" and host.gpus:
        # Unsloth can load 4-bit weights and need less than this BF16 figure: a warning only.
        need(per_gpu, req.hf_train_bytes, "GPU memory for BF16 LoRA (per GPU):", "warning")
    elif backend == "hf":
        if host.gpus:
            need(per_gpu, req.hf_train_bytes, "GPU memory (per GPU):")
        else:
            need(host.ram_available, req.hf_train_bytes, "host RAM for CPU training:")
    return problems


def verdict(backend: str, problems: list[Problem]) -> str:
    label = _BACKENDS[backend].label
    errors = [p.message for p in problems if p.severity == "error"]
    warnings = sum(p.severity == "warning" for p in problems)
    if errors:
        return f"{label} backend: cannot run here: " + "; ".join(errors)
    return f"{label} backend: can run here" + (f" ({warnings} warning(s))" if warnings else "")


# ---------------------------------------------------------------- report and CLI
def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(host: HostReport, models: dict[str, Requirements], verdicts: dict[str, list[Problem]]) -> str:
    gpus = ", ".join(f"{g.name} ({_gb(g.memory_bytes)})" for g in host.gpus) or "none"
    pkgs = ", ".join(f"{name} {version or '-'}" for name, version in host.packages.items())
    lines = [
        f"CPU       {host.cpu_model}: {host.logical_cpus} logical CPUs, {host.physical_cores} cores, "
        f"{host.numa_nodes} NUMA node(s)",
        "ISA       " + ", ".join(f"{flag} {_yes(on)}" for flag, on in host.flags.items()),
        f"          kt-kernel CPU build for this host: {host.kt_variant or 'none'}"
        + (f"; installed kt_kernel reports {host.kt_probe}" if host.kt_probe else ""),
        f"Memory    {_gb(host.ram_total)} total, {_gb(host.ram_available)} available",
        f"Disk      {_gb(host.disk_free)} free at {host.disk_path}",
        f"GPUs      {gpus} (torch {host.torch or '-'}, CUDA {host.torch_cuda or '-'}; "
        f"nvidia-smi: {host.nvidia_smi or 'absent'})",
        f"System    glibc {host.glibc or '-'}, Python {host.python}",
        f"Packages  {pkgs}",
    ]
    for pin in host.pins:
        owner = f"{pin.owner} {pin.owner_version or KNOWN_PINS[pin.owner][0] + ' (not installed)'}"
        state = "ok" if pin.ok else ("CONFLICT" if pin.owner_version else "would conflict")
        lines.append(f"Pin       {owner} wants {pin.requirement}: installed {pin.installed or '-'}, {state}")
    for name, r in models.items():
        a, serve = r.assumptions, r.serve_host_bytes
        lines += [
            f"Model     {name} ({r.model_type}): {_b(r.params_total)} params = {_b(r.params_routed)} "
            f"routed experts + {_b(r.params_non_expert)} other (+{_b(r.params_mtp)} MTP); "
            f"{_b(r.params_active)} active",
            f"          LoRA r={a['lora_rank']}: {r.lora_params_gpu / 1e6:,.1f}M params "
            f"(+{r.lora_params_experts / 1e6:,.1f}M on routed experts under KT); BF16 on disk "
            f"{_gb(r.bf16_disk_bytes)}",
            f"          train (seq {a['seq_len']} x batch {a['batch_size']}): "
            f"KT host {_gb(r.kt_train_host_bytes)} + GPU {_gb(r.kt_train_gpu_bytes)}; "
            f"HF {_gb(r.hf_train_bytes)} on one device",
            f"          serve (KT, KV for {a['serve_tokens']} tokens): GPU {_gb(r.serve_gpu_bytes)}, "
            f"host {_gb(serve['bf16'])} BF16 / {_gb(serve['int8'])} INT8 experts",
        ]
    for backend, problems in verdicts.items():
        lines.append(verdict(backend, problems))
        lines += [f"  {p.severity}: {p.message}" for p in problems if p.severity == "warning"]
    return "\n".join(lines)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise KtflowInputError(path, None, f"cannot read the workflow config ({error})") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "the workflow config must be a mapping")
    return data


def _model_config_paths(config: dict[str, Any], results: Path) -> dict[str, Path]:
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


def _read_model_config(path: Path) -> dict[str, Any]:
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise KtflowInputError(path, None, f"cannot read the model's config.json ({error})") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "config.json must be a JSON object")
    return data


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="workflow config (results dir, models, training)")
    parser.add_argument(
        "--model-config", type=Path, action="append", default=[], metavar="PATH",
        help="a model's config.json (or its directory) to estimate; repeatable",
    )  # fmt: skip
    parser.add_argument("--backend", choices=BACKENDS, help="fail (exit 3) unless this backend can run here")
    parser.add_argument("--results-dir", type=Path, help="where outputs go (disk check; default: results)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank for the estimates (default 8 / config)")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per sequence for estimates (default 512 / config)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")


def main(args: argparse.Namespace) -> int:
    config = _load_yaml(args.config) if args.config else {}
    training = config.get("training") or {}
    requested = args.backend or training.get("backend")
    if requested not in (None, *BACKENDS):
        raise KtflowInputError(args.config, "training.backend", f"unknown backend {requested!r}")
    results = args.results_dir or Path(config.get("results") or "results")
    sources = _model_config_paths(config, results)
    sources.update({str(p): p for p in args.model_config})
    settings = {
        "lora_rank": args.lora_rank or (training.get("lora") or {}).get("rank") or 8,
        "seq_len": args.seq_len or training.get("cutoff_len") or 512,
        "batch_size": training.get("batch_size") or 1,
        "hf_weight_bytes": 4 if training.get("bf16") is False else 2,
    }
    models = {
        name: estimate_requirements(_read_model_config(path), source=path, **settings)
        for name, path in sources.items()
    }
    host = collect_host(results)
    targets: list[Requirements | None] = [*models.values()] or [None]
    verdicts = {b: [p for r in targets for p in check_backend(host, b, r)] for b in BACKENDS}
    print(render(host, models, verdicts))
    if args.json:
        report = {
            "host": asdict(host),
            "models": {name: asdict(r) for name, r in models.items()},
            "backends": {b: {"ok": not any(p.severity == "error" for p in ps), "verdict": verdict(b, ps),
                             "problems": [asdict(p) for p in ps]} for b, ps in verdicts.items()},
            "requested": requested,
        }  # fmt: skip
        inputs: list[str | Path] = [p for p in sources.values() if p.is_file()]
        with recorded(f"{args.json}.provenance.json", "doctor", {"backend": requested, **settings}, inputs):
            write_json(args.json, report)
    if requested and any(p.severity == "error" for p in verdicts[requested]):
        raise HardwareError(verdict(requested, verdicts[requested]))
    return 0

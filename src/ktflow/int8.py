"""``ktflow convert-int8``: BF16 routed experts -> KT's CPU INT8 layout for sglang-kt ``--kt-weight-path``.

The quantization (symmetric per output row, packed for the AMX kernels) runs in
kt_kernel's compiled extension, which only KT can produce in the layout its
server reads; ktflow drives it, one MoE layer at a time, and checks the result.
Output: safetensors shards holding ``blk.{L}.ffn_{gate,up,down}_exps.{E}.numa.{n}.{weight,scale}``
(int8 / float32), ``ktflow_int8.json`` (the server flags to use) and provenance.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from ktflow.adapters import read_json_object, safetensors_headers
from ktflow.atomic import atomic_dir, write_json
from ktflow.cpuinfo import AMX_FLAGS, AVX512_FLAGS, cpu_flags, cpu_model, missing_flags
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.provenance import PROVENANCE_NAME, recorded

log = logging.getLogger(__name__)

KT_METHOD = "AMXINT8"
REQUIRED_FLAGS = (*AVX512_FLAGS, *AMX_FLAGS)
RECORD_NAME = "ktflow_int8.json"
SCRIPT_NAME = "convert_cpu_weights.py"
PROJECTIONS = ("gate", "up", "down")
_EXPERT_KEY = re.compile(
    r"^(?:language_model\.)?model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"
)
# kt_kernel's cpu_save files: <weight_path>/_layer_{L}/_numa_{n}/INT8_{proj}_{E}_{n}Byte_{quant,scale}_.kt
_KT_FILE = re.compile(r"^[A-Z0-9]+_(gate|up|down)_(\d+)_\d+Byte_(quant|scale)_\.kt$")


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


@dataclasses.dataclass(frozen=True)
class Int8Report:
    out_dir: Path
    implementation: str
    kt_method: str
    layers: tuple[int, ...]
    num_experts: int
    threadpool_count: int
    shards: tuple[str, ...]


def check_hardware(flags: frozenset[str] | None = None) -> None:
    """Raise HardwareError unless the CPU has what KT's AMXINT8 quantizer needs."""
    missing = missing_flags(REQUIRED_FLAGS, cpu_flags() if flags is None else flags)
    if missing:
        raise HardwareError(
            f"convert-int8 needs an x86 CPU with AMX ({', '.join(AMX_FLAGS)}) and {' + '.join(AVX512_FLAGS)} "
            f"(Xeon Sapphire Rapids or newer) to produce {KT_METHOD} weights; this host ({cpu_model()}) "
            f"lacks {', '.join(missing)}. Run the step on the AMX host, or leave the optional INT8 step off."
        )


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
        for key, (shape, dtype) in safetensors_headers(shard).items():
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
        found.update((key, dtype) for key, (_shape, dtype) in safetensors_headers(shard).items())
    for key in expected_keys(checkpoint.layers, checkpoint.num_experts, pools):
        want = "I8" if key.endswith(".weight") else "F32"
        if found.get(key) != want:
            raise RuntimeError(
                f"KT's converter left {out} incomplete: {key} is {found.get(key)}, want {want}"
            )
    return [shard.name for shard in shards]


class Int8Backend(Protocol):
    name: str

    def convert(self, checkpoint: MoeCheckpoint, out: Path, threads: int, pools: int) -> dict[str, Any]:
        """Write the INT8 shards into ``out``; return facts for ktflow_int8.json."""
        ...


class KtKernelBackend:
    """kt_kernel's own API: ``KTMoEWrapper(method="AMXINT8", cpu_save=True)`` per layer."""

    name = "kt_kernel"

    def __init__(self, kt_kernel: ModuleType) -> None:
        import torch

        try:  # the wrapper pins host memory: fail here, not after a layer of work
            torch.empty(1, pin_memory=True)
        except RuntimeError as error:
            raise HardwareError(
                f"kt_kernel's KTMoEWrapper pins host memory, which needs a CUDA build of torch and a "
                f"visible GPU; torch {torch.__version__} here says: {error}"
            ) from None
        self.kt = kt_kernel

    def convert(self, checkpoint: MoeCheckpoint, out: Path, threads: int, pools: int) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        scratch = out / ".kt-scratch"  # weight_path must hold no *.safetensors, or the wrapper loads them
        scratch.mkdir()
        for layer in checkpoint.layers:
            gate, up, down = _stack_layer(checkpoint, layer)
            wrapper = self.kt.KTMoEWrapper(
                layer_idx=layer,
                num_experts=checkpoint.num_experts,
                num_experts_per_tok=checkpoint.top_k,
                hidden_size=checkpoint.hidden_size,
                moe_intermediate_size=checkpoint.intermediate_size,
                gpu_experts_mask=None,  # all experts quantized for the CPU
                cpuinfer_threads=threads,
                threadpool_count=pools,
                weight_path=str(scratch),
                chunked_prefill_size=512,  # sizes forward buffers only; conversion runs no forward
                cpu_save=True,
                method=KT_METHOD,
            )
            experts_in_order = torch.arange(checkpoint.num_experts, dtype=torch.int64)  # physical -> logical
            wrapper.load_weights_from_tensors(gate, up, down, experts_in_order)
            del wrapper, gate, up, down
            tensors = _collect_layer(scratch / f"_layer_{layer}", layer, checkpoint.num_experts, pools)
            save_file(tensors, str(out / f"int8-experts-layer{layer:03d}.safetensors"))
            shutil.rmtree(scratch / f"_layer_{layer}")
            log.info("layer %d: %d int8 tensors", layer, len(tensors))
        shutil.rmtree(scratch)
        return {
            "kt_kernel_version": _version("kt-kernel"),
            "cpu_variant": getattr(self.kt, "__cpu_variant__", None),
            "int8_weight_layout": getattr(self.kt, "__int8_weight_layout__", None),
        }


class KtCheckoutBackend:
    """Upstream's ``kt-kernel/scripts/convert_cpu_weights.py`` from a ktransformers checkout."""

    name = "kt_checkout"

    def __init__(self, checkout: Path) -> None:
        candidates = (
            checkout,
            checkout / "scripts" / SCRIPT_NAME,
            checkout / "kt-kernel/scripts" / SCRIPT_NAME,
        )
        script = next((c for c in candidates if c.is_file() and c.name == SCRIPT_NAME), None)
        if script is None:
            raise KtflowInputError(
                checkout, "--kt-checkout", f"no {SCRIPT_NAME} at scripts/ or kt-kernel/scripts/"
            )
        self.script = script

    def convert(self, checkpoint: MoeCheckpoint, out: Path, threads: int, pools: int) -> dict[str, Any]:
        # fmt: off
        command = [
            sys.executable, str(self.script), "--input-path", str(checkpoint.model_dir),
            "--input-type", "bf16", "--output", str(out), "--quant-method", "int8",
            "--cpuinfer-threads", str(threads), "--threadpool-count", str(pools),
        ]
        # fmt: on
        log.info("running %s", " ".join(command))
        if subprocess.run(command, cwd=self.script.parent, check=False).returncode != 0:
            raise RuntimeError(f"{self.script} failed (see its output above)")
        return {"script": str(self.script)}


def _stack_layer(checkpoint: MoeCheckpoint, layer: int) -> list[Any]:
    """[E, I, H] gate and up, [E, H, I] down, BF16, filled in place (no list-then-stack 2x peak)."""
    import torch
    from safetensors import safe_open

    num, hidden, inter = checkpoint.num_experts, checkpoint.hidden_size, checkpoint.intermediate_size
    shapes = {"gate": (num, inter, hidden), "up": (num, inter, hidden), "down": (num, hidden, inter)}
    stacked = {proj: torch.empty(shape, dtype=torch.bfloat16) for proj, shape in shapes.items()}
    by_file: dict[Path, list[tuple[int, str, str]]] = {}
    for (expert, proj), (shard, key) in checkpoint.experts[layer].items():
        by_file.setdefault(shard, []).append((expert, proj, key))
    for shard, entries in by_file.items():
        with safe_open(str(shard), framework="pt") as handle:
            for expert, proj, key in entries:
                stacked[proj][expert].copy_(handle.get_tensor(key))
    return [stacked[proj] for proj in PROJECTIONS]


def _collect_layer(layer_dir: Path, layer: int, num_experts: int, pools: int) -> dict[str, Any]:
    """Read the per-expert .kt files the extension wrote into one flat tensor dict."""
    import numpy as np
    import torch

    pool_dirs = {f"_numa_{numa}" for numa in range(pools)}
    if stray := sorted(p.name for p in layer_dir.glob("_numa_*") if p.name not in pool_dirs):
        # kt_kernel's thread pool is a process-wide singleton: an earlier call may have set another count
        raise RuntimeError(f"{layer_dir}: {stray} beyond --threadpool-count {pools}")
    tensors: dict[str, Any] = {}
    for numa in range(pools):
        for path in sorted((layer_dir / f"_numa_{numa}").glob("*.kt")):
            match = _KT_FILE.match(path.name)
            if match is None:
                continue
            proj, expert, kind = match.groups()
            part, dtype = ("weight", np.int8) if kind == "quant" else ("scale", np.float32)
            key = f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{numa}.{part}"
            if key in tensors:
                raise RuntimeError(f"{layer_dir}: two files for {key}")
            tensors[key] = torch.from_numpy(np.fromfile(path, dtype=dtype))
    missing = set(expected_keys([layer], num_experts, pools)) - set(tensors)
    if missing:
        raise RuntimeError(
            f"{layer_dir}: kt_kernel wrote no file for {sorted(missing)[:3]} ({len(missing)} missing)"
        )
    return tensors


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_backend(kt_checkout: Path | None) -> Int8Backend:
    """kt_kernel's API when it imports; else the checkout's script; else one clear error."""
    try:
        kt_kernel = importlib.import_module("kt_kernel")
    except Exception as error:  # ImportError, or OSError from the compiled extension
        if kt_checkout is None:
            raise KtflowInputError(
                None,
                "--kt-checkout",
                f"kt_kernel is not importable ({type(error).__name__}: {error}) and no "
                "--kt-checkout was given: install kt-kernel==0.7.2 or pass a ktransformers checkout",
            ) from None
        log.info("kt_kernel not importable (%s); using %s", error, kt_checkout)
        return KtCheckoutBackend(kt_checkout)
    if kt_checkout is not None:
        log.info("kt_kernel is importable; using its API and ignoring --kt-checkout %s", kt_checkout)
    return KtKernelBackend(kt_kernel)


def _numa_nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def convert_int8(
    model_dir: Path,
    out_dir: Path,
    kt_checkout: Path | None = None,
    threads: int | None = None,
    threadpool_count: int | None = None,
    flags: frozenset[str] | None = None,
) -> Int8Report:
    """Quantize every routed expert of a BF16 checkpoint to KT's AMXINT8 layout, atomically."""
    check_hardware(flags)
    checkpoint = read_checkpoint(Path(model_dir))
    threads = len(os.sched_getaffinity(0)) if threads is None else threads
    pools = _numa_nodes() if threadpool_count is None else threadpool_count
    if not 1 <= pools <= threads:  # KT splits the threads over the pools
        raise KtflowInputError(None, "--threadpool-count", f"need 1 <= {pools} <= --threads {threads}")
    backend = resolve_backend(kt_checkout)
    settings = {"threads": threads, "threadpool_count": pools, "implementation": backend.name}
    with (
        atomic_dir(out_dir) as tmp,
        recorded(tmp / PROVENANCE_NAME, "convert-int8", settings, [model_dir]) as extra,
    ):
        facts = backend.convert(checkpoint, tmp, threads, pools)
        shards = verify_layout(tmp, checkpoint, pools)
        shutil.copy2(checkpoint.model_dir / "config.json", tmp / "config.json")
        weight_path, pool_args = str(Path(out_dir).resolve()), ["--kt-threadpool-count", str(pools)]
        record = {
            "kt_method": KT_METHOD,
            "kt_weight_path": weight_path,
            "kt_threadpool_count": pools,
            "sglang_args": ["--kt-weight-path", weight_path, "--kt-method", KT_METHOD, *pool_args],
            "source_model": str(checkpoint.model_dir.resolve()),
            "moe_layers": checkpoint.layers,
            "num_experts": checkpoint.num_experts,
            "hidden_size": checkpoint.hidden_size,
            "moe_intermediate_size": checkpoint.intermediate_size,
            "implementation": backend.name,
            "shards": shards,
            **facts,
        }
        write_json(tmp / RECORD_NAME, record)
        extra.update(record)
    layers = tuple(checkpoint.layers)
    return Int8Report(
        Path(out_dir), backend.name, KT_METHOD, layers, checkpoint.num_experts, pools, tuple(shards)
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="BF16 checkpoint (the output of `ktflow cast`)")
    parser.add_argument("out_dir", type=Path, help="directory to pass to sglang-kt as --kt-weight-path")
    parser.add_argument(
        "--kt-checkout",
        type=Path,
        default=None,
        help="ktransformers checkout whose kt-kernel/scripts/convert_cpu_weights.py to run "
        "when the kt_kernel package is not importable",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    parser.add_argument(
        "--threadpool-count",
        type=int,
        default=None,
        help="KT NUMA sub-pools; the server must use the same (default: NUMA nodes)",
    )


def main(args: argparse.Namespace) -> int:
    report = convert_int8(args.model_dir, args.out_dir, args.kt_checkout, args.threads, args.threadpool_count)
    print(json.dumps({**dataclasses.asdict(report), "out_dir": str(report.out_dir)}, indent=2))
    return 0

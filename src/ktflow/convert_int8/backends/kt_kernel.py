"""kt_kernel's own API: the quantizer in its compiled extension, driven one MoE layer at a time."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from ktflow.convert_int8.backends.base import BackendUnavailable, Int8Backend
from ktflow.convert_int8.checkpoint import KT_METHOD, PROJECTIONS, MoeCheckpoint, expected_keys
from ktflow.errors import HardwareError

log = logging.getLogger(__name__)

# kt_kernel's cpu_save files: <weight_path>/_layer_{L}/_numa_{n}/INT8_{proj}_{E}_{n}Byte_{quant,scale}_.kt
_KT_FILE = re.compile(r"^[A-Z0-9]+_(gate|up|down)_(\d+)_\d+Byte_(quant|scale)_\.kt$")


class KtKernelBackend(Int8Backend):
    """kt_kernel's own API: ``KTMoEWrapper(method="AMXINT8", cpu_save=True)`` per layer."""

    name = "kt_kernel"
    remedy = "install kt-kernel==0.7.2"

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

    @classmethod
    def found(cls, kt_checkout: Path | None) -> Int8Backend:
        try:
            kt_kernel = importlib.import_module("kt_kernel")
        except Exception as error:  # ImportError, or OSError from the compiled extension
            raise BackendUnavailable(
                f"kt_kernel is not importable ({type(error).__name__}: {error})"
            ) from None
        if kt_checkout is not None:
            log.info("kt_kernel is importable; using its API and ignoring --kt-checkout %s", kt_checkout)
        return cls(kt_kernel)

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

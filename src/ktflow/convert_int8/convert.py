"""The backend-blind driver: check the host and checkpoint, run a backend, verify, record the flags."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from ktflow.atomic import atomic_dir, write_json
from ktflow.convert_int8 import RECORD_NAME
from ktflow.convert_int8.backends import resolve_backend
from ktflow.convert_int8.checkpoint import KT_METHOD, read_checkpoint, verify_layout
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.host.cpu import AMX_FLAGS, AVX512_FLAGS, cpu_flags, cpu_model, missing_flags
from ktflow.host.numa import numa_nodes
from ktflow.provenance import PROVENANCE_NAME, recorded

log = logging.getLogger(__name__)

REQUIRED_FLAGS = (*AVX512_FLAGS, *AMX_FLAGS)


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
    pools = numa_nodes() if threadpool_count is None else threadpool_count
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

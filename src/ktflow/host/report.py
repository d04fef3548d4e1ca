"""One report of this machine and the Python environment a step will run in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktflow.host.cpu import cpu_flags, cpu_model, has_flag
from ktflow.host.kt_kernel import KT_FLAGS, kt_probe, kt_variant
from ktflow.host.numa import numa_nodes
from ktflow.host.packages import PACKAGES, PinCheck, check_pins
from ktflow.host.python_env import EnvReport, inspect_env
from ktflow.host.system import free_disk, glibc_version, memory, nvidia_smi, physical_cores


@dataclass
class GpuInfo:
    name: str
    memory_bytes: int


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
    executable: str = ""  # the environment's interpreter (packages, GPUs: as it sees them)
    ktflow: bool = True  # whether that interpreter can import ktflow (its launcher runs there)


def collect_host(results_dir: Path = Path("results"), env: EnvReport | None = None) -> HostReport:
    """This machine, and the Python environment ``env`` (default: this interpreter's)."""
    env = env or inspect_env(None, PACKAGES)
    flags = cpu_flags()
    ram_total, ram_available = memory()
    disk_path, disk_free = free_disk(results_dir)
    return HostReport(
        cpu_model=cpu_model(),
        flags={flag: has_flag(flags, flag) for flag in KT_FLAGS},
        kt_variant=kt_variant(flags),
        logical_cpus=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        numa_nodes=numa_nodes(),
        ram_total=ram_total,
        ram_available=ram_available,
        disk_path=disk_path,
        disk_free=disk_free,
        gpus=[GpuInfo(name, size) for name, size in env.gpus],
        nvidia_smi=nvidia_smi(),
        glibc=glibc_version(),
        python=env.python,
        torch=env.torch,
        torch_cuda=env.torch_cuda,
        packages=env.packages,
        pins=check_pins(env),
        kt_probe=kt_probe(env.executable) if env.packages.get("kt-kernel") else None,
        executable=env.executable,
        ktflow=env.ktflow,
    )

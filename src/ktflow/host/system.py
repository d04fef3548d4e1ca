"""Memory, disk, the C library and the NVIDIA driver's view of the GPUs."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def run_quiet(command: list[str], timeout: float = 30) -> str | None:
    """``command``'s stripped stdout; None if it cannot start, times out or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def free_disk(path: Path) -> tuple[str, int]:
    """(the nearest existing directory of ``path``, its free bytes)."""
    probe = path.absolute()
    while not probe.exists():  # the results dir may not exist yet: measure where it will be
        probe = probe.parent
    return str(probe), shutil.disk_usage(probe).free


def memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    import psutil

    usage = psutil.virtual_memory()
    return int(usage.total), int(usage.available)


def physical_cores() -> int | None:
    import psutil

    cores: int | None = psutil.cpu_count(logical=False)
    return cores


def nvidia_smi() -> str | None:
    """The driver's GPU list (name, memory, driver version), or None without nvidia-smi."""
    return run_quiet(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])


def glibc_version() -> str | None:
    # "glibc 2.36" where the C library is glibc
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    return glibc.split()[-1] if glibc else platform.libc_ver()[1] or None

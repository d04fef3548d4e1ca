"""CPU feature flags from /proc/cpuinfo, for hardware preflight checks (Linux x86)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
AVX512_FLAGS = ("avx512f", "avx512bw")
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def _read(text: str | None) -> str:
    if text is not None:
        return text
    with contextlib.suppress(OSError):
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    return ""


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """Flags every listed core has (``text`` defaults to /proc/cpuinfo; empty if unreadable).

    The intersection, not the first core's list, because a hybrid CPU or an odd
    hypervisor can expose a flag on some cores only, and a kernel scheduled on
    the others would fault.
    """
    common: set[str] | None = None
    for line in _read(text).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags = set(value.split())
            common = flags if common is None else common & flags
    return frozenset(common or ())


def cpu_model(text: str | None = None) -> str:
    for line in _read(text).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return "unknown CPU"


def has_flag(flags: frozenset[str], flag: str) -> bool:
    # The kernel spells some AVX512 flags without the underscore (avx512vbmi).
    return flag in flags or flag.replace("_", "") in flags


def missing_flags(required: Iterable[str], flags: frozenset[str] | None = None) -> list[str]:
    have = cpu_flags() if flags is None else flags
    return [flag for flag in required if flag not in have]


def has_avx512(flags: frozenset[str] | None = None) -> bool:
    """AVX512F + AVX512BW: the floor for KT's AVX512 and AMX kernels."""
    return not missing_flags(AVX512_FLAGS, flags)


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """AMX tile + INT8 + BF16 units (Sapphire Rapids and later)."""
    return not missing_flags(AMX_FLAGS, flags)

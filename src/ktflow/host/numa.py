"""NUMA node count, from sysfs (Linux)."""

from __future__ import annotations

from pathlib import Path

NODES = Path("/sys/devices/system/node")


def numa_nodes(nodes: Path = NODES) -> int:
    """NUMA nodes the kernel lists; 1 where sysfs has none (not Linux, or no NUMA)."""
    return max(1, sum(1 for p in nodes.glob("node[0-9]*"))) if nodes.is_dir() else 1

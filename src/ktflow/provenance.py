"""Provenance records: what a step was given, what ran it, and how long it took."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ktflow import __version__
from ktflow.atomic import sha256_file, write_json

PROVENANCE_NAME = "provenance.json"
# Hashing a 700 GB checkpoint would cost more than casting it; big files get a
# fingerprint (size + head/tail hash) that is labelled as such.
FULL_HASH_LIMIT = 64 << 20
_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "llamafactory",
    "safetensors",
    "tokenizers",
    "snakemake",
    "kt-kernel",
    "ktransformers",
    "sglang",
    "nltk",
    "rouge-chinese",
    "jieba",
    "huggingface-hub",
    "numpy",
)


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def file_identity(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return {"size": size, "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(-(1 << 20), os.SEEK_END)
        digest.update(handle.read(1 << 20))
    return {"size": size, "fingerprint_sha256_head_tail_1MiB": digest.hexdigest()}


def input_identities(paths: list[str | Path]) -> dict[str, Any]:
    """Identity of every file under the given paths (directories are walked, provenance skipped)."""
    found: dict[str, Any] = {}
    for raw in paths:
        root = Path(raw)
        if root.is_file():
            found[str(root)] = file_identity(root)
        elif root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                if path.name != PROVENANCE_NAME and not path.name.startswith("."):
                    found[str(path)] = file_identity(path)
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def recorded(
    out: str | Path,
    step: str,
    config: dict[str, Any],
    inputs: list[str | Path],
) -> Iterator[dict[str, Any]]:
    """Time a step and write its provenance to ``out`` (a file path) when it succeeds.

    The yielded dict collects step-specific facts (throughput, counts) into ``extra``.
    """
    extra: dict[str, Any] = {}
    started, start_clock = _now(), time.perf_counter()
    identities = input_identities(inputs)
    yield extra
    write_json(
        out,
        {
            "step": step,
            "ktflow_version": __version__,
            "config": config,
            "inputs": identities,
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "host": {"name": socket.gethostname(), "machine": platform.machine(), "cpus": os.cpu_count()},
            "started": started,
            "ended": _now(),
            "seconds": round(time.perf_counter() - start_clock, 3),
            "extra": extra,
        },
    )

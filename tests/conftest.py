"""Shared fixtures: the tiny release and its BF16 cast are built once per session."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---- safetensors layouts the library refuses (issue 13 item 2), shared by the header tests ----
Layout = tuple[dict[str, Any], bytes]  # a shard's JSON header and its data section


def rewrite_layout(path: Path, change: Callable[[dict[str, Any], bytes], Layout]) -> None:
    """Rewrite a shard's JSON header and data section by hand (save_file would refuse the result)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, body = change(json.loads(data[8 : 8 + length]), data[8 + length :])
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def alias_tensor(header: dict[str, Any], body: bytes, name: str, onto: str) -> Layout:
    """``name`` points at ``onto``'s bytes and its own are dropped: the data still ends at the file end."""
    start, end = header[name]["data_offsets"]
    for entry in header.values():
        if "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [offset - (end - start) for offset in entry["data_offsets"]]
    header[name]["data_offsets"] = header[onto]["data_offsets"]
    return header, body[:start] + body[end:]


# ---- end of the issue 13 item 2 block ----


def ktflow_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, ktflow importable."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_ktflow(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ktflow", *args],
        capture_output=True,
        text=True,
        env=ktflow_env(**env),
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"ktflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The repository's workflow on ``workdir``'s config.yaml, 2 cores."""
    return [
        str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", str(workdir / "config.yaml"),
        "--cores", "2", *args,
    ]  # fmt: skip


def snakemake(workdir: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """A real Snakemake run of the repository's workflow in ``workdir``; ``env`` adds variables."""
    result = subprocess.run(
        snakemake_command(workdir, *args),
        cwd=workdir,
        capture_output=True,
        text=True,
        env=ktflow_env(**env),
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run of the default pipeline, shared by the tests that read its results.

    With ``--cache``, so that the long steps' artifacts are also in its between-workflow
    cache (``results/.cache/artifacts``): tests/test_reruns.py returns to this config.
    """
    workdir = tmp_path_factory.mktemp("workflow")
    shutil.copy(REPO / "config" / "config.yaml", workdir / "config.yaml")
    snakemake(workdir, "--cache")
    return workdir


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ktflow.tiny.model import build_release

    out = tmp_path_factory.mktemp("tiny") / "release"
    build_release(out, seed=0, vocab_size=1024, n_shards=4)
    return out


@pytest.fixture(scope="session")
def tiny_bf16(tiny_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ktflow.cast import cast_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "bf16"
    cast_checkpoint(tiny_release, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ktflow.tiny.tasks import write_task

    root = tmp_path_factory.mktemp("tasks")
    write_task("style", root / "style", seed=42, n_train=64, n_test=12)
    write_task("choice", root / "choice", seed=42, n_train=64, n_test=12)
    return root


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with a copy of the default config, for real Snakemake runs."""
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    return tmp_path

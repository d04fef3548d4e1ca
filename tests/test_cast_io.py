"""The cast's disk behaviour (issue 16): early writeback and the prefetch during start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.synthetic_checkpoints import write_fp8_release

import ktflow.cast.shards as shards
from ktflow.cast import cast_checkpoint
from ktflow.cast.shards import file_checksum


def test_cast_cli_starts_without_torch() -> None:
    """Neither the CLI module nor the shared header reader (also ``ktflow fetch``'s) imports torch."""
    probe = "import sys, ktflow.steps.cast, ktflow.fetch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def test_a_whole_cast_never_imports_torch(tmp_path: Path) -> None:
    """Start-up is what separated a small cast from the I/O floor (issue 16): the cast, its value
    verification and the CLI run on numpy alone."""
    src = write_fp8_release(tmp_path / "src", shard_bytes=1 << 18)
    probe = (
        "import sys; from pathlib import Path; from ktflow.cli import main; "
        f"main(['cast', {str(src)!r}, {str(tmp_path / 'dst')!r}, '--no-progress', '--workers', '2']); "
        f"main(['cast', '--verify', {str(tmp_path / 'dst')!r}]); "
        "sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_early_writeback_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_fp8_release(tmp_path / "src", shard_bytes=1 << 18)
    cast_checkpoint(src, tmp_path / "plain", progress=False)
    monkeypatch.setattr(shards, "WRITEBACK_WINDOW", 4096)  # hand off every page
    cast_checkpoint(src, tmp_path / "handed-off", workers=2, progress=False)
    files = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert files
    for name in files:
        assert file_checksum(tmp_path / "plain" / name) == file_checksum(tmp_path / "handed-off" / name)


def test_prefetch_tolerates_a_missing_source(tmp_path: Path) -> None:
    shards.prefetch(tmp_path / "absent")  # the cast then reports the missing source itself

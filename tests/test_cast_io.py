"""The cast's disk behaviour (issue 16): early writeback and the prefetch during start-up."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from support.synthetic_checkpoints import write_fp8_release

import ktflow.cast.shards as shards
from ktflow.cast import cast_checkpoint, output_file
from ktflow.cast.shards import Entry, ShardWriter, file_checksum


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


def test_direct_and_page_cache_outputs_write_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cast writes straight to the disk (O_DIRECT) where it can; small buffers make every shard
    cross many buffer hand-offs and end in a partial block, the page-cache path hands off every page."""
    src = write_fp8_release(tmp_path / "src", shard_bytes=1 << 18)
    monkeypatch.setattr(output_file, "DIRECT_BUFFER", 3 * output_file.DIRECT_ALIGN)
    cast_checkpoint(src, tmp_path / "direct", workers=2, progress=False)
    with monkeypatch.context() as page_cache:
        page_cache.delattr(os, "O_DIRECT")
        page_cache.setattr(output_file, "WRITEBACK_WINDOW", 4096)
        cast_checkpoint(src, tmp_path / "page-cache", workers=2, progress=False)
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert files
    for name in files:
        assert file_checksum(tmp_path / "direct" / name) == file_checksum(tmp_path / "page-cache" / name)


@pytest.mark.parametrize("durable", [True, False])
def test_output_file_writes_any_sizes_in_order(tmp_path: Path, durable: bool) -> None:
    expected = bytearray()
    out = output_file.open_output(tmp_path / "f", durable)
    if getattr(os, "O_DIRECT", 0) and file_system_takes_o_direct(tmp_path):
        assert isinstance(out, output_file.DirectFile)
    rng = random.Random(7)
    for _ in range(60):  # pieces from 1 byte to 1.5 buffers: unaligned everywhere
        piece = rng.randbytes(rng.randint(1, output_file.DIRECT_BUFFER * 3 // 2))
        room = out.reserve(len(piece)) if rng.random() < 0.5 else None
        if room is None:
            out.write(memoryview(piece))
        else:  # a kernel computing its chunk in the file's own buffer
            room[: len(piece)] = piece
            out.commit(len(piece))
        expected += piece
    out.finish()
    assert (tmp_path / "f").read_bytes() == bytes(expected)


def test_o_direct_refused_at_open_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some FUSE and network file systems refuse O_DIRECT with EINVAL (injected: every local file
    system here takes it)."""
    real_open = os.open

    def refusing_open(path: Path, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(output_file.os, "open", refusing_open)
    out = output_file.open_output(tmp_path / "f", True)
    assert isinstance(out, output_file.PageCacheFile)
    out.write(memoryview(b"abc"))
    out.finish()
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_o_direct_refused_at_the_first_write_goes_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, refused = os.write, []

    def refusing_write(handle: int, data: memoryview) -> int:
        if fcntl.fcntl(handle, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(handle, data)

    monkeypatch.setattr(output_file.os, "write", refusing_write)
    payload = write_two_buffers_direct(tmp_path / "f", seed=3)
    assert refused == [output_file.DIRECT_BUFFER]  # once, then never asked again
    assert (tmp_path / "f").read_bytes() == payload


def test_a_short_direct_write_goes_on_from_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short O_DIRECT write (injected: 1000 bytes) leaves the file offset unaligned; the next direct
    write is then refused by the file system itself, and the rest must follow the 1000 bytes once."""
    real_write, shortened = os.write, []

    def short_once(handle: int, data: memoryview) -> int:
        flags = fcntl.fcntl(handle, fcntl.F_GETFL)
        if flags & os.O_DIRECT and not shortened:
            shortened.append(True)
            fcntl.fcntl(handle, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            try:
                return real_write(handle, data[:1000])
            finally:
                fcntl.fcntl(handle, fcntl.F_SETFL, flags)
        return real_write(handle, data)

    monkeypatch.setattr(output_file.os, "write", short_once)
    payload = write_two_buffers_direct(tmp_path / "f", seed=5)
    assert shortened
    assert (tmp_path / "f").read_bytes() == payload


def write_two_buffers_direct(path: Path, seed: int) -> bytes:
    """Two buffers and 5 bytes of random data through a DirectFile (durable); returns the data."""
    payload = random.Random(seed).randbytes(output_file.DIRECT_BUFFER * 2 + 5)
    out = output_file.open_output(path, True)
    if not isinstance(out, output_file.DirectFile):
        out.abort()
        pytest.skip("this file system refuses O_DIRECT at open")
    out.write(memoryview(payload))
    out.finish()
    return payload


def test_a_commit_needs_a_reserve(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "s.safetensors", [Entry("w", "BF16", (2,))]) as writer:
        with pytest.raises(RuntimeError, match="without room reserved"):
            writer.commit(4)
        writer.write(memoryview(bytes(4)))
    assert (tmp_path / "s.safetensors").stat().st_size == writer.size


def test_a_failed_shard_leaves_no_file(tmp_path: Path) -> None:
    entries = [Entry("w", "BF16", (4096,))]
    with pytest.raises(RuntimeError, match="planned"), ShardWriter(tmp_path / "s.safetensors", entries) as w:
        w.write(memoryview(bytes(100)))  # short of the 8 KiB planned
    assert list(tmp_path.iterdir()) == []


def file_system_takes_o_direct(folder: Path) -> bool:
    probe = folder / ".o_direct_probe"
    try:
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(handle)
    probe.unlink()
    return True


def test_prefetch_tolerates_a_missing_source(tmp_path: Path) -> None:
    shards.prefetch(tmp_path / "absent")  # the cast then reports the missing source itself

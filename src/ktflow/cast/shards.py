"""Streaming safetensors I/O: validated headers, ranged reads, and a writer that never holds a shard.

Reads go through ``readinto`` on preallocated buffers rather than mmap, so the pages of a
690 GB checkpoint stay in the page cache and never count against this process's RSS.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import xxhash

from ktflow.atomic import storage_error
from ktflow.cast.output_file import open_output
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import DTYPE_SIZES, TensorSlot

METADATA = {"format": "pt"}  # transformers refuses shards whose metadata lacks format=pt
CAST_MARKER = "cast_complete.json"  # written last into DST: the only sign that it is complete
# Read ahead from the first moment: the first shards are then in memory when the workers get to them.
PREFETCH_BYTES = 1 << 30
# How far a reader asks the disk to read ahead of where it reads (see Reader.readinto).
READAHEAD_WINDOW = 64 << 20


class Reader:
    """Ranged reads from source shards, one open handle per file for the worker's lifetime."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self._advised: dict[Path, int] = {}

    def readinto(self, slot: TensorSlot, offset: int, out: memoryview, *, streaming: bool = True) -> None:
        """``streaming``: part of a tensor read front to back, so the disk is asked for what follows."""
        handle = self._handle(slot.path)
        if offset < 0 or offset + len(out) > slot.nbytes:
            raise ValueError(f"read past {slot.name}")
        if streaming:
            self._read_ahead(slot.path, handle.fileno(), slot.start + offset + len(out))
        handle.seek(slot.start + offset)
        got = 0
        while got < len(out):
            step = handle.readinto(out[got:])
            if not step:
                raise KtflowInputError(slot.path, slot.name, "shard shrank while being read")
            got += step

    def _read_ahead(self, path: Path, handle: int, end: int) -> None:
        """Keep the disk reading the next window while this worker computes: the kernel's own
        read-ahead is a few hundred KB, so a single worker would otherwise wait for the disk on
        every chunk, then compute while the disk idles."""
        advised = self._advised.get(path, 0)
        if end + READAHEAD_WINDOW // 2 <= advised:
            return
        start = max(advised, end)
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(handle, start, end + READAHEAD_WINDOW - start, os.POSIX_FADV_WILLNEED)
        self._advised[path] = end + READAHEAD_WINDOW

    def ask_for(self, slots: Iterable[TensorSlot]) -> None:
        """Have the disk start reading these tensors now: a shard's scales, which safetensors may put
        after all its weights, are then read in one sweep instead of one seek per weight."""
        for slot in slots:
            with contextlib.suppress(OSError):  # advice only
                os.posix_fadvise(
                    self._handle(slot.path).fileno(), slot.start, slot.nbytes, os.POSIX_FADV_WILLNEED
                )

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "rb", buffering=0)  # noqa: SIM115
        return handle

    def read(self, slot: TensorSlot) -> bytearray:
        """A small tensor (a scale, a shape) read whole. It does not move the read-ahead cursor: safetensors
        puts INT4 scales after every packed weight, so advising from there would stop the advice for
        the weights streamed next."""
        data = bytearray(slot.nbytes)
        self.readinto(slot, 0, memoryview(data), streaming=False)
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._advised.clear()


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(entries: Iterable[Entry]) -> bytes:
    """Length prefix + JSON header padded with spaces so tensor data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": METADATA}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_size(entries: Iterable[Entry]) -> int:
    listed = list(entries)
    return len(encode_header(listed)) + sum(entry.nbytes for entry in listed)


class ShardWriter:
    """Write a shard header first, then tensor bytes in order; rename into place only when complete.

    The temp file is a hidden sibling, so a kill leaves either nothing or a finished shard under
    the final name. The running XXH3-64 checksum (~80 GB/s, where CRC-32 would cost a quarter of
    the cast) lets a resumed cast check finished shards without trusting file sizes alone.
    """

    def __init__(self, path: Path, entries: list[Entry], durable: bool = True) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self._expected = shard_size(entries)
        self._written = 0
        self._hash = xxhash.xxh3_64()
        self._reserved: memoryview | None = None
        self._file = open_output(self.tmp, durable)
        try:
            self.write(memoryview(encode_header(entries)))
        except BaseException:
            self._discard()
            raise

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        self._file.write(data)
        self._hash.update(data)
        self._written += len(data)

    def reserve(self, nbytes: int) -> memoryview | None:
        """Room for the next ``nbytes`` in the output file's own buffer (None: use ``write``)."""
        self._reserved = self._file.reserve(nbytes)
        return self._reserved

    def commit(self, nbytes: int) -> None:
        """The first ``nbytes`` of the last reserve are filled: they are the next bytes of the shard."""
        if self._reserved is None or nbytes > len(self._reserved):
            raise RuntimeError(f"{self.path}: commit of {nbytes} bytes without room reserved")
        self._hash.update(self._reserved[:nbytes])
        self._reserved = None
        self._file.commit(nbytes)
        self._written += nbytes

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            self._discard()
            return
        try:
            if self._written != self._expected:
                raise RuntimeError(f"{self.path}: wrote {self._written} bytes, planned {self._expected}")
            self._file.finish()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._file.abort()
        self.tmp.unlink(missing_ok=True)

    @property
    def size(self) -> int:
        return self._written

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk becomes one clear input error naming the file being written."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise KtflowInputError(
                path,
                None,
                "no space left on device; finished shards are kept: free space and rerun to resume",
            ) from error
        # A denied or read-only destination gets the same one-line message as every other step.
        converted = storage_error(error, path)
        if converted is None:
            raise
        raise converted from error


def file_checksum(path: Path, chunk: int = 1 << 24) -> str:
    """XXH3-64 of a whole file, as ShardWriter.checksum computes it while writing."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while step := handle.readinto(view):
            digest.update(view[:step])
    return digest.hexdigest()


def prefetch(src: Path, budget: int = PREFETCH_BYTES) -> None:
    """Have the kernel start reading the largest shards (workers take the largest first), up to
    ``budget`` bytes, on a daemon thread: the disk then works while the CLI still plans the cast."""

    def advise() -> None:
        left = budget
        with contextlib.suppress(OSError):  # advice only: the cast itself reports unreadable shards
            for path in sorted(src.glob("*.safetensors"), key=lambda p: -p.stat().st_size):
                if left <= 0:
                    return
                handle = os.open(path, os.O_RDONLY)
                try:
                    length = min(os.fstat(handle).st_size, left)
                    os.posix_fadvise(handle, 0, length, os.POSIX_FADV_WILLNEED)
                    left -= length
                finally:
                    os.close(handle)

    with contextlib.suppress(OSError):
        if src.is_dir():
            threading.Thread(target=advise, name="prefetch", daemon=True).start()

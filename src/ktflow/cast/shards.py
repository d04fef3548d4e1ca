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
from ktflow.errors import KtflowInputError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
# A header larger than this is corrupt, not large: the safetensors crate rejects > 100 MB too.
MAX_HEADER = 100_000_000
METADATA = {"format": "pt"}  # transformers refuses shards whose metadata lacks format=pt
CAST_MARKER = "cast_complete.json"  # written last into DST: the only sign that it is complete
# Read ahead while the CLI imports torch (~2 s): about what a disk delivers meanwhile.
PREFETCH_BYTES = 1 << 30
# A durable writer hands each finished window to the disk at once (see ShardWriter.write).
WRITEBACK_WINDOW = 32 << 20


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor's bytes sit in a source shard (``start``/``end`` are absolute file offsets)."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorSlot]:
    """Parse and check a shard's header against its size: truncated, garbled or overlapping data fails.

    At least what the safetensors library enforces: a sane header length, a JSON object without
    duplicate keys, string metadata, byte counts that match dtype x shape, and data offsets that,
    in order, tile the data section exactly (no gap, no overlap, nothing after the last tensor).
    """
    size, raw = _header_bytes(path)
    header = _parse_header(path, raw)
    base = 8 + len(raw)
    slots = {name: _slot(path, name, entry, base) for name, entry in header.items() if name != "__metadata__"}
    _check_layout(path, slots, base, size)
    return slots


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """(file size, raw JSON header bytes) once the length prefix is known to fit the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise KtflowInputError(path, None, f"not a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise KtflowInputError(
                    path, None, f"not a safetensors file: header length {length} exceeds {MAX_HEADER}"
                )
            if 8 + length > size:
                raise KtflowInputError(
                    path, None, f"corrupt or truncated: header of {length} bytes, file {size}"
                )
            return size, handle.read(length)
    except FileNotFoundError as error:
        raise KtflowInputError(path, None, "shard file is missing") from error


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {key!r} appears twice")
        found[key] = value
    return found


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise KtflowInputError(path, None, f"corrupt header: {error}") from error
    if not isinstance(header, dict):
        raise KtflowInputError(path, None, "corrupt header: not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise KtflowInputError(path, "__metadata__", "corrupt header: must map strings to strings")
    return header


def _check_layout(path: Path, slots: dict[str, TensorSlot], base: int, size: int) -> None:
    """Tensors sorted by offset must follow each other from the data start to the end of the file."""
    at, previous = base, None
    for slot in sorted(slots.values(), key=lambda s: (s.start, s.end)):
        if slot.start < at:
            raise KtflowInputError(path, slot.name, f"corrupt header: data overlaps tensor {previous}")
        if slot.start > at:
            raise KtflowInputError(
                path, slot.name, f"corrupt header: {slot.start - at} unaccounted bytes before this tensor"
            )
        if slot.end > size:
            raise KtflowInputError(
                path, slot.name, f"truncated shard: tensor data ends at byte {slot.end}, file has {size}"
            )
        at, previous = slot.end, slot.name
    if at != size:
        raise KtflowInputError(path, None, f"corrupt shard: data ends at byte {at}, file has {size}")


def _slot(path: Path, name: str, entry: Any, base: int) -> TensorSlot:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
            raise TypeError("shape and offsets must be non-negative integers")
    except (KeyError, TypeError, ValueError) as error:
        raise KtflowInputError(path, name, f"corrupt header entry: {error}") from error
    if dtype not in DTYPE_SIZES:
        raise KtflowInputError(path, name, f"unknown dtype {dtype!r}")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise KtflowInputError(path, name, f"corrupt header: {end - begin} bytes for {dtype} {list(shape)}")
    return TensorSlot(name, path, dtype, shape, base + begin, base + end)


class Reader:
    """Ranged reads from source shards, one open handle per file for the worker's lifetime."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}

    def readinto(self, slot: TensorSlot, offset: int, out: memoryview) -> None:
        handle = self._handles.get(slot.path)
        if handle is None:
            handle = self._handles[slot.path] = open(slot.path, "rb", buffering=0)  # noqa: SIM115
        if offset < 0 or offset + len(out) > slot.nbytes:
            raise ValueError(f"read past {slot.name}")
        handle.seek(slot.start + offset)
        got = 0
        while got < len(out):
            step = handle.readinto(out[got:])
            if not step:
                raise KtflowInputError(slot.path, slot.name, "shard shrank while being read")
            got += step

    def read(self, slot: TensorSlot) -> bytearray:
        data = bytearray(slot.nbytes)
        self.readinto(slot, 0, memoryview(data))
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


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
        self._durable = durable
        self.tmp = path.with_name(f".{path.name}.partial")
        self._expected = shard_size(entries)
        self._written = 0
        self._handed_off = self._previous = 0
        self._hash = xxhash.xxh3_64()
        self._handle = open(self.tmp, "wb", buffering=0)  # noqa: SIM115
        try:
            self.write(memoryview(encode_header(entries)))
        except BaseException:
            self._discard()
            raise

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        done = 0
        while done < len(data):
            done += self._handle.write(data[done:])
        self._hash.update(data)
        self._written += len(data)
        if self._durable and self._written - self._handed_off >= WRITEBACK_WINDOW:
            self._hand_off()

    def _hand_off(self) -> None:
        """Start writing the last window to disk now, so the closing fsync waits for one window, not the
        shard, and the disk writes while this worker reads and computes (with the page cache far larger
        than a shard, the kernel would otherwise start only at that fsync). DONTNEED starts writeback of
        dirty pages without waiting for it, and drops the pages already written: a 1.3 TB output then
        does not push the rest of the machine out of the page cache."""
        start = self._previous  # the window before: written by now, so its pages are dropped
        with contextlib.suppress(OSError):  # advice only: a file system may not take it
            os.posix_fadvise(self._handle.fileno(), start, self._written - start, os.POSIX_FADV_DONTNEED)
        self._previous, self._handed_off = self._handed_off, self._written

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
            if self._durable:
                os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        self._handle.close()
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
    ``budget`` bytes, on a daemon thread: the disk then works while the CLI is still importing torch."""

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

"""How a shard's bytes reach the disk: straight from the process (O_DIRECT) where the file system
takes it, through the page cache where it does not.

Measured on the development VM's ext4 (docs/benchmarks.md, issue 16): copying a cast's output into
the page cache (``copy_folio_from_iter_atomic``) was a quarter of a one-worker cast's CPU and its
writeback most of the rest of its system time; O_DIRECT writes of the same bytes cost a third of the
system time. A 1.3 TB output has no reason to pass through the page cache anyway: nothing reads it
back soon, and it would push everything else out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's logical block
# (512 B or 4 KiB); 4 KiB suits both, and mmap buffers are page aligned.
DIRECT_ALIGN = 4096
# Each direct write hands the disk this much; two buffers let the worker fill one while the other is
# written. Larger buffers measured no faster (1, 4 and 16 MiB within noise).
DIRECT_BUFFER = 4 << 20
# Room past DIRECT_BUFFER that a kernel may reserve to compute a chunk in place (kernel chunks are
# at most 512 KiB of bf16), so no chunk is ever split or copied on the way out.
RESERVE_LIMIT = 1 << 20
# A page-cache writer hands each finished window to the disk at once (see PageCacheFile.write).
WRITEBACK_WINDOW = 32 << 20


class OutputFile(ABC):
    """A new file written front to back, then ``finish``ed (flushed, and fsynced when durable)."""

    def __init__(self, handle: int, durable: bool) -> None:
        self._handle: int | None = handle
        self._durable = durable

    @abstractmethod
    def write(self, data: memoryview) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...

    def reserve(self, nbytes: int) -> memoryview | None:
        """Room for the next ``nbytes`` in this file's buffer, to ``commit`` once filled; None: no room
        to lend (then ``write``)."""
        return None

    def commit(self, nbytes: int) -> None:
        raise RuntimeError("commit without a reserve")

    def abort(self) -> None:
        """Stop writing and close; the caller removes the file."""
        self._close()

    def _close(self) -> None:
        # Once only: another worker thread may already hold a file under the same descriptor number.
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                os.close(handle)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise ValueError("output file is closed")
        return self._handle


def open_output(path: Path, durable: bool) -> OutputFile:
    """Direct I/O where the file system accepts it (ext4, XFS, Lustre...), else the page cache
    (tmpfs, some FUSE and network file systems refuse O_DIRECT at open or at the first write)."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | flag, 0o644)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
        else:
            return DirectFile(handle, durable)
    return PageCacheFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), durable)


def _write_all(handle: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(handle, data[done:])


class DirectFile(OutputFile):
    """O_DIRECT writes of whole aligned buffers on a writer thread; only the last partial block goes
    through the page cache (O_DIRECT cannot write it), and ``finish`` fsyncs when durable.

    A buffer is handed off once DIRECT_BUFFER bytes are in it; what lies past its last whole block
    (under 4 KiB) moves to the front of the next buffer.
    """

    def __init__(self, handle: int, durable: bool) -> None:
        super().__init__(handle, durable)
        self._buffers = _borrow_buffers()
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._pending: list[Future[None] | None] = [None, None]
        self._current, self._fill = 0, 0
        self._direct = True
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="direct-writer")

    def write(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            take = min(len(data) - done, DIRECT_BUFFER - self._fill)
            self._views[self._current][self._fill : self._fill + take] = data[done : done + take]
            self._fill += take
            done += take
            if self._fill >= DIRECT_BUFFER:
                self._submit()

    def reserve(self, nbytes: int) -> memoryview | None:
        if nbytes > RESERVE_LIMIT:
            return None
        return self._views[self._current][self._fill : self._fill + nbytes]

    def commit(self, nbytes: int) -> None:
        self._fill += nbytes
        if self._fill >= DIRECT_BUFFER:
            self._submit()

    def _submit(self) -> None:
        """Hand the whole blocks of the current buffer to the writer thread; carry the rest over."""
        current, spare = self._current, self._current ^ 1
        aligned = self._fill - self._fill % DIRECT_ALIGN
        rest = self._fill - aligned
        self._wait(spare)
        if rest:
            self._views[spare][:rest] = self._views[current][aligned : self._fill]
        if aligned:
            self._pending[current] = self._writer.submit(self._write_direct, self._views[current][:aligned])
        self._current, self._fill = spare, rest

    def _wait(self, index: int) -> None:
        pending, self._pending[index] = self._pending[index], None
        if pending is not None:
            pending.result()

    def _write_direct(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.write(self.handle, data[done:])
            except OSError as error:
                # A file system may accept O_DIRECT at open and refuse it at the first write, and a
                # short write leaves the next one unaligned. Either way the page cache takes the rest,
                # from where the last write stopped.
                if error.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()

    def _buffered(self) -> None:
        if self._direct:
            flags = fcntl.fcntl(self.handle, fcntl.F_GETFL)
            fcntl.fcntl(self.handle, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct = False

    def finish(self) -> None:
        """Whole blocks go direct; the last partial block (under 4 KiB) through the page cache."""
        self._submit()
        self._wait(0)
        self._wait(1)
        self._writer.shutdown()
        if self._fill:
            self._buffered()
            _write_all(self.handle, self._views[self._current][: self._fill])
        if self._durable:
            os.fsync(self.handle)
        self._close()

    def abort(self) -> None:
        self._writer.shutdown(wait=True)  # the thread must not write after the file is removed
        self._close()

    def _close(self) -> None:
        super()._close()
        if self._views:
            for view in self._views:
                with contextlib.suppress(BufferError):  # a kernel's array still on it: freed with it
                    view.release()
            self._views.clear()
            _return_buffers(self._buffers)


_spare = threading.local()


def _borrow_buffers() -> list[mmap.mmap]:
    """A worker casts shard after shard: it reuses its two buffers, whose pages are then already
    mapped (fresh pages are zeroed by the kernel, and on a VM first backed by the host)."""
    size = DIRECT_BUFFER + RESERVE_LIMIT
    buffers: list[mmap.mmap] | None = getattr(_spare, "buffers", None)
    _spare.buffers = None
    if buffers and all(len(buffer) == size for buffer in buffers):
        return buffers
    return [mmap.mmap(-1, size) for _ in range(2)]


def _return_buffers(buffers: list[mmap.mmap]) -> None:
    _spare.buffers = buffers


class PageCacheFile(OutputFile):
    """Plain buffered writes, each finished window handed to the disk at once when durable."""

    def __init__(self, handle: int, durable: bool) -> None:
        super().__init__(handle, durable)
        self._written = self._handed_off = self._previous = 0

    def write(self, data: memoryview) -> None:
        _write_all(self.handle, data)
        self._written += len(data)
        if self._durable and self._written - self._handed_off >= WRITEBACK_WINDOW:
            self._hand_off()

    def _hand_off(self) -> None:
        """Start writing the last window to disk now, so the closing fsync waits for one window, not
        the shard, and the disk writes while this worker reads and computes (with the page cache far
        larger than a shard, the kernel would otherwise start only at that fsync). DONTNEED starts
        writeback of dirty pages without waiting for it, and drops the pages already written: a
        1.3 TB output then does not push the rest of the machine out of the page cache."""
        start = self._previous  # the window before: written by now, so its pages are dropped
        with contextlib.suppress(OSError):  # advice only: a file system may not take it
            os.posix_fadvise(self.handle, start, self._written - start, os.POSIX_FADV_DONTNEED)
        self._previous, self._handed_off = self._handed_off, self._written

    def finish(self) -> None:
        if self._durable:
            os.fsync(self.handle)
        self._close()

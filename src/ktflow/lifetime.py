"""Child processes that do not outlive ktflow, and work directories one process owns at a time.

A long-running child (an inference server, a LLaMA-Factory trainer) must stop when the
``ktflow`` step that started it dies, even by SIGKILL, which no handler sees. On Linux the
child is started through a one-line Python wrapper that asks the kernel for
``PR_SET_PDEATHSIG`` (SIGTERM when its parent dies) and then execs the real command, so the
setting applies to the command itself. The wrapper is given ktflow's pid and exits at once
if it was re-parented before the request took effect (the parent died during the start).

A work directory is claimed with an ``fcntl`` lock on a file inside it: the kernel releases
it when the holder dies, however it dies, so a crash never leaves a stale claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ktflow.atomic import storage_errors
from ktflow.errors import KtflowInputError

PR_SET_PDEATHSIG = 1
_WRAPPER = (
    "import ctypes,os,signal,sys;"
    f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG},signal.SIGTERM);"
    "os.getppid()==int(sys.argv[1]) or sys.exit(143);"
    "os.execvp(sys.argv[2],sys.argv[2:])"
)
LOCK_NAME = ".ktflow.lock"


def tied_to_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that the process gets SIGTERM when this one dies (Linux; else unchanged)."""
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-c", _WRAPPER, str(os.getpid()), *argv]


@contextlib.contextmanager
def claimed(directory: Path, what: str) -> Iterator[int]:
    """Hold ``directory`` for this process; KtflowInputError naming the holder's pid if taken.

    Yields the lock's file descriptor: pass it to children (``pass_fds``) that should keep
    the claim while they live.
    """
    path = directory / LOCK_NAME
    with storage_errors(path):  # a full or read-only disk: one line naming the path
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise KtflowInputError(
                directory,
                None,
                f"in use by another {what} (pid {holder}); wait for it to finish or stop it first",
            ) from None
        with storage_errors(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)

"""Crash-safe writes: nothing half written ever sits under its final name.

Temp files and directories are hidden siblings of their target named
``.<target>.<host>-<pid>.<random>.tmp``. A process killed with SIGKILL cannot remove
its own; the next write of the same target removes those whose process is gone (same
host only, so a shared results directory on a cluster is never swept from another
node). A full disk or a directory the user may not write to becomes one
:class:`StorageError` naming the target, with nothing published under its name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system (or the file-size limit)",
}
_ACCESS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class StorageError(KtflowInputError):
    """The results directory cannot take a write (full, read-only, not ours); nothing was published."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove temp siblings of ``target`` left by dead processes of this host; return what went."""
    prefix = f".{target.name}.{socket.gethostname()}-"
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for sibling in target.parent.iterdir():
            if not sibling.name.startswith(prefix) or not sibling.name.endswith((".tmp", ".old")):
                continue
            pid = sibling.name[len(prefix) :].split(".", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def _on_write_side(error: OSError, target: Path) -> bool:
    """A full disk is always about the write; an access error only when it names the target's tree."""
    if error.errno in _SPACE:
        return True
    if error.errno not in _ACCESS:
        return False
    if error.filename is None:
        return True
    failed = Path(os.fsdecode(error.filename)).absolute()
    parent = target.parent.absolute()
    return failed == parent or failed.is_relative_to(parent) or parent.is_relative_to(failed)


def write_fault(error: OSError) -> str | None:
    """``<path>: <what is wrong>`` for any write that failed for want of room, or because a path
    component is a regular file; None for other errors. The CLI's last word when no step's own
    ``storage_errors`` caught the fault (e.g. an output directory under a file)."""
    code = error.errno or 0
    if code in _SPACE:
        reason = f"{_SPACE[code]}: free space and rerun"
    elif code == errno.ENOTDIR:
        reason = "a component of this path is a regular file, not a directory: choose another path"
    else:
        return None
    return f"{os.fsdecode(error.filename)}: {reason}" if error.filename is not None else reason


def storage_error(error: OSError, target: Path) -> StorageError | None:
    """The one-line error for a write of ``target`` that failed with ``error`` (None: not a storage fault)."""
    if not _on_write_side(error, target):
        return None
    reason = _SPACE.get(error.errno or 0) or _ACCESS[error.errno or 0]
    detail = f" ({os.fsdecode(error.filename)})" if error.filename is not None else ""
    advice = (
        "free space and rerun"
        if error.errno in _SPACE
        else "make the results directory writable by this user and rerun"
    )
    message = f"cannot write: {reason}{detail}; nothing was published, earlier results are intact: {advice}"
    return StorageError(target, None, message)


@contextlib.contextmanager
def storage_errors(target: str | Path) -> Iterator[None]:
    """Turn a full disk or a denied write under ``target``'s directory into one StorageError."""
    try:
        yield
    except OSError as error:
        converted = storage_error(error, Path(target))
        if converted is None:
            raise
        raise converted from error


def _tmp_sibling(path: Path) -> Path:
    # Same directory as the target so the final rename never crosses file systems.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    target = Path(path)
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        tmp = _tmp_sibling(target)
        try:
            encoding = None if "b" in mode else "utf-8"
            with open(tmp, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            # mkstemp creates 0600 files; give the result the permissions a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place when the block succeeds.

    An existing ``path`` is replaced only after the new one is complete.
    """
    target = Path(path)
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        tag = f".{target.name}.{_owner_tag()}."
        tmp = Path(tempfile.mkdtemp(prefix=tag, suffix=".tmp", dir=target.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=tag, suffix=".old", dir=target.parent))
                os.replace(target, old / "x")
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / "x", target)  # the earlier result stays published
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()

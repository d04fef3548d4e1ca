"""``cast_checkpoint``: plan, resume, cast shards in parallel, then index, verify and mark complete.

DST layout, in the order things land there (so a half-written DST never looks complete):

- ``.ktflow-cast/state.json`` (source fingerprint) and ``.ktflow-cast/done/<shard>.json``
  (size + XXH3-64 checksum of each finished shard): the resumable state, kept after completion;
- the non-weight files and the bf16 ``config.json``;
- the shards, each written as ``.<shard>.partial``, fsynced, then renamed;
- ``model.safetensors.index.json``, once every shard is in place and verified;
- ``cast_complete.json`` (``CAST_MARKER``) last: the only sign that DST is complete.

A rerun keeps DST, skips each shard whose size and checksum match its record, and finishes the
rest. A workflow rule should declare ``DST/cast_complete.json`` as its output rather than
``directory(DST)``: Snakemake deletes a directory output before the job runs, but here it
deletes only the marker, so finished shards survive for the resume.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import xxhash
from tqdm import tqdm

from ktflow.atomic import atomic_file, write_json
from ktflow.cast.formats.base import Sink, Workspace
from ktflow.cast.plan import CONFIG_NAME, INDEX_NAME, Plan, ShardPlan, bf16_config, build_plan, load_json
from ktflow.cast.shards import CAST_MARKER, Reader, ShardWriter, disk_errors, file_checksum
from ktflow.cast.verify import VerifyReport, verify_checkpoint
from ktflow.errors import KtflowInputError

STATE_DIR = ".ktflow-cast"
T = TypeVar("T")


@dataclass(frozen=True)
class CastReport:
    src: str
    dst: str
    format: str
    shards_written: int
    shards_skipped: int
    tensors: int
    bytes_written: int
    total_size: int
    seconds: float
    peak_rss_bytes: int
    verify: VerifyReport

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"gb_per_s": round(self.gb_per_s, 3)}


class _Stopped(Exception):
    """Another worker failed: give up this shard quietly."""


class _State:
    """DST and its resumable state: which shards are finished, for which source."""

    def __init__(self, dst: Path, plan: Plan, durable: bool) -> None:
        self.dst, self.plan, self.durable = dst, plan, durable
        self.root = dst / STATE_DIR
        self.done_dir = self.root / "done"

    def claim(self) -> None:
        """Take DST: refuse a foreign non-empty directory, start over if the source changed."""
        if self.dst.exists() and not self.dst.is_dir():
            raise KtflowInputError(self.dst, None, "destination exists and is not a directory")
        if self.dst.is_dir() and any(self.dst.iterdir()) and not self.root.is_dir():
            raise KtflowInputError(
                self.dst,
                None,
                "destination is not empty and holds no ktflow cast state: remove it or pick another",
            )
        state = self.root / "state.json"
        if state.exists() and load_json(state).get("fingerprint") != self.plan.fingerprint:
            for child in self.dst.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.done_dir.mkdir(parents=True, exist_ok=True)
        write_json(state, {"fingerprint": self.plan.fingerprint, "format": self.plan.fmt.name})
        # Temp files a kill left behind: shards (.partial) and atomic JSON/file writes (.tmp).
        for stale in [*self.dst.glob(".*.partial"), *self.dst.rglob(".*.tmp")]:
            stale.unlink()

    def record(self, shard: ShardPlan, data: dict[str, Any]) -> None:
        write_json(self.done_dir / f"{shard.name}.json", data)

    def has_records(self) -> bool:
        return any(self.done_dir.iterdir())

    def finished(self, shard: ShardPlan) -> bool:
        """The shard on disk is the one recorded: same size, and same checksum (or the same hard link)."""
        record_path = self.done_dir / f"{shard.name}.json"
        path = self.dst / shard.name
        if not (record_path.exists() and path.exists()):
            return False
        record = load_json(record_path)
        if record.get("size") != path.stat().st_size:
            return False
        if record.get("linked"):
            return path.samefile(shard.source)
        return bool(record.get("size") == shard.size and record.get("xxh3_64") == file_checksum(path))


def cast_checkpoint(
    src: Path, dst: Path, workers: int = 1, progress: bool = True, durable: bool = True
) -> CastReport:
    """Cast an FP8 / INT4 / bf16 checkpoint directory into a complete, verified bf16 model directory.

    ``durable=False`` skips fsync: faster where the output fits in the page cache, but after a
    power cut a DST marked complete may hold shards that never reached the disk.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if workers < 1:
        raise KtflowInputError(None, "workers", f"must be at least 1, got {workers}")
    plan = build_plan(src)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise KtflowInputError(dst, None, "destination must not be the source or inside it")
    state = _State(dst, plan, durable)
    with disk_errors(dst):
        state.claim()
    marker = dst / CAST_MARKER
    if marker.exists() and load_json(marker).get("fingerprint") == plan.fingerprint:
        report = verify_checkpoint(dst, src)
        if report.ok:
            return _report(plan, dst, 0, len(plan.shards), 0, started, report)
    # From here until the marker is rewritten, DST must not look complete to anyone.
    marker.unlink(missing_ok=True)
    (dst / INDEX_NAME).unlink(missing_ok=True)
    checking = "checking finished shards" if state.has_records() else None
    done = _parallel(workers, plan.shards, state.finished, checking, progress)
    todo = [shard for shard, ok in zip(plan.shards, done, strict=True) if not ok]
    _check_space(plan, dst, todo)
    with disk_errors(dst):
        for rel in plan.other_files:
            _copy_file(src / rel, dst / rel)
        write_json(dst / CONFIG_NAME, bf16_config(plan.config))
    written = _cast_shards(plan, state, todo, workers, progress)
    with disk_errors(dst):
        if durable:
            _fsync_dir(dst)
        _write_index(plan, dst)
        report = verify_checkpoint(dst, src)
        report.raise_if_failed()
        result = _report(plan, dst, len(todo), len(plan.shards) - len(todo), written, started, report)
        write_json(marker, result.to_dict() | {"fingerprint": plan.fingerprint})
    return result


def _report(
    plan: Plan, dst: Path, written: int, skipped: int, nbytes: int, started: float, verify: VerifyReport
) -> CastReport:
    return CastReport(
        src=str(plan.src),
        dst=str(dst),
        format=plan.fmt.name,
        shards_written=written,
        shards_skipped=skipped,
        tensors=sum(len(shard.tensors) for shard in plan.shards),
        bytes_written=nbytes,
        total_size=plan.total_size,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss(),
        verify=verify,
    )


def peak_rss() -> int:
    """This process's peak RSS since exec (VmHWM); ru_maxrss would count a parent's peak before fork."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _links(plan: Plan, dst: Path) -> bool:
    return plan.fmt.links_shards and os.stat(plan.src).st_dev == os.stat(dst).st_dev


def _check_space(plan: Plan, dst: Path, todo: list[ShardPlan]) -> None:
    needed = sum(os.stat(plan.src / rel).st_size for rel in plan.other_files)
    if not _links(plan, dst):
        needed += sum(shard.size for shard in todo)
    free = shutil.disk_usage(dst).free
    if needed > free:
        raise KtflowInputError(
            dst,
            None,
            f"not enough disk space: the cast needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free",
        )


def _copy_file(source: Path, target: Path) -> str:
    """Copy through a temp name; returns the XXH3-64 checksum of the bytes copied."""
    digest = xxhash.xxh3_64()
    with atomic_file(target, "wb") as out, open(source, "rb") as handle:
        while block := handle.read(1 << 23):
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


def _cast_shards(plan: Plan, state: _State, todo: list[ShardPlan], workers: int, progress: bool) -> int:
    total = sum(shard.size for shard in todo)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="cast",
        file=sys.stderr,
        disable=not progress,
        smoothing=0.1,
    )
    lock, stop, local = threading.Lock(), threading.Event(), threading.local()
    links = _links(plan, state.dst)

    def advance(count: int) -> None:
        if stop.is_set():
            raise _Stopped
        with lock:
            bar.update(count)

    def job(shard: ShardPlan) -> None:
        if stop.is_set():
            raise _Stopped
        with disk_errors(state.dst / shard.name):
            if plan.fmt.links_shards:
                _place_whole(shard, state, links, advance)
                return
            if not hasattr(local, "reader"):
                local.reader, local.work = Reader(), Workspace()
            _write_shard(plan, shard, state, local.reader, local.work, advance)

    with bar:  # the numpy kernels use one core each: --workers N means N cores
        _parallel(workers, sorted(todo, key=lambda s: -s.size), job, None, False, stop)
    return total


def _write_shard(
    plan: Plan,
    shard: ShardPlan,
    state: _State,
    reader: Reader,
    work: Workspace,
    advance: Callable[[int], None],
) -> None:
    with ShardWriter(state.dst / shard.name, [out.entry for out in shard.tensors], state.durable) as writer:
        advance(writer.size)  # the header
        reader.ask_for(slot for out in shard.tensors for slot in out.inputs[1:])  # the scales
        sink = _ShardSink(writer, advance)
        for out in shard.tensors:
            before = writer.size
            plan.fmt.produce(out, reader, work, sink)
            if writer.size - before != out.entry.nbytes:
                raise RuntimeError(
                    f"{out.entry.name}: wrote {writer.size - before} bytes, not {out.entry.nbytes}"
                )
    state.record(shard, {"size": writer.size, "xxh3_64": writer.checksum})


class _ShardSink(Sink):
    """Kernel output into a shard, counted for the progress bar; lends the shard's output buffer."""

    def __init__(self, writer: ShardWriter, advance: Callable[[int], None]) -> None:
        def write(data: memoryview) -> None:
            writer.write(data)
            advance(data.nbytes)

        super().__init__(write)
        self._writer, self._advance = writer, advance

    def reserve(self, nbytes: int) -> memoryview | None:
        return self._writer.reserve(nbytes)

    def commit(self, nbytes: int) -> None:
        self._writer.commit(nbytes)
        self._advance(nbytes)


def _place_whole(shard: ShardPlan, state: _State, links: bool, advance: Callable[[int], None]) -> None:
    """bf16 shards are hard-linked when source and destination share a file system, else copied."""
    target = state.dst / shard.name
    if links:
        tmp = target.with_name(f".{target.name}.partial")
        tmp.unlink(missing_ok=True)
        os.link(shard.source, tmp)
        os.replace(tmp, target)
        state.record(shard, {"size": target.stat().st_size, "linked": True})
    else:
        digest = _copy_file(shard.source, target)
        state.record(shard, {"size": target.stat().st_size, "xxh3_64": digest})
    advance(shard.size)


def _parallel(
    workers: int,
    items: Sequence[ShardPlan],
    job: Callable[[ShardPlan], T],
    desc: str | None,
    progress: bool,
    stop: threading.Event | None = None,
) -> list[T]:
    """Run ``job`` over shards on threads (numpy kernels and file I/O release the GIL).

    The first error stops the other workers at their next chunk and is raised once all are done.
    """
    stop = stop or threading.Event()
    results: dict[int, T] = {}
    errors: list[Exception] = []
    bar = tqdm(total=len(items), desc=desc, file=sys.stderr, disable=not (progress and desc))
    with bar, ThreadPoolExecutor(workers) as pool:
        futures: dict[Future[T], int] = {pool.submit(job, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except _Stopped:
                    pass
                except Exception as error:
                    stop.set()
                    errors.append(error)
                bar.update(1)
        except BaseException:  # Ctrl-C: let the workers notice, clean their temp files and exit
            stop.set()
            raise
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_index(plan: Plan, dst: Path) -> None:
    source = plan.src / INDEX_NAME
    metadata = dict(load_json(source).get("metadata") or {}) if source.exists() else {}
    metadata["total_size"] = plan.total_size
    write_json(dst / INDEX_NAME, {"metadata": metadata, "weight_map": dict(sorted(plan.weight_map.items()))})

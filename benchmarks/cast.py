"""Benchmark ``ktflow cast`` against compressed-tensors ``convert_checkpoint`` and the I/O floor.

    python benchmarks/cast.py                      # 2 GB FP8 (DeepSeek-V3 layout) + 1 GB INT4 (Kimi)
    python benchmarks/cast.py --out /dev/shm/ktflow-bench --modes durable --repeat 3
    python benchmarks/cast.py --fp8-gb 8 --workers 1 2 4
    python benchmarks/cast.py --disk --fp8-gb 0.6 --int4-gb 0.6 --rounds 5   # real disk, real CLI

Builds synthetic releases with real matrix sizes (7168 x 2048 experts...), then times, in the
same run and each in a fresh process (imports excluded, VmHWM peak RSS of the whole process):

- ktflow: ``cast_checkpoint(src, dst, workers=N)``, checksums and verification included;
- compressed-tensors: ``convert_checkpoint(..., max_workers=N)`` with N torch threads (on CPU it
  runs shards one after another whatever max_workers is, so torch threads are its only way to
  use N cores);
- I/O floor: read every input byte and write every output byte ktflow writes, on N threads: no
  tool that reads its input and writes its output can beat it.

Two modes: ``durable`` times every tool until its output is on disk (ktflow fsyncs each shard;
the other two are fsynced inside their timed region), ``page-cache`` times them without fsync
(ktflow ``durable=False``). On a small disk-bound host both tools sit at the I/O floor; a tmpfs
``--out`` takes the disk out and shows compute. Outputs of the two tools are compared tensor by
tensor (bit-identical expected). Sources and outputs go under ``--out`` (default
benchmarks/out/cast, gitignored) and are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RSS_MARGIN = 1 << 30  # the stated bound: peak RSS < largest input shard + 1 GiB
REPEAT = 1
WAIT_IDLE = 0.0


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat)."""

    def sample() -> list[int]:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]

    before = sample()
    time.sleep(seconds)
    delta = [b - a for a, b in zip(before, sample(), strict=True)]
    return 1 - (delta[3] + delta[4]) / max(1, sum(delta))


def wait_idle(limit: float) -> None:
    """On a shared host, start a timed run only once others leave the CPUs idle (or ``limit`` passes)."""
    deadline = time.monotonic() + limit
    while limit > 0 and busy_fraction() > 0.1 and time.monotonic() < deadline:
        time.sleep(2)


def run_ktflow(src: Path, dst: Path, workers: int, durable: bool) -> None:
    from ktflow.cast import cast_checkpoint

    cast_checkpoint(src, dst, workers=workers, progress=False, durable=durable)


def run_ct(src: Path, dst: Path, workers: int, durable: bool) -> None:
    import torch
    from compressed_tensors.entrypoints.convert import (
        CompressedTensorsDequantizer,
        FP8BlockDequantizer,
        convert_checkpoint,
    )

    torch.set_num_threads(workers)
    config = json.loads((src / "config.json").read_text())
    quant = config.get("quantization_config") or config["text_config"]["quantization_config"]
    if quant["quant_method"] == "fp8":
        converter: Any = FP8BlockDequantizer.from_pretrained(src)
    else:
        converter = CompressedTensorsDequantizer(src)
    convert_checkpoint(src, dst, converter=converter, max_workers=workers)
    if durable:  # it never fsyncs: time it, like the others, until its output is on disk
        fsync_tree(dst)


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def run_deepseek_gpu(src: Path, dst: Path, workers: int, durable: bool) -> None:
    """DeepSeek-V3's own ``inference/fp8_cast_bf16.py`` (Triton kernel on the GPU), from the
    checkout in $KTFLOW_BENCH_REFERENCE: FP8 only; like CT it never fsyncs, so it is fsynced here."""
    import runpy

    folder = os.environ["KTFLOW_BENCH_REFERENCE"]
    sys.path.insert(0, folder)  # its `from kernel import weight_dequant`
    sys.argv = ["fp8_cast_bf16.py", "--input-fp8-hf-path", str(src), "--output-bf16-hf-path", str(dst)]
    runpy.run_path(str(Path(folder) / "fp8_cast_bf16.py"), run_name="__main__")
    if durable:
        fsync_tree(dst)


def run_floor(src: Path, dst: Path, workers: int, durable: bool, direct: bool) -> None:
    """Read each source shard and write an output file of the size ktflow writes for it.

    Two patterns, each the best of its kind measured on this host; the floor is whichever is faster
    in a round, so that it is one no tool beats. Both ask the disk to read 64 MiB ahead.
    ``direct``: 4 MiB page-aligned buffers written straight to the disk (O_DIRECT; the last partial
    block through the page cache). Otherwise through the page cache with 1 MiB buffers (2 MiB and
    more fell off a cliff on this VM: 8 MiB took 3-5 s of system time where 1 MiB took 0.5 s), each
    32 MiB handed to the disk at once and the window before it dropped (fadvise DONTNEED). Which one
    wins depends on the moment: the page cache's system time varies tenfold on this VM.
    """
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    sizes = json.loads(os.environ["KTFLOW_BENCH_SIZES"])
    dst.mkdir(parents=True, exist_ok=True)
    chunk, ahead, window = (4 << 20) if direct else (1 << 20), 64 << 20, 32 << 20
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    def create(path: Path) -> tuple[int, bool]:
        if direct:
            with contextlib.suppress(OSError):
                return os.open(path, flags | os.O_DIRECT, 0o644), True
        return os.open(path, flags, 0o644), False

    def one(name: str) -> None:
        buffer = mmap.mmap(-1, chunk)
        view = memoryview(buffer)
        left, advised, position, written, previous, handed = sizes[name], 0, 0, 0, 0, 0
        out, unbuffered = create(dst / name)
        with open(src / name, "rb", buffering=0) as source:
            while left > 0:
                if position + ahead // 2 > advised:
                    start = max(advised, position)
                    os.posix_fadvise(source.fileno(), start, position + ahead - start, os.POSIX_FADV_WILLNEED)
                    advised = position + ahead
                position += source.readinto(view) or 0
                take = min(chunk, left)  # past the input's end: the buffer again
                if unbuffered and take % 4096:  # O_DIRECT writes whole blocks only
                    fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_DIRECT)
                done = 0
                while done < take:
                    done += os.write(out, view[done:take])
                left, written = left - take, written + take
                if durable and not unbuffered and written - handed >= window:
                    os.posix_fadvise(out, previous, written - previous, os.POSIX_FADV_DONTNEED)
                    previous, handed = handed, written
        if durable:
            os.fsync(out)
        os.close(out)
        view.release()
        buffer.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, sorted(sizes, key=lambda n: -sizes[n])))


RUNNERS = {
    "ktflow": run_ktflow,
    "compressed-tensors": run_ct,
    "deepseek-gpu": run_deepseek_gpu,
    "io-floor-direct": functools.partial(run_floor, direct=True),
    "io-floor-cache": functools.partial(run_floor, direct=False),
}
FLOORS = ("io-floor-direct", "io-floor-cache")


def child(tool: str, src: Path, dst: Path, workers: int, durable: bool) -> None:
    """Runs in a fresh process: time the call only, report peak RSS of this process."""
    # Imported up front so that import time is not timed.
    if tool == "compressed-tensors":
        import compressed_tensors.entrypoints.convert  # noqa: F401
    elif tool == "ktflow":
        import ktflow.cast.run  # noqa: F401
    before, started = cpu_seconds(), time.perf_counter()
    RUNNERS[tool](src, dst, workers, durable)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - before
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_rss": peak_rss()}))


def cpu_seconds() -> float:
    """user + system CPU time of this process: what a run costs, whatever else the host is doing."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss() -> int:
    """VmHWM: this process's peak RSS since exec (ru_maxrss would include the parent's before fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    tool: str, src: Path, dst: Path, workers: int, durable: bool, sizes: dict[str, int]
) -> dict[str, Any]:
    """The fastest of REPEAT fresh-process runs (the host is shared: the minimum is the least disturbed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), KTFLOW_BENCH_SIZES=json.dumps(sizes))
    mode = "durable" if durable else "page-cache"
    command = [sys.executable, __file__, "--child", tool, str(src), str(dst), str(workers), mode]
    runs = []
    for _ in range(REPEAT):
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
        wait_idle(WAIT_IDLE)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "seconds": min(run["seconds"] for run in runs),
        "cpu": min(run["cpu"] for run in runs),
        "all_seconds": [round(run["seconds"], 3) for run in runs],
        "peak_rss": max(run["peak_rss"] for run in runs),
        "tool": tool,
        "workers": workers,
        "mode": mode,
    }


def shard_sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.glob("*.safetensors")}


def digests(root: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """dtype, shape and XXH3-64 of every indexed tensor, read back with the safetensors library
    (digests rather than both outputs on disk at once: the host may be a RAM-backed tmpfs)."""
    import torch
    import xxhash
    from safetensors import safe_open

    index = json.loads((root / "model.safetensors.index.json").read_text())
    found = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(root / file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(name)
                digest = xxhash.xxh3_64(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
                found[name] = (str(tensor.dtype), tuple(tensor.shape), digest.hexdigest())
    return found


def build(kind: str, target: Path, gigabytes: float, shard_mb: int) -> Path:
    from support.synthetic_checkpoints import write_fp8_release, write_int4_release

    wanted = int(gigabytes * 1e9)
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    if kind == "fp8":
        # One dense and one MoE layer at DeepSeek-V3 sizes; experts fill the MoE layer up to the target.
        dims = real_dims(wanted - 3 * 18432 * 7168, per_expert=3 * 7168 * 2048)
        write_fp8_release(target, dims, shard_bytes=shard_mb << 20, scales_apart=False)
    else:
        # Kimi-K2-Thinking: int4 routed experts are ~97% of the bytes; one MoE layer, no dense one.
        dims = replace(real_dims(wanted, per_expert=3 * 7168 * 2048 // 2), layers=1, dense_layers=0)
        write_int4_release(target, dims, shard_bytes=shard_mb << 20)
    size = sum(shard_sizes(target).values())
    print(
        f"built {kind} source: {size / 1e9:.2f} GB in {len(shard_sizes(target))} shards "
        f"({time.perf_counter() - started:.0f} s) at {target}",
        flush=True,
    )
    return target


def real_dims(wanted: int, per_expert: int) -> Any:
    from support.synthetic_checkpoints import REAL_SIZES, Dims

    return Dims(**REAL_SIZES, layers=2, dense_layers=1, experts=max(2, round(wanted / per_expert)))


def bench(
    kind: str, src: Path, out: Path, workers: list[int], modes: list[str], skip_ct: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    largest_input = max(shard_sizes(src).values())
    ours, theirs, floor = out / f"{kind}-ktflow", out / f"{kind}-ct", out / f"{kind}-floor"
    for durable in (mode == "durable" for mode in modes):
        for count in workers:
            row = measure("ktflow", src, ours, count, durable, {})
            sizes = shard_sizes(ours)
            row["out_bytes"] = sum(sizes.values())
            rows.append(row)
            expected = digests(ours) if not skip_ct else {}
            shutil.rmtree(ours, ignore_errors=True)
            floors = [measure(tool, src, floor, count, durable, sizes) for tool in FLOORS]
            rows.append(
                min(floors, key=lambda r: r["seconds"]) | {"tool": "io-floor", "out_bytes": row["out_bytes"]}
            )
            shutil.rmtree(floor, ignore_errors=True)
            if not skip_ct:
                rows.append(
                    measure("compressed-tensors", src, theirs, count, durable, {})
                    | {"out_bytes": row["out_bytes"]}
                )
                got = digests(theirs)
                differ = sorted(
                    name for name in expected.keys() | got.keys() if expected.get(name) != got.get(name)
                )
                verdict = "bit-identical" if not differ else f"{len(differ)} DIFFER, e.g. {differ[:3]}"
                print(f"{kind} {row['mode']} workers={count}: {len(expected)} tensors, {verdict}", flush=True)
                shutil.rmtree(theirs, ignore_errors=True)
    for row in rows:
        row["kind"] = kind
        row["rss_bound"] = largest_input + RSS_MARGIN
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def find(like: dict[str, Any], **change: Any) -> dict[str, Any] | None:
        key = {name: like[name] for name in ("kind", "mode", "tool", "workers")} | change
        return next((r for r in rows if all(r[name] == value for name, value in key.items())), None)

    def ratio(base: dict[str, Any] | None, row: dict[str, Any], field: str) -> str:
        return f"{base[field] / row[field]:.2f}x" if base and row[field] else "-"

    lines = [
        f"{'format':6} {'mode':10} {'tool':18} {'workers':>7} {'seconds':>8} {'GB/s out':>8} {'vs CT':>7} "
        f"{'vs 1 wkr':>8} {'CPU s':>6} {'CPU vs CT':>9} {'peak RSS GB':>11} {'RSS bound GB':>12}"
    ]
    for row in rows:
        ct, one = find(row, tool="compressed-tensors"), find(row, workers=1)
        bound = f"{row['rss_bound'] / 1e9:.2f}" if row["tool"] == "ktflow" else ""
        lines.append(
            f"{row['kind']:6} {row['mode']:10} {row['tool']:18} {row['workers']:>7} {row['seconds']:>8.2f} "
            f"{row['out_bytes'] / row['seconds'] / 1e9:>8.2f} {ratio(ct, row, 'seconds'):>7} "
            f"{ratio(one, row, 'seconds'):>8} {row['cpu']:>6.2f} {ratio(ct, row, 'cpu'):>9} "
            f"{row['peak_rss'] / 1e9:>11.2f} {bound:>12}"
        )
    return "\n".join(lines)


def sources(args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    """(kind, synthetic source) for each format asked for; built unless kept, removed unless --keep."""
    for kind, size in (("fp8", args.fp8_gb), ("int4", args.int4_gb)):
        if size <= 0:
            continue
        src = args.out / f"{kind}-src"
        if not (args.keep and (src / "config.json").exists()):
            build(kind, src, size, args.shard_mb)
        yield kind, src
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fp8-gb", type=float, default=2.0, help="FP8 input size in GB (default 2)")
    parser.add_argument(
        "--int4-gb", type=float, default=1.0, help="INT4 expert bytes in GB (0 skips; default 1)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--shard-mb", type=int, default=128, help="input shard size in MiB (default 128)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["durable", "page-cache"],
        default=["durable", "page-cache"],
        help="durable: every tool timed until its output is fsynced; page-cache: no fsync",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "out" / "cast",
        help="sources and outputs (a tmpfs such as /dev/shm/x takes the disk out of the timing)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each run, wait up to this many seconds for idle CPUs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the synthetic sources for the next run")
    parser.add_argument("--skip-ct", action="store_true", help="skip compressed-tensors (quick runs)")
    parser.add_argument(
        "--disk",
        action="store_true",
        help="disk mode (benchmarks/cast_disk.py): the real CLI, start-up included, on a real file system, "
        "CT / ktflow 1 / ktflow 2 / I/O floor interleaved for --rounds rounds",
    )
    parser.add_argument("--rounds", type=int, default=5, help="with --disk: interleaved rounds (default 5)")
    parser.add_argument(
        "--warm-cache", action="store_true", help="with --disk: do not drop the page cache between runs"
    )
    parser.add_argument(
        "--reference-dir",
        type=Path,
        help="with --disk: a DeepSeek-V3 checkout's inference/ folder; adds its fp8_cast_bf16.py "
        "(GPU, Triton) to the FP8 runs",
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("TOOL", "SRC", "DST", "WORKERS", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, src, dst, workers, mode = args.child
        child(tool, Path(src), Path(dst), int(workers), mode == "durable")
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "tests"))  # support.synthetic_checkpoints
    if args.disk:
        from cast_disk import main_disk

        return main_disk(args, sources(args))
    load = os.getloadavg()[0]  # others' load: on a shared host, wall times are only as good as this
    global REPEAT, WAIT_IDLE
    REPEAT, WAIT_IDLE = max(1, args.repeat), args.wait_idle
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for kind, src in sources(args):
        rows += bench(kind, src, args.out, args.workers, args.modes, args.skip_ct)
    print(
        f"\n{os.cpu_count()} CPUs, load average {load:.1f} before the run; GB/s = output bytes / seconds; "
        "CPU s = user + system seconds of the process; RSS bound = largest input shard + 1 GiB\n"
    )
    print(table(rows))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Disk mode of benchmarks/cast.py (``--disk``): casts as a user runs them, on the real file system.

Every run is a whole process, timed from the outside with start-up included, until its output
is durable (fsynced): ``ktflow cast SRC DST --workers N`` exactly as a user types it,
compressed-tensors ``convert_checkpoint`` from a fresh interpreter (its output then fsynced, as
it never does), and the I/O floor (read every input byte once, write the bytes ktflow writes,
fsync, on 2 threads: the faster in each round of two patterns, O_DIRECT and through the page
cache). The tools run interleaved round after round (CT, ktflow 1, ktflow 2, floors, CT, ...) so
that a noisy moment hits one run, not one tool; medians and min-max are reported.

Before each run: earlier runs' dirty pages are synced, the page cache is dropped (as root), and
the Python libraries are read back by importing them in a throwaway process. So each run reads
its checkpoint from the disk, as for a 690 GB checkpoint that cannot sit in memory, while
interpreter start-up costs what it costs on a used machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("ktflow")
# `ktflow` as installed; `python -m ktflow` where the package is only on PYTHONPATH (the GPU host).
KTFLOW = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ktflow"]
# Libraries read back into the page cache before each run; those a host lacks are skipped.
WARM = (
    "import importlib\n"
    "for name in ('torch', 'safetensors', 'xxhash', 'ktflow.cast', 'ktflow.cli', "
    "'compressed_tensors.entrypoints.convert', 'triton'):\n"
    "    try: importlib.import_module(name)\n"
    "    except ImportError: pass\n"
)
# Tools whose output ktflow's must equal, tensor for tensor (the first one that ran).
REFERENCES = ("compressed-tensors", "deepseek-gpu")
# The 671B FP8 release (DeepSeek-V3 / Kimi-K2-Instruct): 163 shards.
FULL_IN_GB, FULL_OUT_GB = 690.0, 1300.0


def file_system(path: Path) -> str:
    """The file system type holding ``path`` (longest mount prefix in /proc/mounts)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fs_type, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fs_type
    return kind


def cold_cache(drop: bool) -> bool:
    """Sync, drop the page cache if allowed, then re-read the libraries; True when dropped."""
    os.sync()
    dropped = False
    if drop:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            dropped = True
        except OSError:
            pass
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-c", WARM], env=env, check=True, capture_output=True)
    return dropped


def commands(kind: str, src: Path, dst: Path, args: Any) -> dict[str, list[str]]:
    from cast import FLOORS

    child = [sys.executable, str(ROOT / "benchmarks" / "cast.py"), "--child"]
    tools: dict[str, list[str]] = {}
    if not args.skip_ct:
        tools["compressed-tensors"] = [*child, "compressed-tensors", str(src), str(dst), "1", "durable"]
    if args.reference_dir is not None and kind == "fp8":
        tools["deepseek-gpu"] = [*child, "deepseek-gpu", str(src), str(dst), "1", "durable"]
    for workers in args.workers:
        cast = [*KTFLOW, "cast", str(src), str(dst), "--no-progress"]
        tools[f"ktflow-{workers}"] = [*cast, "--workers", str(workers)]
    threads = str(max(2, *args.workers))
    for floor in FLOORS:
        tools[floor] = [*child, floor, str(src), str(dst), threads, "durable"]
    return tools


def run_once(command: list[str], dst: Path, env: dict[str, str], drop: bool) -> dict[str, Any]:
    """Wall seconds of the whole process, and its user / system CPU and peak RSS from GNU time
    (a small parent: ru_maxrss counts the parent's RSS at fork, and this one holds torch)."""
    shutil.rmtree(dst, ignore_errors=True)
    dropped = cold_cache(drop)
    usage = dst.with_name(dst.name + ".time")
    timed = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage), *command]
    started = time.perf_counter()
    done = subprocess.run(timed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{command} failed ({done.returncode}):\n{done.stderr.decode()[-3000:]}")
    user, system, peak_kb = usage.read_text().split()[-3:]
    usage.unlink()
    # ktflow logs its own clock, which starts after the imports: the rest is start-up.
    own = re.search(r"GB in ([0-9.]+) s", done.stderr.decode(errors="replace"))
    return {
        "seconds": seconds,
        "after_startup": float(own.group(1)) if own else None,
        "user": float(user),
        "sys": float(system),
        "peak_rss": int(peak_kb) * 1024,
        "cold": dropped,
    }


def planned_sizes(src: Path) -> dict[str, int]:
    from ktflow.cast.plan import build_plan

    return {shard.name: shard.size for shard in build_plan(src).shards}


def bench_disk(kind: str, src: Path, out: Path, args: Any) -> list[dict[str, Any]]:
    from cast import FLOORS, digests  # benchmarks/cast.py, on sys.path as the running script's folder

    sizes = planned_sizes(src)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), KTFLOW_BENCH_SIZES=json.dumps(sizes))
    if args.reference_dir is not None:
        env["KTFLOW_BENCH_REFERENCE"] = str(args.reference_dir.resolve())
    runs: dict[str, list[dict[str, Any]]] = {}
    found: dict[str, dict[str, Any]] = {}
    dst = out / f"{kind}-dst"
    tools = commands(kind, src, dst, args)
    compared = [tool for tool in tools if tool in REFERENCES] + [f"ktflow-{max(args.workers)}"]
    for round_ in range(args.rounds):
        for tool, command in tools.items():
            runs.setdefault(tool, []).append(run_once(command, dst, env, not args.warm_cache))
            if round_ == 0 and tool in compared:
                found[tool] = digests(dst)
            print(f"{kind} round {round_ + 1} {tool}: {runs[tool][-1]['seconds']:.2f} s", flush=True)
    shutil.rmtree(dst, ignore_errors=True)
    # The floor of each round is the faster of the two I/O patterns in that round.
    paired = zip(*(runs[floor] for floor in FLOORS), strict=True)
    runs["io-floor"] = [min(pair, key=lambda run: run["seconds"]) for pair in paired]
    ours = found[compared[-1]]
    for reference in compared[:-1]:
        theirs = found[reference]
        differ = sorted(n for n in theirs.keys() | ours.keys() if theirs.get(n) != ours.get(n))
        verdict = "bit-identical" if not differ else f"{len(differ)} DIFFER, e.g. {differ[:3]}"
        print(f"{kind}: ktflow vs {reference} outputs: {len(ours)} tensors, {verdict}", flush=True)
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return [summary(kind, tool, found, in_bytes, sum(sizes.values())) for tool, found in runs.items()]


def summary(
    kind: str, tool: str, runs: list[dict[str, Any]], in_bytes: int, out_bytes: int
) -> dict[str, Any]:
    seconds = [run["seconds"] for run in runs]
    return {
        "kind": kind,
        "tool": tool,
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "all": [round(s, 2) for s in seconds],
        "after_startup": statistics.median(run["after_startup"] or run["seconds"] for run in runs),
        "user": statistics.median(run["user"] for run in runs),
        "sys": statistics.median(run["sys"] for run in runs),
        "peak_rss": max(run["peak_rss"] for run in runs),
        "cold": all(run["cold"] for run in runs),
        "in_bytes": in_bytes,
        "out_bytes": out_bytes,
    }


def finite_check_cost(src: Path, scratch: Path, rounds: int) -> dict[str, float]:
    """CPU seconds (user + system) of in-process casts with and without the NaN / Inf check of the
    copied tensors, interleaved, warm input, output in ``scratch`` without fsync: the check's own cost
    (the FP8 NaN-code check reuses maxima the widening takes anyway; scales are tiny)."""
    import ktflow.cast.formats.base as formats
    from ktflow.cast import cast_checkpoint

    check = formats.count_nonfinite
    seconds: dict[str, list[float]] = {"with check": [], "without": []}
    try:
        for _ in range(rounds):
            for mode, counter in (("with check", check), ("without", lambda *_: 0)):
                formats.count_nonfinite = counter
                before = os.times()
                cast_checkpoint(src, scratch, progress=False, durable=False)
                after = os.times()
                seconds[mode].append(after.user - before.user + after.system - before.system)
                shutil.rmtree(scratch)
    finally:
        formats.count_nonfinite = check
    return {mode: statistics.median(values) for mode, values in seconds.items()}


def disk_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'format':6} {'tool':18} {'median s':>8} {'min-max s':>13} {'x floor':>7} {'CT / it':>7} "
        f"{'w/o start-up s':>14} "
        f"{'user s':>6} {'sys s':>6} {'peak RSS GB':>11} {'s per GB in':>11} {'671B proj. h':>12}"
    ]
    for row in rows:
        same = {r["tool"]: r for r in rows if r["kind"] == row["kind"]}
        floor = same["io-floor"]["median"]
        ct = same["compressed-tensors"]["median"] if "compressed-tensors" in same else float("nan")
        per_gb = row["median"] / (row["in_bytes"] / 1e9)
        lines.append(
            f"{row['kind']:6} {row['tool']:18} {row['median']:>8.2f} "
            f"{row['min']:>6.2f}-{row['max']:<6.2f} {row['median'] / floor:>7.2f} {ct / row['median']:>7.2f} "
            f"{row['after_startup']:>14.2f} "
            f"{row['user']:>6.2f} {row['sys']:>6.2f} {row['peak_rss'] / 1e9:>11.2f} {per_gb:>11.2f} "
            f"{per_gb * FULL_IN_GB / 3600:>12.2f}"
        )
    return "\n".join(lines)


def main_disk(args: Any, kinds: Iterable[tuple[str, Path]]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    fs_type = file_system(args.out)
    print(f"--out {args.out} is on {fs_type}", flush=True)
    if fs_type in ("tmpfs", "ramfs"):
        raise SystemExit("--disk measures a real disk: pick an --out on one (not tmpfs)")
    rows: list[dict[str, Any]] = []
    for kind, src in kinds:
        rows += bench_disk(kind, src, args.out, args)
        cost = finite_check_cost(src, args.out / f"{kind}-finite", args.rounds)
        print(f"{kind}: NaN / Inf check, median CPU s of the cast: {cost}", flush=True)
    state = "dropped before every run" if all(r["cold"] for r in rows) else "NOT dropped (warm)"
    print(
        f"\n{fs_type} at {args.out}; {os.cpu_count()} CPUs; {args.rounds} interleaved rounds; page cache "
        f"{state}; x floor = median / I/O floor median; CT / it = compressed-tensors median / this "
        f"median; 671B projection = s per GB in x {FULL_IN_GB:.0f} GB (linear in bytes, start-up "
        "included, so slightly pessimistic)\n"
    )
    print(f"load average {os.getloadavg()} at the end (others' work on a shared host slows CPU-bound runs)")
    print(disk_table(rows))
    (args.out / "results-disk.json").write_text(json.dumps(rows, indent=2))
    return 0

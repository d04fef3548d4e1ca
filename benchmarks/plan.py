"""Benchmark planning a large matrix and rerunning a finished run that has nothing to do.

Every case is a fresh process, timed end to end as a user would run it:

- ``baseline``: ``snakemake -n`` on the tiny default (1 model x 2 tasks);
- ``matrix``: ``snakemake -n`` on MODELS x TASKS x STAGES fine-tuning runs (default 4 x 4 x
  3: sft, dpo and kto on four tasks, for four hub models that are only named: planning
  never touches the network). The task files are small local files made here;
- ``no-op rerun``: ``snakemake`` on a finished tiny default run ("Nothing to be done");
- ``status``: ``ktflow status`` on that run.

The finished run is ``--finished DIR`` if given, else benchmarks/out/plan/default, which
is made once (a full default run, a few minutes) and kept for later runs.

    python benchmarks/plan.py [--repeat 3] [--models 4] [--tasks 4] [--stages sft dpo kto]
    python benchmarks/plan.py --finished /path/to/finished/workdir
    python benchmarks/plan.py --skip-noop          # planning only
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ktflow.readers.rows import load_rows
from ktflow.tiny.tasks import derive, write_task
from ktflow.train.stages import STAGE_FORMATS, default_format

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HUB_MODELS = (  # (repo id, BF16 size in GB): names for planning, never downloaded
    ("deepseek-ai/DeepSeek-V2-Lite", 31.4),
    ("deepseek-ai/DeepSeek-V3", 1370),
    ("moonshotai/Kimi-K2-Instruct", 2050),
    ("Qwen/Qwen3-30B-A3B", 61),
)
DEFAULT_FORMATS = {stage: default_format(stage) for stage in STAGE_FORMATS}


def matrix_config(root: Path, n_models: int, n_tasks: int, stages: list[str]) -> dict[str, Any]:
    """The default config, widened to the matrix; task files are written under ``root``."""
    config: dict[str, Any] = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    models = {}
    for i in range(n_models):
        repo_id, size = HUB_MODELS[i % len(HUB_MODELS)]
        models[f"m{i}"] = {"source": "hf", "repo_id": repo_id, "size_gb": size, "cpu_int8": i % 2 == 0}
    tasks = {}
    for i in range(n_tasks):
        kind = ("style", "choice")[i % 2]
        data = root / f"task{i}"
        write_task(kind, data, seed=i, n_train=16, n_test=4)
        rows = load_rows(data / "train.json")
        for stage in stages:
            spec: dict[str, Any] = {
                "kind": "generation" if kind == "style" else "mcq",
                "source": "file",
                "train_file": str(data / "train.json"),
                "test_file": str(data / "test.json"),
                "training": {"stage": stage, "format": DEFAULT_FORMATS[stage]},
            }
            if DEFAULT_FORMATS[stage] != "alpaca":
                derived = data / f"{stage}.json"
                derived.write_text(json.dumps(derive(kind, rows, DEFAULT_FORMATS[stage], seed=i)))
                spec["training"]["dataset"] = {"file": str(derived)}
            tasks[f"t{i}-{stage}"] = spec
    config.update(models=models, tasks=tasks, experiments={"models": list(models), "tasks": list(tasks)})
    return config


def timed(command: list[str], cwd: Path, repeat: int) -> tuple[float, str]:
    """Median wall seconds of ``repeat`` runs, and the last run's output."""
    seconds, out = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
        out = result.stdout + result.stderr
        if result.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{out[-3000:]}")
    return statistics.median(seconds), out


def dag_size(dry_run: str) -> int:
    """The job count in the "Job stats" table of a dry run (0 when nothing is to be done)."""
    totals = re.findall(r"^total\s+(\d+)$", dry_run, re.M)
    return int(totals[-1]) if totals else 0


def snakemake(workdir: Path, *args: str) -> list[str]:
    config = str(workdir / "config.yaml")
    return [
        str(BIN / "snakemake"),
        "-s",
        str(REPO / "Snakefile"),
        "--configfile",
        config,
        "--cores",
        "2",
        *args,
    ]


def default_run(path: Path) -> Path:
    if not (path / "results" / "tables" / "generation.csv").is_file():
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "config" / "config.yaml", path / "config.yaml")
        print(f"making the finished default run in {path} (once; a few minutes) ...", file=sys.stderr)
        subprocess.run(snakemake(path, "--cache"), cwd=path, check=True, capture_output=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is shown)")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_FORMATS), choices=list(DEFAULT_FORMATS))
    parser.add_argument("--finished", type=Path, help="a finished default run (default: made once)")
    parser.add_argument("--skip-noop", action="store_true", help="time planning only")
    args = parser.parse_args()

    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="ktflow-plan-") as tmp:
        base = Path(tmp) / "default"
        base.mkdir()
        shutil.copy(REPO / "config" / "config.yaml", base / "config.yaml")
        seconds, out = timed(snakemake(base, "-n"), base, args.repeat)
        rows.append(("baseline: -n, tiny default", dag_size(out), seconds))
        matrix = Path(tmp) / "matrix"
        matrix.mkdir()
        config = matrix_config(matrix, args.models, args.tasks, args.stages)
        (matrix / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        seconds, out = timed(snakemake(matrix, "-n"), matrix, args.repeat)
        label = f"matrix: -n, {args.models} models x {args.tasks} tasks x {len(args.stages)} stages"
        rows.append((label, dag_size(out), seconds))
    if not args.skip_noop:
        finished = args.finished or default_run(REPO / "benchmarks" / "out" / "plan" / "default")
        seconds, out = timed(snakemake(finished, "--cache"), finished, args.repeat)
        if "Nothing to be done" not in out:
            sys.exit(f"{finished} is not a finished run of the current config and code:\n{out[-2000:]}")
        rows.append(("no-op rerun of the finished default", 0, seconds))
        status = [str(BIN / "ktflow"), "status", "--snakefile", str(REPO / "Snakefile"),
                  "--configfile", str(finished / "config.yaml"), "--only-changes"]  # fmt: skip
        seconds, _ = timed(status, finished, args.repeat)
        rows.append(("ktflow status of the finished default", 0, seconds))

    baseline = rows[0][2]
    print(f"{'case':<58} {'jobs':>6} {'seconds':>8} {'x baseline':>10}")
    for label, jobs, seconds in rows:
        print(f"{label:<58} {jobs if jobs else '-':>6} {seconds:>8.2f} {seconds / baseline:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

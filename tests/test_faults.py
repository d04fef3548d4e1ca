"""Faults: SIGKILL at random moments in every rule, a full disk, and a results directory we may not write.

The kill test runs the reduced tiny default (see test_determinism) and, rule by rule in DAG
order, starts ``snakemake --until <rule>`` in its own session, waits for the rule's
``ktflow <step>`` process, sleeps a seeded random fraction of that rule's duration in an
uninterrupted run, and SIGKILLs the whole session. After each kill it checks what a user
would rely on: ``snakemake -n`` (``--rerun-incomplete`` comes from the default profile)
schedules the killed job again, and every declared output that is *not* scheduled is
complete (JSON parses, safetensors headers and tensors read, row counts match). Then
``snakemake --unlock`` (a SIGKILL leaves Snakemake's lock behind) and the next rule. Finally
the run is completed and its tables must equal those of the uninterrupted run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import yaml
from conftest import ktflow_env, snakemake_command
from test_determinism import (
    clean_run,
    result_files,
    run_env,
    snakemake,
    write_reduced_config,
)

from ktflow.atomic import atomic_file, sweep_stale, write_json
from ktflow.cast.verify import verify_checkpoint
from ktflow.readers.snapshot import validate_snapshot

# Kills per rule (each a fresh `snakemake --until <rule>`); raise it for a longer soak.
KILLS_PER_RULE = int(os.environ.get("KTFLOW_FAULT_KILLS", "2"))
# Short jobs (a fraction of a second) can end before the kill: try again, a little earlier.
MAX_ATTEMPTS = KILLS_PER_RULE + 4
# rule -> how its process is told apart: (ktflow step, a word its command line must hold, or None)
KILLED_RULES: dict[str, tuple[str, str | None]] = {
    "tiny_model": ("tiny-model", None),
    "tiny_tasks": ("tiny-tasks", None),
    "fetch": ("fetch", None),
    "cast": ("cast", None),
    "train": ("train", None),
    "convert_lora": ("convert-lora", None),
    "infer": ("infer", None),
    "evaluate": ("evaluate", None),
    "tables": ("tables", "--out-dir"),
    "tables_html": ("tables", "--page"),
    "plots": ("plots", None),
}
START_TIMEOUT_S = 300


@dataclass
class Kill:
    rule: str
    attempt: int
    delay_s: float
    landed: bool  # the rule's process was still running when the session was killed
    command: list[str]
    rescheduled: list[str] = field(default_factory=list)
    checked: int = 0  # declared outputs not scheduled again, each verified complete
    problems: list[str] = field(default_factory=list)


@dataclass
class FaultRun:
    workdir: Path
    reference: Path
    kills: list[Kill]
    seconds: float


# ---- checking what is on disk ---------------------------------------------------------------------


def _png_complete(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), "truncated PNG"


def _tensors_readable(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
            handle.get_tensor(key)


def _rows(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return len([json.loads(line) for line in text.splitlines() if line.strip()])
    data = json.loads(text)
    return len(data) if isinstance(data, list) else 1


def check_complete(path: Path, config: dict[str, Any]) -> None:
    """Raise AssertionError (or a parse error) unless ``path`` is a complete artifact."""
    parts = path.parts
    if path.is_dir():
        if (path / "cast_complete.json").exists() or parts[-1] == "bf16":
            assert (path / "cast_complete.json").is_file(), "cast output without its completion marker"
            report = verify_checkpoint(path)
            assert report.ok, report.problems[:3]
        elif (path / "adapter_model.safetensors").exists() or "lora" in parts:
            _tensors_readable(path / "adapter_model.safetensors")
            json.loads((path / "adapter_config.json").read_text())
        else:
            validate_snapshot(path)
        for inner in path.rglob("*.json"):
            if not any(part.startswith(".") for part in inner.relative_to(path).parts):
                json.loads(inner.read_text())
        return
    if path.suffix in (".json", ".jsonl"):
        rows = _rows(path)
        task = next((t for t in config["tasks"] if t in parts), None)
        if "provenance" in path.name:
            assert rows == 1
        elif task is not None and ("predictions" in parts or path.name.endswith(".samples.jsonl")):
            assert rows == config["tasks"][task]["tiny"]["n_test"], f"{rows} rows"
        elif task is not None and "data" in parts:
            assert rows == config["tasks"][task]["tiny"]["n_" + path.stem], f"{rows} rows"
    elif path.suffix == ".csv":
        assert len(pd.read_csv(path)) > 0
    elif path.suffix == ".html":
        assert path.read_text().rstrip().endswith(("</html>", "</table>"))
    elif path.suffix == ".png":
        _png_complete(path)


def declared_outputs(workdir: Path) -> dict[str, str]:
    """Every declared output of the full DAG -> its rule (Snakemake's detailed summary)."""
    lines = snakemake(workdir, "--detailed-summary").stdout.splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line.strip()]
    return {row["output_file"]: row["rule"] for row in rows}


def scheduled_outputs(workdir: Path) -> set[str]:
    """Outputs of every job a dry run (with the profile's --rerun-incomplete) would run."""
    out = snakemake(workdir, "-n").stdout
    scheduled: set[str] = set()
    for line in out.splitlines():
        if line.startswith("    output: "):
            scheduled.update(part.strip() for part in line.removeprefix("    output: ").split(","))
    return scheduled


def check_after_kill(workdir: Path, kill: Kill, config: dict[str, Any]) -> None:
    declared, scheduled = declared_outputs(workdir), scheduled_outputs(workdir)
    tokens = set(kill.command)
    for output, rule in declared.items():
        killed = rule == kill.rule and (output in tokens or str(Path(output).parent) in tokens)
        path = workdir / output
        if killed and kill.landed:
            kill.rescheduled.append(output)
            if output not in scheduled:
                kill.problems.append(f"{output}: killed mid-job but not scheduled again")
        if output in scheduled or not path.exists():
            continue
        try:
            check_complete(path, config)
            kill.checked += 1
        except Exception as error:
            kill.problems.append(f"{output}: taken as complete but {type(error).__name__}: {error}")


# ---- killing --------------------------------------------------------------------------------------


def rule_process(session: psutil.Process, step: str, word: str | None) -> psutil.Process | None:
    """The rule's ``ktflow <step>`` process among the session's descendants."""
    try:
        children = session.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            argv = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        for index, arg in enumerate(argv[:3]):
            is_step = Path(arg).name == "ktflow" and argv[index + 1 : index + 2] == [step]
            if is_step and (word is None or word in argv):
                return child
    return None


def job_tokens(job: psutil.Process) -> list[str]:
    """The job's words: the ktflow command line and the shell command around it (its log, a final mv)."""
    words: list[str] = list(job.cmdline())
    with contextlib.suppress(psutil.Error, ValueError):
        parent = job.parent()
        shell = parent.cmdline() if parent is not None else []
        if len(shell) >= 3 and shell[1] == "-c":
            words = words + shlex.split(shell[2].replace(";", " ; "))
    return words


def reference_seconds(reference: Path) -> dict[str, tuple[str, float]]:
    """Declared output -> (rule, seconds its job took) in the clean run, from Snakemake's own metadata."""
    found: dict[str, tuple[str, float]] = {}
    for meta in (reference / ".snakemake" / "metadata").iterdir():
        record = json.loads(meta.read_text())
        output = base64.urlsafe_b64decode(meta.name).decode()
        found[output] = (record["rule"], float(record["endtime"]) - float(record["starttime"]))
    return found


def job_seconds(durations: dict[str, tuple[str, float]], rule: str, tokens: set[str]) -> float:
    """This job's duration in the clean run (the rule's longest job when it cannot be told apart)."""
    mine = {out: seconds for out, (r, seconds) in durations.items() if r == rule}
    same = [s for out, s in mine.items() if out in tokens or str(Path(out).parent) in tokens]
    return max(same or mine.values() or [1.0])


class Delays:
    """Seeded random kill moments within a job's expected lifetime, learned down when a job ends early."""

    def __init__(self, reference: Path, seed: int) -> None:
        self.durations = reference_seconds(reference)
        self.rng = random.Random(seed)
        self.lifetime: dict[str, float] = {}  # the shortest life seen of each rule's process

    def draw(self, rule: str, tokens: set[str]) -> float:
        expected = min(job_seconds(self.durations, rule, tokens), self.lifetime.get(rule, float("inf")))
        return self.rng.uniform(0.05, 0.8) * expected

    def ended_after(self, rule: str, seconds: float) -> None:
        self.lifetime[rule] = min(self.lifetime.get(rule, float("inf")), seconds)


def kill_once(workdir: Path, rule: str, attempt: int, delays: Delays) -> Kill | None:
    """Run up to ``rule``, SIGKILL the session while its job runs; None if the rule had nothing to do.

    Later attempts force the rule to run again, whether or not an earlier kill left it unfinished.
    """
    step, word = KILLED_RULES[rule]
    force = ["--forcerun", rule] if attempt > 0 else []
    log = open(workdir / f"kill-{rule}-{attempt}.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        snakemake_command(workdir, "--until", rule, *force), cwd=workdir, env=run_env(),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        session = psutil.Process(process.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        target = None
        while target is None and process.poll() is None and time.monotonic() < deadline:
            target = rule_process(session, step, word)
            time.sleep(0.002)
        if target is None:
            assert process.poll() is not None, f"{rule}: its job did not start within {START_TIMEOUT_S}s"
            assert process.returncode == 0, (workdir / f"kill-{rule}-{attempt}.log").read_text()[-3000:]
            return None
        seen = time.monotonic()
        command = job_tokens(target)
        delay = delays.draw(rule, set(command))
        landed = True
        while time.monotonic() - seen < delay:
            if landed and not (target.is_running() and target.status() != psutil.STATUS_ZOMBIE):
                landed = False  # ended early: this kill hits Snakemake's bookkeeping instead
                delays.ended_after(rule, time.monotonic() - seen)
            time.sleep(0.002)
        landed = landed and target.is_running() and target.status() != psutil.STATUS_ZOMBIE
        os.killpg(process.pid, signal.SIGKILL)
        return Kill(rule, attempt, round(delay, 3), landed, command)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> FaultRun:
    """Kill every rule until KILLS_PER_RULE kills landed mid-job (at most MAX_ATTEMPTS tries)."""
    reference = clean_run(tmp_path_factory, 0)
    workdir = tmp_path_factory.mktemp("faults")
    write_reduced_config(workdir)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    delays = Delays(reference, seed=20261122)
    started = time.monotonic()
    kills: list[Kill] = []
    for rule in KILLED_RULES:
        for attempt in range(MAX_ATTEMPTS):
            kill = kill_once(workdir, rule, attempt, delays)
            if kill is None:
                break
            check_after_kill(workdir, kill, config)
            snakemake(workdir, "--unlock")
            kills.append(kill)
            if sum(k.landed for k in kills if k.rule == rule) >= KILLS_PER_RULE:
                break
    snakemake(workdir)
    run = FaultRun(workdir, reference, kills, round(time.monotonic() - started, 1))
    report = [vars(kill) | {"command": shlex.join(kill.command[1:6])} for kill in kills]
    (workdir / "kills.json").write_text(json.dumps(report, indent=1))
    print(f"\nfault run: {len(kills)} kills in {run.seconds}s", file=sys.stderr)
    for rule in KILLED_RULES:
        mine = [k for k in kills if k.rule == rule]
        landed, checked = sum(k.landed for k in mine), sum(k.checked for k in mine)
        print(
            f"  {rule:20s} kills {len(mine)}  mid-job {landed}  outputs verified {checked}", file=sys.stderr
        )
    return run


@pytest.mark.slow
def test_every_rule_is_killed_mid_job_and_the_run_still_completes(fault_run: FaultRun) -> None:
    for rule in KILLED_RULES:
        mine = [kill for kill in fault_run.kills if kill.rule == rule]
        assert len(mine) >= KILLS_PER_RULE, rule
        assert any(kill.landed for kill in mine), f"{rule}: no kill landed while its job ran"
    assert "Nothing to be done" in snakemake(fault_run.workdir, "-n").stdout


@pytest.mark.slow
def test_no_partially_written_artifact_is_ever_taken_as_complete(fault_run: FaultRun) -> None:
    assert [problem for kill in fault_run.kills for problem in kill.problems] == []
    assert all(kill.rescheduled for kill in fault_run.kills if kill.landed)
    assert sum(kill.checked for kill in fault_run.kills) > 50


@pytest.mark.slow
def test_final_tables_equal_those_of_an_uninterrupted_run(fault_run: FaultRun) -> None:
    killed, clean = (
        result_files(run, "tables", "report") for run in (fault_run.workdir, fault_run.reference)
    )
    assert killed and killed == clean


@pytest.mark.slow
def test_final_predictions_and_metrics_equal_those_of_an_uninterrupted_run(fault_run: FaultRun) -> None:
    killed, clean = (
        result_files(run, "predictions", "metrics") for run in (fault_run.workdir, fault_run.reference)
    )
    assert killed and sorted(k for k in killed if killed[k] != clean.get(k)) == []


@pytest.mark.slow
def test_killed_writers_leave_no_temp_files_behind(fault_run: FaultRun) -> None:
    """Temp siblings of killed writers are swept by the next write of the same target."""
    results = fault_run.workdir / "results"
    stale = [
        str(path.relative_to(results))
        for path in results.rglob(".*")
        if path.name.endswith((".tmp", ".old", ".partial")) and ".work" not in path.parts
    ]
    assert stale == []


# ---- a full disk and a results directory we may not write -----------------------------------------


@dataclass(frozen=True)
class Step:
    """A step run against an existing results tree; ``earlier`` are artifacts it must leave untouched."""

    argv: Callable[[Path, Path, Path], list[str]]  # (results dir, the bf16 model, the release) -> ktflow args
    output: str  # relative to results; its earlier version must survive
    locked: str  # the directory made unwritable (relative to results)


PREDICTIONS = [{"id": f"q{n}", "prompt": "Which?", "predict": "A", "label": "AB"[n % 2]} for n in range(6)]
METRICS = '{"accuracy": 0.25, "n": 4}\n'


def seed_results(results: Path, release: Path) -> None:
    """Earlier artifacts: predictions, metrics, a fetched release, data."""
    pred = results / "predictions/tiny-v3/choice/base.jsonl"
    pred.parent.mkdir(parents=True)
    pred.write_text("".join(json.dumps(row) + "\n" for row in PREDICTIONS))
    (results / "metrics/tiny-v3/choice").mkdir(parents=True)
    (results / "metrics/tiny-v3/choice/base.json").write_text(METRICS)
    shutil.copytree(release, results / "models/tiny-v3/release")
    (results / "data/choice").mkdir(parents=True)
    (results / "data/choice/test.json").write_text(
        json.dumps([{"id": "a", "instruction": "Hi.", "output": "A"}])
    )


STEPS = {
    "evaluate": Step(
        lambda r, m, s: ["evaluate", f"{r}/predictions/tiny-v3/choice/base.jsonl", "--task", "mcq",
                         "-o", f"{r}/metrics/tiny-v3/choice/base.json"],
        "metrics/tiny-v3/choice/base.json", "metrics/tiny-v3/choice",
    ),
    "fetch": Step(
        lambda r, m, s: ["fetch", f"{r}/models/tiny-v3/release", "--source", "local", "--path", str(s),
                         "--no-hardlink"],
        "models/tiny-v3/release", "models/tiny-v3",
    ),
    "cast": Step(
        lambda r, m, s: ["cast", f"{r}/models/tiny-v3/release", f"{r}/models/tiny-v3/bf16", "--no-progress"],
        "models/tiny-v3/release", "models/tiny-v3",
    ),
    "tables": Step(
        lambda r, m, s: ["tables", f"m:choice:base={r}/metrics/tiny-v3/choice/base.json", "--spec",
                         '{"tasks": {"choice": "mcq"}}', "--out-dir", f"{r}/tables"],
        "metrics/tiny-v3/choice/base.json", ".",
    ),
    "infer": Step(
        lambda r, m, s: ["infer", str(m), f"{r}/data/choice/test.json",
                         f"{r}/predictions/tiny-v3/choice/base.jsonl", "--spec", '{"max_new_tokens": 2}'],
        "predictions/tiny-v3/choice/base.jsonl", "predictions/tiny-v3/choice",
    ),
}  # fmt: skip


def step_params(xfails: dict[str, str]) -> list[Any]:
    return [
        pytest.param(
            name, marks=[pytest.mark.xfail(strict=True, reason=xfails[name])] if name in xfails else []
        )
        for name in STEPS
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(stderr: str, step: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"ktflow {step}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
        capture_output=True, check=False,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare + tmpfs mounts (user namespaces)")
@pytest.mark.parametrize("name", step_params({}))
def test_full_disk_gives_one_message_and_keeps_earlier_artifacts(
    name: str, tmp_path: Path, tiny_release: Path, tiny_bf16: Path
) -> None:
    """The results tree sits on a tmpfs (in a private mount namespace) filled to the last byte."""
    seed, results, after = tmp_path / "seed", tmp_path / "results", tmp_path / "after"
    results.mkdir()
    seed_results(seed, tiny_release)
    step = STEPS[name]
    argv = [sys.executable, "-m", "ktflow", *step.argv(results, tiny_bf16, tiny_release)]
    script = f"""
        set -e
        mount -t tmpfs -o size=16m ktflow-full {results}
        cp -a {seed}/. {results}/
        dd if=/dev/zero of={results}/filler bs=64k 2>/dev/null || true
        set +e
        {shlex.join(argv)} 2> {tmp_path}/stderr
        echo $? > {tmp_path}/rc
        rm -f {results}/filler
        cp -a {results}/. {after}/
    """
    subprocess.run(
        ["unshare", "--mount", "--map-root-user", "bash", "-c", script],
        env=ktflow_env(),
        check=True,
        timeout=300,
    )
    stderr = (tmp_path / "stderr").read_text()
    assert int((tmp_path / "rc").read_text()) == 2, stderr[-3000:]
    line = one_error_line(stderr, argv[3])
    assert str(results) in line and ("space" in line or "quota" in line), line
    assert snapshot(after) == snapshot(seed), "earlier artifacts changed or temp files were left"


def unprivileged(argv: list[str]) -> list[str]:
    """As root, drop the capabilities that bypass file permissions; otherwise run as is."""
    if os.geteuid() != 0:
        return argv
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv")
@pytest.mark.parametrize("name", step_params({}))
def test_denied_write_gives_one_message_and_keeps_earlier_artifacts(
    name: str, tmp_path: Path, tiny_release: Path, tiny_bf16: Path
) -> None:
    results = tmp_path / "results"
    seed_results(results, tiny_release)
    before = snapshot(results)
    step = STEPS[name]
    locked = results / step.locked
    os.chmod(locked, 0o555)
    try:
        argv = [sys.executable, "-m", "ktflow", *step.argv(results, tiny_bf16, tiny_release)]
        result = subprocess.run(
            unprivileged(argv), capture_output=True, text=True, env=ktflow_env(), check=False
        )
    finally:
        os.chmod(locked, 0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr, argv[3])
    assert str(results) in line and "permission denied" in line, line
    assert snapshot(results) == before, "earlier artifacts changed or temp files were left"


def test_stale_temp_files_of_killed_writers_are_swept(tmp_path: Path) -> None:
    """A SIGKILLed writer leaves its temp sibling; the next write of that target removes it."""
    target = tmp_path / "out" / "metrics.json"
    code = (
        "import os, sys, time\n"
        "from ktflow.atomic import atomic_file\n"
        f"with atomic_file({str(target)!r}) as handle:\n"
        "    handle.write('{\"half\": ')\n"
        "    handle.flush()\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ktflow_env()
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    stale = [p for p in target.parent.iterdir() if p.name.startswith(".metrics.json.")]
    assert len(stale) == 1 and not target.exists()
    write_json(target, {"done": True})
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    assert json.loads(target.read_text()) == {"done": True}


def test_a_live_writer_is_never_swept(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with atomic_file(target) as handle:
        handle.write("{}")
        assert sweep_stale(target) == []  # our own, alive
        assert len(list(tmp_path.iterdir())) == 1
    assert target.read_text() == "{}"

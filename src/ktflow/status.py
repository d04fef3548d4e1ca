"""``ktflow status``: for the current config, which steps are up to date, which would rerun, and why.

Nothing is run. Snakemake is asked twice, at the same time: ``--detailed-summary`` lists
every output of the DAG with the rule that makes it and the inputs it was made from, and
``--dry-run`` gives the reason for each job that would run (both are exact; ``--list-changes
params`` is not: it reports outputs whose params differ from any earlier run, even ones a
later run rebuilt). A
params change is shown as the config keys that changed (``lora.rank: 16 -> 8``) instead of
Snakemake's raw before/now value sets, and a job whose output is already in the
between-workflow cache is marked as restored rather than recomputed.

Each rule carries its step's code version (:mod:`ktflow.code_version`) as a param; a
changed one is shown as "code of `ktflow <command>` changed".
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ktflow.code_version import CODE_PREFIX
from ktflow.errors import KtflowInputError

_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
_FROM_CACHE = re.compile(r"Output file (.+) will be obtained from global between-workflow cache\.")
_PARAMS = re.compile(r"before: (?P<old>.*?) now: (?P<new>.*)$", re.S)
# Snakemake's reason phrases (snakemake.jobs.Reason.__str__) and how status words them.
_PHRASES = {
    "Missing output files": "missing output",
    "Incomplete output files": "incomplete output (interrupted run)",
    "Updated input files": "input newer than output",
    "Set of input files has changed since last execution": "set of inputs changed",
    "Code has changed since last execution": "rule's command changed",
    "Software environment definition has changed since last execution": "software environment changed",
}


# ---- what Snakemake says ------------------------------------------------------------------------


@dataclass
class Step:
    rule: str
    outputs: list[str] = field(default_factory=list)
    reason: str = ""  # Snakemake's reason; empty when up to date
    why: list[str] = field(default_factory=list)  # the reason, explained
    from_cache: bool = False

    @property
    def state(self) -> str:
        if not self.reason:
            return "up to date"
        return "restore" if self.from_cache else "rerun"


def parse_dry_run(text: str) -> list[Step]:
    """Jobs (with outputs) in ``snakemake --dry-run`` output, with their reasons."""
    steps: list[Step] = []
    current: Step | None = None
    cached: set[str] = set()
    for line in text.splitlines():
        if match := _JOB.match(line):
            current = Step(match[1])
            steps.append(current)
        elif match := _FROM_CACHE.search(line):
            cached.add(match[1])
        elif current is not None and line.startswith("    "):
            key, _, value = line.strip().partition(": ")
            if key == "output":
                current.outputs = [item.strip() for item in value.split(", ")]
            elif key == "reason":
                current.reason = value.strip()
        else:
            current = None
    for step in steps:
        step.from_cache = bool(step.outputs) and step.outputs[0] in cached
    return [step for step in steps if step.outputs]


@dataclass(frozen=True)
class Row:
    """One output in ``snakemake --detailed-summary``; inputs as recorded by its last run."""

    output: str
    rule: str
    log: str
    inputs: tuple[str, ...]


def parse_summary(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) >= 8 and cells[0] != "output_file":
            inputs = tuple(cells[4].split(",")) if cells[4] != "-" else ()
            rows.append(Row(cells[0], cells[2], cells[3], inputs))
    return rows


def merge(rows: list[Row], dry_run: list[Step]) -> list[Step]:
    """One Step per job, upstream first: the dry run's jobs plus the summary's other outputs.

    The summary names no jobs; the outputs of one job share its log file (every rule has one).
    """
    job_of = {output: step for step in dry_run for output in step.outputs}
    grouped: dict[tuple[str, str], Step] = {}
    for row in rows:
        if row.output not in job_of:
            step = grouped.setdefault((row.rule, row.log if row.log != "-" else row.output), Step(row.rule))
            step.outputs.append(row.output)
            job_of[row.output] = step
    steps = list({id(step): step for step in job_of.values()}.values())
    needs: dict[int, set[int]] = {id(step): set() for step in steps}
    for row in rows:
        for path in row.inputs:
            if path in job_of and job_of[path] is not job_of[row.output]:
                needs[id(job_of[row.output])].add(id(job_of[path]))
    return _upstream_first(steps, needs)


def _upstream_first(steps: list[Step], needs: dict[int, set[int]]) -> list[Step]:
    ordered: list[Step] = []
    done: set[int] = set()
    pending = list(reversed(steps))  # Snakemake lists consumers first
    while pending:
        ready = [s for s in pending if needs[id(s)] <= done] or pending[:1]  # a cycle cannot stall it
        for step in ready:
            ordered.append(step)
            done.add(id(step))
            pending.remove(step)
    return ordered


# ---- reasons, explained -------------------------------------------------------------------------


def _values(text: str) -> list[Any]:
    text = text.strip()
    if not text or text == "<nothing exclusive>":
        return []
    try:
        parsed = ast.literal_eval(f"[{text}]")
    except (SyntaxError, ValueError):
        return [text]
    return list(parsed)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _as_config(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return _flatten(value) if isinstance(value, dict) else None


def _short(value: Any, width: int = 48) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            changes.append(f"{key} removed (was {_short(old[key])})")
        elif key not in old:
            changes.append(f"{key} added ({_short(new[key])})")
        elif old[key] != new[key]:
            changes.append(f"{key}: {_short(old[key])} -> {_short(new[key])}")
    return changes


def _code_versions(values: list[Any]) -> dict[str, Any]:
    return {
        value.removeprefix(CODE_PREFIX).split(":")[0]: value
        for value in values
        if isinstance(value, str) and value.startswith(CODE_PREFIX)
    }


def explain_params(text: str) -> list[str]:
    """Snakemake's "before: ... now: ..." value sets as changed config keys and code versions."""
    match = _PARAMS.search(text)
    if match is None:
        return [f"params changed: {text}"]
    old, new = _values(match["old"]), _values(match["new"])
    old_code, new_code = _code_versions(old), _code_versions(new)
    found = [f"code of `ktflow {command}` changed" for command in sorted(old_code.keys() | new_code.keys())]
    old = [v for v in old if v not in old_code.values()]
    new = [v for v in new if v not in new_code.values()]
    new_configs = [(v, c) for v in new if (c := _as_config(v)) is not None]
    for value in list(old):
        config = _as_config(value)
        if config is None or not new_configs:
            continue
        # The new value that shares most keys with this old one is its successor.
        successor = max(new_configs, key=lambda item: len(config.keys() & item[1].keys()))
        new_configs.remove(successor)
        found.extend(_diff(config, successor[1]))
        old.remove(value)
        new.remove(successor[0])
    if old or new:
        found.append(f"param {', '.join(map(_short, old)) or '-'} -> {', '.join(map(_short, new)) or '-'}")
    return found or ["params changed"]


def explain(reason: str, producers: dict[str, str]) -> list[str]:
    """Snakemake's reason as short phrases; upstream reruns are named by rule."""
    why: list[str] = []
    for part in re.split(r"; (?=[A-Z])", reason):
        head, _, rest = part.partition(": ")
        if head == "Params have changed since last execution":
            why.extend(explain_params(rest))
        elif head == "Input files updated by another job":
            rules = sorted({producers.get(f.strip(), f.strip()) for f in rest.split(", ")})
            why.append(f"after {', '.join(rules)}")
        elif head in _PHRASES:
            why.append(_PHRASES[head] + (f": {rest}" if rest and head.startswith("Updated") else ""))
        else:
            why.append(part)
    return why


# ---- the command --------------------------------------------------------------------------------


def snakemake_base(args: argparse.Namespace) -> list[str]:
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(args.snakefile)]
    if args.directory is not None:
        base += ["--directory", str(args.directory)]
    if args.configfile:
        base += ["--configfile", *map(str, args.configfile)]
    return base + list(args.snakemake_args)


def ask_snakemake(base: list[str]) -> tuple[str, str]:
    """(summary, dry run) text, both asked at once."""
    queries = {
        "summary": [*base, "--detailed-summary"],
        "dry-run": [*base, "--dry-run", "--cores", "1"],
    }
    running = {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, command in queries.items()
    }
    texts = {}
    for name, process in running.items():
        texts[name], _ = process.communicate()
        if process.returncode != 0:
            lines = [line for line in texts[name].splitlines() if line.strip()]
            # The workflow's own config errors are one line naming the file and key.
            config_error = [line for line in lines if line.startswith("ktflow: invalid config: ")]
            if config_error:
                raise KtflowInputError(None, None, config_error[0].removeprefix("ktflow: invalid config: "))
            raise KtflowInputError(None, f"snakemake {name}", "failed:\n" + "\n".join(lines[-12:]))
    return texts["summary"], texts["dry-run"]


def status(summary_text: str, dry_run_text: str) -> list[Step]:
    steps = merge(parse_summary(summary_text), parse_dry_run(dry_run_text))
    producers = {output: step.rule for step in steps for output in step.outputs}
    for step in steps:
        if step.reason:
            step.why = explain(step.reason, producers)
    return steps


def render(steps: Iterable[Step], only_changes: bool) -> str:
    steps = list(steps)
    rerun = [s for s in steps if s.reason]
    restored = sum(s.from_cache for s in rerun)
    lines = [
        f"{len(steps) - len(rerun)} steps up to date, {len(rerun) - restored} would run"
        + (f", {restored} would be restored from the cache" if restored else "")
    ]
    shown = rerun if only_changes else steps
    if shown:
        width = max(len(s.rule) for s in shown)
        out_width = min(max(len(s.outputs[0]) for s in shown), 60)
        lines.append("")
        for step in shown:
            why = "; ".join(step.why)
            row = f"{step.rule:<{width}}  {step.outputs[0]:<{out_width}}  {step.state:<10}  {why}"
            lines.append(row.rstrip())
    return "\n".join(lines)

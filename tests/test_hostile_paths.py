"""Config paths reach the rules' shell commands quoted: spaces, quotes, ``$()`` and backticks.

The whole DAG is planned (``snakemake -n -p``) with a results directory, a local model, a
file task's train/test files and a raw task's file all named with shell metacharacters,
and every printed command must keep each of those paths as one intact word. The cheap
rules (fetch, cast, tiny_tasks, prepare_task) then really run on those paths, and
the commands hidden in the names must not have run. A slow test runs the whole reduced DAG
(every rule, for real) on the same paths.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, snakemake
from test_determinism import REDUCED, deep_merge

# Each piece would break an unquoted command: a space splits it, quotes open strings,
# $() and backticks run a command (which would create a "pwned-*" file in the job's cwd).
HOSTILE = "a b 'q' \"dq\" $(touch pwned-dollar) `touch pwned-tick`"
RESULTS = f"res {HOSTILE}"
RULES = (
    "fetch", "cast", "tiny_tasks", "prepare_task", "train", "convert_lora", "infer",
    "evaluate", "tables", "tables_html", "plots",
)  # fmt: skip


def hostile_workdir(workdir: Path, release: Path, tasks: Path) -> dict[str, str]:
    """A config whose every path holds HOSTILE; returns the paths that must stay whole."""
    model = workdir / f"models {HOSTILE}" / "tiny"
    shutil.copytree(release, model)
    data = workdir / f"data {HOSTILE}"
    shutil.copytree(tasks / "style", data)
    raw = data / "raw.json"
    raw.write_text((data / "train.json").read_text())
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["results"] = RESULTS
    config["models"]["tiny-v3"] = {"source": "local", "path": str(model.relative_to(workdir))}
    config["tasks"] = {
        "style": {
            "kind": "generation",
            "source": "file",
            "train_file": str((data / "train.json").relative_to(workdir)),
            "test_file": str((data / "test.json").relative_to(workdir)),
        },
        "choice": {"kind": "mcq", "source": "tiny", "tiny": {"n_train": 16, "n_test": 4}},
        "neko": {
            "kind": "generation",
            "source": "raw",
            "adapter": "alpaca",
            "raw_file": str(raw.relative_to(workdir)),
            "split": {"method": "random", "test_size": 0.25},
        },
    }
    config["experiments"] = {"models": ["tiny-v3"], "tasks": ["style", "choice", "neko"]}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return {
        "results": RESULTS,
        "model": config["models"]["tiny-v3"]["path"],
        "train": config["tasks"]["style"]["train_file"],
        "raw": config["tasks"]["neko"]["raw_file"],
    }


def strings(word: str) -> list[str]:
    """The word, or for a --spec JSON word every string in it."""
    if not word.startswith("{"):
        return [word]
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)

    walk(json.loads(word))
    return found


def injected(workdir: Path) -> list[Path]:
    return sorted(path for path in workdir.rglob("pwned-*") if path.name.startswith("pwned-"))


def test_every_planned_command_keeps_hostile_paths_whole(
    workdir: Path, tiny_release: Path, tiny_tasks: Path
) -> None:
    paths = hostile_workdir(workdir, tiny_release, tiny_tasks)
    plan = snakemake(workdir, "-n", "-p", "--forceall").stdout
    commands = [line.removeprefix("Shell command: ") for line in plan.splitlines()
                if line.startswith("Shell command: ")]  # fmt: skip
    planned = {rule for rule in RULES if f"\n{rule} " in plan or plan.startswith(f"{rule} ")}
    assert planned == set(RULES), sorted(set(RULES) - planned)
    assert len(commands) >= len(RULES), plan[-3000:]
    seen: set[str] = set()
    for command in commands:
        words = [text for word in shlex.split(command) for text in strings(word)]
        # A word touching the hostile text must carry all of it: nothing split or unquoted.
        for word in words:
            if "pwned" in word or "'q'" in word:
                assert HOSTILE in word, (word, command)
        seen.update(name for name, path in paths.items() for word in words if path in word)
    assert seen == set(paths), seen


def test_cheap_rules_run_on_hostile_paths_and_run_nothing_else(
    workdir: Path, tiny_release: Path, tiny_tasks: Path
) -> None:
    hostile_workdir(workdir, tiny_release, tiny_tasks)
    results = workdir / RESULTS
    targets = [f"{RESULTS}/models/tiny-v3/bf16", f"{RESULTS}/data/choice/train.json",
               f"{RESULTS}/data/neko/train.json"]  # fmt: skip
    snakemake(workdir, *targets)
    assert injected(workdir) == []
    assert (results / "models/tiny-v3/bf16/config.json").is_file()
    assert sorted(results.glob("models/tiny-v3/bf16/*.safetensors"))
    assert len(json.loads((results / "data/choice/train.json").read_text())) == 16
    neko = json.loads((results / "data/neko/train.json").read_text())
    assert len(neko) == 48 and all(row["id"] for row in neko)


@pytest.mark.slow
def test_the_whole_reduced_dag_runs_on_hostile_paths(
    workdir: Path, tiny_release: Path, tiny_tasks: Path
) -> None:
    """Every rule for real (about 80 s on 2 cores): tables come out and no hidden command ran."""
    hostile_workdir(workdir, tiny_release, tiny_tasks)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for block in ("training", "inference", "evaluation", "resources"):
        config[block] = deep_merge(config.get(block, {}), REDUCED[block])
    config["tasks"]["choice"].update(REDUCED["tasks"]["choice"] | {"tiny": {"n_train": 16, "n_test": 4}})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    assert injected(workdir) == []
    results = workdir / RESULTS
    assert (results / "tables" / "generation.csv").is_file() and (results / "plots" / "loss.png").is_file()
    assert len((results / "predictions/tiny-v3/style/lora.jsonl").read_text().splitlines()) == 12

"""The code's shape, held as tests: one name per step from rule to module, and the import rules.

A newcomer reading the Snakefile finds a step's Python in one hop: rule ``cast`` lives in
``workflow/rules/cast.smk``, runs ``ktflow cast`` and starts in ``src/ktflow/steps/cast.py``.
Shared packages (host probes, readers) sit below every step and import none.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ktflow.cli import COMMANDS
from ktflow.steps import step_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ktflow"
RULES = ROOT / "workflow" / "rules"
_RULE = re.compile(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", re.S | re.M)
# Commands people run by hand on a finished run; no rule runs them.
COMMANDS_WITHOUT_RULE = {"chat", "status"}
MAX_LINES = 420


def rule_blocks() -> dict[str, tuple[str, str]]:
    """rule name -> (rule file stem, the rule's text)."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(RULES.glob("*.smk")):
        for match in _RULE.finditer(path.read_text()):
            found[match[1]] = (path.stem, match[2])
    return found


def test_every_rule_file_is_one_step_named_like_its_rules_command_and_module() -> None:
    blocks = rule_blocks()
    steps = {stem for stem, _ in blocks.values()}
    assert steps == {command.replace("-", "_") for command in COMMANDS} - COMMANDS_WITHOUT_RULE
    for rule, (stem, text) in blocks.items():
        command = stem.replace("_", "-")
        assert rule == stem or rule.startswith(f"{stem}_"), f"rule {rule} in {stem}.smk"
        assert f'"ktflow {command} ' in text, f"rule {rule} must run `ktflow {command}`"
        assert f'code=code_version("{command}")' in text, f"rule {rule} needs its code version"
        assert (PACKAGE / "steps" / f"{stem}.py").is_file()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_one_entry_module(command: str) -> None:
    module = importlib.import_module(step_module(command))
    assert callable(module.configure) and callable(module.main)


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {name for name in names if name.startswith("ktflow.")}


def test_no_step_imports_another_step() -> None:
    for path in (PACKAGE / "steps").glob("*.py"):
        assert not {n for n in imports_of(path) if n.startswith("ktflow.steps.")}, path.name


@pytest.mark.parametrize("shared", ["host", "readers"])
def test_shared_packages_import_no_step_and_no_family(shared: str) -> None:
    assert (PACKAGE / shared / "__init__.py").is_file()
    below = (
        "ktflow.errors",
        "ktflow.atomic",
        "ktflow.provenance",
        f"ktflow.{shared}",
        "ktflow.host",
        "ktflow.readers",
    )
    for path in (PACKAGE / shared).rglob("*.py"):
        above = {name for name in imports_of(path) if not name.startswith(below)}
        assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)}"


# Every family of variants: (package holding registry, interface and one file per variant, registry).
FAMILIES = [
    ("ktflow.cast.formats", "FORMATS"),
    ("ktflow.train.backends", "BACKENDS"),
    ("ktflow.infer.backends", "BACKENDS"),
    ("ktflow.convert_lora.converters", "CONVERTERS"),
    ("ktflow.convert_int8.backends", "INT8_BACKENDS"),
]


@pytest.mark.parametrize(("package", "registry"), FAMILIES)
def test_every_family_has_one_shape(package: str, registry: str) -> None:
    """Registry in the package's __init__, the interface in base.py, each variant in a file of its own."""
    module = importlib.import_module(package)
    base = importlib.import_module(f"{package}.base")
    variants = getattr(module, registry)
    homes = set()
    for name, variant in variants.items():
        cls = variant if isinstance(variant, type) else type(variant)
        assert cls.__module__.startswith(f"{package}.") and cls.__module__ != base.__name__, name
        interfaces = [v for v in vars(base).values() if isinstance(v, type) and v.__module__ == base.__name__]
        assert any(issubclass(cls, interface) for interface in interfaces), f"{name} implements base.py"
        homes.add(cls.__module__)
    assert len(homes) == len(variants), f"{package}: one file per variant"


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_the_workflows_imports_load_no_server_stack() -> None:
    """Snakemake parses the Snakefile for every job of a cluster run: what the rule files import
    (config, plans, registries) must not pull in httpx, rich or psutil, which only a running
    server or client needs."""
    modules = sorted(
        {
            match.group(1)
            for rule_file in (ROOT / "workflow" / "rules").glob("*.smk")
            for match in re.finditer(r"^from (ktflow[\w.]*) import", rule_file.read_text(), re.M)
        }
    )
    assert "ktflow.infer.plan" in modules
    probe = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "sys.exit(','.join(m for m in ('httpx', 'rich', 'psutil') if m in sys.modules) or None)"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

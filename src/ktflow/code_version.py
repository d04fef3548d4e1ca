"""Each step's code version: a param of every rule, so editing the code a step runs reruns it.

``code_version("cast")`` hashes the modules ``ktflow cast`` runs: its entry module
``ktflow.steps.cast`` and every ktflow module that one reaches through imports (or starts with
``python -m``). A change to another step's code leaves this version alone, and the version keys
the step's entry in Snakemake's between-workflow cache.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path

import ktflow
from ktflow.errors import KtflowInputError
from ktflow.steps import step_module

CODE_PREFIX = "ktflow-code:"

# Modules that cannot change what a step produces: messages and command dispatch.
_NOT_CODE = frozenset({"ktflow.errors", "ktflow.cli", "ktflow.__main__"})
_MODULE_NAME = re.compile(r"^ktflow(\.[a-z_][a-z0-9_]*)+$")


def _module_file(name: str) -> Path | None:
    base = Path(ktflow.__file__).parent.joinpath(*name.split(".")[1:])
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


@functools.cache
def _imported(path: Path) -> frozenset[str]:
    """ktflow modules a file imports (anywhere in it) or names as a string (``-m ktflow.x``)."""
    found: set[str] = set()
    package = ".".join(("ktflow", *path.relative_to(Path(ktflow.__file__).parent).with_suffix("").parts))
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                parent = package.rsplit(".", node.level)[0] if path.name != "__init__.py" else package
                base = f"{parent}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.match(node.value)
        ):
            found.add(node.value)
    return frozenset(name for name in found if name.startswith("ktflow.") and _module_file(name))


@functools.cache
def code_modules(command: str) -> tuple[str, ...]:
    """The ktflow modules ``ktflow <command>`` runs: the module the CLI dispatches to and
    every one it reaches through imports or starts with ``python -m``, with their packages."""
    entry = step_module(command)
    if _module_file(entry) is None:
        raise KtflowInputError(None, "command", f"unknown ktflow command {command!r}")
    pending, seen = [entry], set()
    while pending:
        parts = pending.pop().split(".")
        for module in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):
            path = _module_file(module)
            if module not in seen and module not in _NOT_CODE and path is not None:
                seen.add(module)
                pending.extend(_imported(path))
    return tuple(sorted(seen))


def code_version(command: str) -> str:
    """``ktflow-code:<command>:<ktflow version>+<hash of code_modules(command)>``.

    A change to another step's code leaves this step's version alone.
    """
    digest = hashlib.sha256()
    for module in code_modules(command):
        path = _module_file(module)
        assert path is not None
        digest.update(module.encode() + b"\0" + path.read_bytes())
    return f"{CODE_PREFIX}{command}:{ktflow.__version__}+{digest.hexdigest()[:12]}"

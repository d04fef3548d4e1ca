"""Which training keys an upstream release accepts, read from its wheel without installing it.

LLaMA-Factory parses a training YAML with ``HfArgumentParser`` over the dataclasses in
``hparams/parser.py``'s ``_TRAIN_ARGS`` and rejects any key none of them declares
("Some keys are not used by the HfArgumentParser"). This module rebuilds that key set
from the sources inside the wheels, with :mod:`ast`: a release that cannot be installed
next to the running one (LLaMA-Factory 0.9.4 for legacy KT, llamafactory-kt with
transformers-kt for current KT) can still be checked against what ktflow renders.
"""

from __future__ import annotations

import ast
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Module:
    package: str  # top-level package, e.g. "llamafactory"
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    # local name -> (top-level package it comes from, name there)
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)


def read_members(wheel: Path, members: Iterable[str]) -> dict[str, str]:
    """Sources of the ``.py`` members whose path starts with one of ``members`` (prefixes).

    ``wheel`` is a wheel file, or a directory laid out like one (a site-packages).
    """
    prefixes = tuple(members)
    if wheel.is_dir():
        paths = (p.relative_to(wheel).as_posix() for p in wheel.rglob("*.py"))
        return {
            name: (wheel / name).read_text(encoding="utf-8") for name in paths if name.startswith(prefixes)
        }
    with zipfile.ZipFile(wheel) as archive:
        return {
            name: archive.read(name).decode("utf-8")
            for name in archive.namelist()
            if name.endswith(".py") and name.startswith(prefixes)
        }


def _walk_module(tree: ast.Module) -> Iterable[ast.stmt]:
    """Top-level statements, including those in module-level if/else (last assignment wins)."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If):
            stack.extend(reversed([*node.body, *node.orelse]))
        else:
            yield node


def _index(path: str, source: str) -> _Module:
    package = path.split("/", 1)[0]
    module = _Module(package)
    for node in _walk_module(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            module.classes[node.name] = node
        elif isinstance(node, ast.ImportFrom):
            origin = package if node.level else (node.module or "").split(".", 1)[0]
            for alias in node.names:
                module.aliases[alias.asname or alias.name] = (origin, alias.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    module.aliases[target.id] = module.aliases.get(node.value.id, (package, node.value.id))
    return module


def _init_fields(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        value = node.value
        if isinstance(value, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in value.keywords
        ):
            continue  # field(init=False): not a parser argument
        names.add(node.target.id)
    return names


class SourceSet:
    """Classes of one or more packages' sources, with their imports resolved across them."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.modules = {path: _index(path, text) for path, text in sources.items()}

    def _find(self, package: str, name: str) -> tuple[_Module, ast.ClassDef] | None:
        for module in self.modules.values():
            if module.package == package and name in module.classes:
                return module, module.classes[name]
        return None

    def _resolve(self, module: _Module, name: str) -> tuple[_Module, ast.ClassDef] | None:
        if name in module.classes:
            return module, module.classes[name]
        package, original = module.aliases.get(name, (module.package, name))
        return self._find(package, original)

    def fields(self, module: _Module, cls: ast.ClassDef) -> set[str]:
        """The init fields of ``cls`` and of every base class found in the sources."""
        names = _init_fields(cls)
        for base in cls.bases:
            base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            found = self._resolve(module, base_name) if base_name else None
            if found is not None:
                names |= self.fields(*found)
        return names

    def class_fields(self, package: str, name: str) -> set[str]:
        found = self._find(package, name)
        if found is None:
            raise LookupError(f"class {name} not found in the {package} sources")
        return self.fields(*found)

    def module_class_fields(self, path: str, name: str) -> set[str]:
        """Fields of ``name`` as module ``path`` sees it (its own class or an import)."""
        found = self._resolve(self.modules[path], name)
        if found is None:
            raise LookupError(f"{name} (used in {path}) not found in the sources")
        return self.fields(*found)


def train_keys(lf_wheel: Path, transformers_wheel: Path) -> set[str]:
    """Every key LLaMA-Factory's training parser accepts (its dataclasses + transformers')."""
    lf_sources = read_members(lf_wheel, ["llamafactory/hparams/"])
    sources = {
        **lf_sources,
        **read_members(transformers_wheel, ["transformers/training_args"]),
    }
    classes = SourceSet(sources)
    parser = next(path for path in lf_sources if path.endswith("hparams/parser.py"))
    return {
        key
        for name in list_assigned_names(lf_sources[parser], "_TRAIN_ARGS")
        for key in classes.module_class_fields(parser, name)
    }


def list_assigned_names(source: str, variable: str) -> list[str]:
    """The names in the first module-level ``variable = [A, B, ...]``."""
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets)
            and isinstance(node.value, ast.List | ast.Tuple)
        ):
            return [element.id for element in node.value.elts if isinstance(element, ast.Name)]
    raise LookupError(f"no list assigned to {variable}")


def frozenset_literal(source: str, class_name: str, variable: str) -> set[str]:
    """The strings of ``variable = frozenset({...})`` in the body of class ``class_name``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if (
                    isinstance(item, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == variable for t in item.targets)
                    and isinstance(item.value, ast.Call)
                    and item.value.args
                ):
                    return {
                        e.value
                        for e in ast.walk(item.value.args[0])
                        if isinstance(e, ast.Constant) and isinstance(e.value, str)
                    }
    raise LookupError(f"{class_name}.{variable} not found")

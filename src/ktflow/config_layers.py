"""Read the workflow's config layers strictly, and say which layer a bad key came from.

Snakemake merges, in order: ``config/config.yaml`` (the Snakefile's default, when present),
each ``--configfile``, then ``--config`` pairs. ktflow reads those layers itself so that

- a YAML syntax error names the file and line, and a key given twice in one mapping (the
  same model or task twice) is refused naming the file, line and key; PyYAML's loaders
  keep the last one silently;
- a nested ``--config 'training={lora: {rank: 4}}'`` keeps YAML's types: Snakemake parses
  nested ``--config`` values with PyYAML's BaseLoader, which makes every scalar a string;
- an error in the merged config is blamed on the layer that set the offending key, not on
  whichever file Snakemake happened to register last.

A ``--configfile`` with a YAML syntax error is still reported by Snakemake itself, which
loads it before any workflow code runs (its message names neither file nor line).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ktflow.config import _merge
from ktflow.errors import KtflowInputError

DEFAULT = Path("config/config.yaml")
CLI = "--config"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` brings defaults an explicit key may override
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise KtflowInputError(
                    self.name, f"line {line}", f"key {key!r} is given twice (first on line {seen[key]})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """One config file as a mapping; KtflowInputError naming file and line if it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KtflowInputError(path, None, f"cannot read the config file ({error})") from None
    loader = StrictLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        context = error.context
        if context and error.context_mark and mark and error.context_mark.line != mark.line:
            context += f" (from line {error.context_mark.line + 1})"
        problem = " ".join(filter(None, (context, error.problem)))
        raise KtflowInputError(path, where, f"not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "expected a mapping of settings at the top level")
    return data


def retyped(value: Any) -> Any:
    """A nested ``--config`` value with YAML's scalar types back (BaseLoader left strings)."""
    if isinstance(value, Mapping):
        return {key: retyped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [retyped(item) for item in value]
    if isinstance(value, str):
        scalar = yaml.safe_load(value) if value.strip() else value
        return scalar if isinstance(scalar, bool | int | float) or scalar is None else value
    return value


@dataclass(frozen=True)
class Layer:
    name: str  # a file path, or "--config"
    data: dict[str, Any]


def layers(default: Path, configfiles: Iterable[Path], cli: Mapping[str, Any]) -> list[Layer]:
    """The config layers in Snakemake's merge order, each read strictly."""
    files = [default] if default.is_file() else []
    files += [Path(f) for f in configfiles if Path(f).resolve() != default.resolve()]
    found = [Layer(str(f), load_yaml(f)) for f in files]
    if cli:
        found.append(Layer(CLI, {key: retyped(value) for key, value in cli.items()}))
    if not found:
        raise KtflowInputError(default, None, "no config: create it or pass --configfile")
    return found


def merged(found: list[Layer]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for layer in found:
        result = _merge(result, layer.data)
    return result


def _depth(data: Any, parts: list[str]) -> int:
    depth = 0
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            break
        data, depth = data[part], depth + 1
    return depth


def blame(found: list[Layer], field: str | None) -> str:
    """The layer that set ``field`` (a dotted key path): the deepest match, the later on a tie."""
    parts = [p for p in re.sub(r"\[\d+\]", "", field or "").split(".") if p]
    best, best_depth = found[-1].name, -1
    for layer in found:
        depth = _depth(layer.data, parts)
        if depth >= best_depth and depth > 0:
            best, best_depth = layer.name, depth
    return best if best_depth > 0 else next((x.name for x in reversed(found) if x.name != CLI), best)


UNBLAMED = "<config>"  # the config_path checks are given; blamed() puts the right layer in


def blamed(error: KtflowInputError, found: list[Layer]) -> KtflowInputError:
    """``error`` with the layer that set its key as the file, if it was raised against UNBLAMED."""
    if error.path != UNBLAMED:
        return error
    return KtflowInputError(blame(found, error.field), error.field, error.message)

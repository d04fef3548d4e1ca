"""A model snapshot (config.json, tokenizer, safetensors) checked before any step loads it:
weights from safetensors alone (pickle formats can run code), every shard's header sound, the
index naming only shards that are there. ``ktflow fetch`` checks what it publishes, and
``ktflow train`` and ``ktflow infer`` check the model they are given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ktflow.errors import KtflowInputError
from ktflow.provenance import PROVENANCE_NAME
from ktflow.readers.safetensors_header import read_header

# Pickle-based checkpoint formats: loading them can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _snapshot_files(root: Path) -> Iterator[tuple[Path, Path]]:
    """(relative path, real file) for every visible file; links are resolved, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # .git, .cache/huggingface (local_dir metadata) and friends are not part of a model.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name == PROVENANCE_NAME:
                continue
            path = Path(dirpath) / name
            if path.is_file():
                yield path.relative_to(root), path.resolve()


def validate_snapshot(root: Path, keep: Callable[[str], bool] | None = None) -> list[tuple[Path, Path]]:
    """Check a model directory is loadable from safetensors alone; return its (selected) files."""
    if not root.is_dir():
        raise KtflowInputError(root, None, "model directory does not exist")
    files = [(rel, real) for rel, real in _snapshot_files(root) if keep is None or keep(rel.as_posix())]
    names = {rel.as_posix() for rel, _ in files}
    pickled = [rel for rel, _ in files if rel.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise KtflowInputError(
            root / pickled[0], None,
            "pickle-format weights are refused: weights load only from safetensors "
            "(remove the file, or convert it to safetensors first)",
        )  # fmt: skip
    config = root / "config.json"
    if "config.json" not in names:
        raise KtflowInputError(config, None, "missing: a model snapshot needs its config.json")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KtflowInputError(config, None, f"not valid JSON ({error})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model_type"), str):
        raise KtflowInputError(config, "model_type", "missing: config.json must name the model_type")
    tensors = [real for rel, real in files if rel.suffix == ".safetensors"]
    if not tensors:
        raise KtflowInputError(root, None, "no *.safetensors weights in the model directory")
    index = root / "model.safetensors.index.json"
    if "model.safetensors.index.json" in names:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise KtflowInputError(index, None, f"not a safetensors index ({error})") from None
        if not isinstance(weight_map, dict):
            raise KtflowInputError(index, "weight_map", "missing or not an object")
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise KtflowInputError(
                index, "weight_map", f"names shard {missing[0]}, which is not in the snapshot"
            )
    for path in tensors:
        read_header(path)  # truncated, garbled or not safetensors: refused before any step reads it
    return files

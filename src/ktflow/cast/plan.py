"""Everything a cast will do, worked out and checked before a byte is written."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ktflow.cast.detect import make_format
from ktflow.cast.formats.base import OutTensor, WeightFormat
from ktflow.cast.shards import Reader, shard_size
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import TensorSlot, read_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Weights in other containers are not carried over: the output's weights are its safetensors.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".gguf")
# Bump when the bytes a cast writes change, so older resumable state is not trusted.
CAST_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    name: str
    tensors: tuple[OutTensor, ...]
    source: Path

    @cached_property
    def size(self) -> int:
        return shard_size(out.entry for out in self.tensors)


@dataclass(frozen=True)
class Plan:
    src: Path
    fmt: WeightFormat
    config: dict[str, Any]
    shards: tuple[ShardPlan, ...]
    other_files: tuple[Path, ...]
    fingerprint: str

    @property
    def weight_map(self) -> dict[str, str]:
        return {out.entry.name: shard.name for shard in self.shards for out in shard.tensors}

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (no headers), as transformers expects in the index metadata."""
        return sum(out.entry.nbytes for shard in self.shards for out in shard.tensors)


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise KtflowInputError(path, None, "file is missing") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KtflowInputError(path, None, f"invalid JSON: {error}") from error
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "must be a JSON object")
    return data


def shard_files(src: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names the index places there (all ``*.safetensors`` when there is no index)."""
    index_path = src / INDEX_NAME
    if not index_path.exists():
        files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise KtflowInputError(src, None, f"no {INDEX_NAME} and no *.safetensors files")
        return {name: [] for name in files}
    weight_map = load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise KtflowInputError(index_path, "weight_map", "missing or empty")
    by_file: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or not file.endswith(".safetensors"):
            raise KtflowInputError(index_path, tensor, f"bad shard name {file!r}")
        by_file.setdefault(file, []).append(tensor)
    for file in by_file:
        if not (src / file).is_file():
            raise KtflowInputError(index_path, by_file[file][0], f"points to missing shard {file}")
    return by_file


def read_tensors(src: Path) -> dict[str, TensorSlot]:
    """All source tensors, with the index and the shard headers checked against each other."""
    table: dict[str, TensorSlot] = {}
    for file, listed in shard_files(src).items():
        slots = read_header(src / file)
        for name in listed:
            if name not in slots:
                raise KtflowInputError(src / INDEX_NAME, name, f"not found in shard {file}")
        for name, slot in slots.items():
            if name in table:
                raise KtflowInputError(slot.path, name, f"also stored in {table[name].path.name}")
            table[name] = slot
    return table


def _other_files(src: Path) -> tuple[Path, ...]:
    """Every non-weight file (tokenizer, generation config, remote code...), relative to src."""
    skipped = {INDEX_NAME, CONFIG_NAME, "provenance.json"}
    found = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name.endswith(WEIGHT_SUFFIXES) or rel.name.startswith("pytorch_model") or str(rel) in skipped:
            continue
        found.append(rel)
    return tuple(found)


def _fingerprint(src: Path, config: dict[str, Any], slots: dict[str, TensorSlot]) -> str:
    digest = hashlib.sha256(json.dumps([CAST_VERSION, config], sort_keys=True).encode())
    for path in sorted({slot.path for slot in slots.values()}):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def build_plan(src: Path) -> Plan:
    """Read config, index and headers; plan every output tensor or fail naming the file and tensor."""
    if not src.is_dir():
        raise KtflowInputError(src, None, "source model directory does not exist")
    config = load_json(src / CONFIG_NAME)
    fmt = make_format(config, src / CONFIG_NAME)
    table = read_tensors(src)
    reader = Reader()
    try:
        outs = fmt.plan(table, reader)
    finally:
        reader.close()
    grouped: dict[Path, list[OutTensor]] = {}
    names: set[str] = set()
    for out in outs:
        if out.entry.name in names:
            raise KtflowInputError(
                out.inputs[0].path, out.entry.name, "two source tensors give this output name"
            )
        names.add(out.entry.name)
        grouped.setdefault(out.inputs[0].path, []).append(out)
    shards = tuple(
        ShardPlan(path.name, tuple(sorted(tensors, key=lambda out: out.inputs[0].start)), path)
        for path, tensors in sorted(grouped.items())
    )
    return Plan(
        src=src,
        fmt=fmt,
        config=config,
        shards=shards,
        other_files=_other_files(src),
        fingerprint=_fingerprint(src, config, table),
    )


def bf16_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without ``quantization_config``, at the top level and under ``text_config``."""
    clean = {key: value for key, value in config.items() if key != "quantization_config"}
    text = clean.get("text_config")
    if isinstance(text, dict):
        clean["text_config"] = {key: value for key, value in text.items() if key != "quantization_config"}
    return clean

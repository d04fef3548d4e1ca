"""Training data: where it comes from, its checks, and the ``dataset_info.json`` ktflow writes.

Training data is a JSON list or JSONL file (the task's own train file, or one named
by ``training.dataset.file``) or a hub data set (``training.dataset.hf_hub_url``),
in one of four formats: alpaca and sharegpt (SFT), pairwise (DPO), kto (KTO).
``training.dataset`` may also set LLaMA-Factory's per-dataset keys (``formatting``,
``columns``, ``tags``, ``split``, ``subset``, ``num_samples``), which override the
format's defaults; that is how a data set with its own column names is described.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

HUB_PREFIX = "hf:"
# dataset_info.json entries per format, before training.dataset's overrides. LLaMA-Factory
# sets every column it does not find in "columns" to None, so each entry names all of its own.
_ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
DEFAULT_ENTRY: dict[str, dict[str, Any]] = {
    "alpaca": {"columns": _ALPACA},
    "sharegpt": {"formatting": "sharegpt", "columns": {"messages": "conversations"}},
    "pairwise": {
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    },
    "kto": {"columns": {**_ALPACA, "kto_tag": "kto_tag"}},
}
FORMATS = tuple(DEFAULT_ENTRY)
EXTRA_ROLES = {"alpaca": (), "sharegpt": (), "pairwise": ("chosen", "rejected"), "kto": ("kto_tag",)}
ENTRY_KEYS = ("formatting", "columns", "tags", "split", "subset", "num_samples")
LOCATION_KEYS = ("file", "hf_hub_url")


def dataset_entry(location: str, data_format: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset_info.json entry: a file path or ``hf:<repo>`` plus the format and overrides."""
    source = source or {}
    unknown = sorted(set(source) - {*ENTRY_KEYS, *LOCATION_KEYS})
    if unknown:
        raise KtflowInputError("config", f"training.dataset.{unknown[0]}", "unknown dataset setting")
    entry: dict[str, Any] = json.loads(json.dumps(DEFAULT_ENTRY[data_format]))  # a deep copy
    if location.startswith(HUB_PREFIX):
        entry["hf_hub_url"] = location.removeprefix(HUB_PREFIX)
    else:
        entry["file_name"] = str(Path(location).resolve())
    for key in ENTRY_KEYS:
        if key in source:
            entry[key] = source[key]
    if data_format == "sharegpt" and entry.get("formatting") != "sharegpt":
        message = "format sharegpt needs sharegpt formatting"
        raise KtflowInputError("config", "training.dataset.formatting", message)
    return entry


def required_columns(entry: dict[str, Any], data_format: str) -> dict[str, str]:
    """Role -> column name of what every row must carry for this entry."""
    columns = entry.get("columns") or {}
    if entry.get("formatting") == "sharegpt":
        roles: tuple[str, ...] = ("messages",)
    else:
        roles = ("prompt",) if data_format == "pairwise" else ("prompt", "response")
    required = {}
    for role in (*roles, *EXTRA_ROLES[data_format]):
        if not columns.get(role):
            message = (
                f"format {data_format} needs a column for {role!r} (none is implied once columns is set)"
            )
            raise KtflowInputError("config", "training.dataset.columns", message)
        required[role] = columns[role]
    return required


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list or JSONL file of objects, naming the file and line on any fault."""
    if not path.is_file():
        raise KtflowInputError(path, None, "dataset file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise KtflowInputError(path, f"byte {error.start}", "not valid UTF-8") from error
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise KtflowInputError(path, f"line {number}", f"invalid JSON ({error.msg})") from error
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise KtflowInputError(path, f"line {error.lineno}", f"invalid JSON ({error.msg})") from error
        if not isinstance(rows, list):
            raise KtflowInputError(path, None, "expected a JSON list of records")
    if not rows:
        raise KtflowInputError(path, None, "dataset is empty")
    return rows


def check_rows(
    path: Path, rows: list[dict[str, Any]], data_format: str, entry: dict[str, Any] | None = None
) -> None:
    """Every row has the columns its format needs (non-empty; kto tags boolean)."""
    required = required_columns(entry if entry is not None else DEFAULT_ENTRY[data_format], data_format)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KtflowInputError(path, f"row {index}", "expected an object")
        for role, key in required.items():
            value = row.get(key)
            if role == "kto_tag":
                if not isinstance(value, bool):
                    raise KtflowInputError(path, f"row {index}.{key}", "must be true or false")
            elif value is None or (isinstance(value, str | list) and not value):
                raise KtflowInputError(path, f"row {index}.{key}", f"missing or empty (format {data_format})")


def write_dataset_info(data_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    from ktflow.atomic import write_json

    path = data_dir / "dataset_info.json"
    write_json(path, {name: entry})
    return path

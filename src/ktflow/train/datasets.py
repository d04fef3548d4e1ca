"""Training data: where it comes from, its checks, and the ``dataset_info.json`` ktflow writes.

Training data is a JSON list or JSONL file (the task's own train file, or one named
by ``training.dataset.file``) or a hub data set (``training.dataset.hf_hub_url``),
in one of four formats: alpaca and sharegpt (SFT), pairwise (DPO), kto (KTO).
``training.dataset`` may also set LLaMA-Factory's per-dataset keys (``formatting``,
``ranking``, ``columns``, ``tags``, ``split``, ``subset``, ``num_samples``), which override
the format's defaults; that is how a data set with its own column names is described. An
entry copied from LLaMA-Factory's ``dataset_info.json`` works unedited: its ``file_name``
is the data file (relative to the working directory, like ``file``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.datasets.contract import DEFAULT_ENTRY, FORMATS, Layout, check_rows
from ktflow.errors import KtflowInputError

# The row checks live in ktflow.datasets.contract (one validator for every step); re-exported here.
__all__ = [
    "FORMATS", "HUB_PREFIX", "check_rows", "dataset_entry", "local_file", "write_dataset_info",
]  # fmt: skip

HUB_PREFIX = "hf:"
ENTRY_KEYS = ("formatting", "ranking", "columns", "tags", "split", "subset", "num_samples")
# file_name: LLaMA-Factory's own key for the same thing as file, so its entries copy unedited.
LOCATION_KEYS = ("file", "file_name", "hf_hub_url")


def local_file(source: dict[str, Any]) -> str | None:
    """The data file a ``training.dataset`` block names (``file``, or LLaMA-Factory's ``file_name``)."""
    named = [source[key] for key in ("file", "file_name") if source.get(key)]
    return str(named[0]) if named else None


def location_count(source: dict[str, Any]) -> int:
    return sum(1 for key in LOCATION_KEYS if source.get(key))


def _defaults(data_format: str, source: dict[str, Any]) -> dict[str, Any]:
    """The format's entry; sharegpt formatting without columns gets LLaMA-Factory's "conversations"."""
    entry: dict[str, Any] = json.loads(json.dumps(DEFAULT_ENTRY[data_format]))  # a deep copy
    if source.get("formatting") == "sharegpt" and "columns" not in source:
        extra = {k: v for k, v in entry["columns"].items() if k in ("chosen", "rejected", "kto_tag")}
        entry["columns"] = {"messages": "conversations", **extra}
    return entry


def dataset_entry(location: str, data_format: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset_info.json entry: a file path or ``hf:<repo>`` plus the format and overrides."""
    source = source or {}
    unknown = sorted(set(source) - {*ENTRY_KEYS, *LOCATION_KEYS})
    if unknown:
        raise KtflowInputError("config", f"training.dataset.{unknown[0]}", "unknown dataset setting")
    entry = _defaults(data_format, source)
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
    ranked = bool(entry.get("ranking", False))
    if ranked != (data_format == "pairwise"):
        message = (
            f"ranking: {str(ranked).lower()} does not fit format {data_format} (only DPO data is ranked)"
        )
        raise KtflowInputError("config", "training.dataset.ranking", message)
    Layout.of(data_format, entry)  # every column the format needs is named
    return entry


def write_dataset_info(data_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    from ktflow.atomic import write_json

    path = data_dir / "dataset_info.json"
    write_json(path, {name: entry})
    return path

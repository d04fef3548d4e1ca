"""Training data checks and the ``dataset_info.json`` ktflow writes for LLaMA-Factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

# LLaMA-Factory dataset_info entries per format: (formatting, columns, extra flags), and the
# fields every row must carry for that format.
FORMATS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "alpaca": (
        {"columns": {"prompt": "instruction", "query": "input", "response": "output"}},
        ("instruction", "output"),
    ),
    "sharegpt": (
        {"formatting": "sharegpt", "columns": {"messages": "conversations"}},
        ("conversations",),
    ),
    "pairwise": (
        {
            "ranking": True,
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "chosen": "chosen",
                "rejected": "rejected",
            },
        },
        ("instruction", "chosen", "rejected"),
    ),
    "kto": (
        {"columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}},
        ("instruction", "output", "kto_tag"),
    ),
}


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


def check_rows(path: Path, rows: list[dict[str, Any]], data_format: str) -> None:
    _, required = FORMATS[data_format]
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KtflowInputError(path, f"row {index}", "expected an object")
        for key in required:
            value = row.get(key)
            if value is None or (isinstance(value, str | list) and not value):
                raise KtflowInputError(path, f"row {index}.{key}", f"missing or empty (format {data_format})")
        if data_format == "kto" and not isinstance(row["kto_tag"], bool):
            raise KtflowInputError(path, f"row {index}.kto_tag", "must be true or false")


def write_dataset_info(data_dir: Path, name: str, train_file: Path, data_format: str) -> Path:
    from ktflow.atomic import write_json

    entry, _ = FORMATS[data_format]
    info = {name: {"file_name": str(train_file.resolve()), **entry}}
    path = data_dir / "dataset_info.json"
    write_json(path, info)
    return path

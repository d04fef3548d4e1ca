"""Task rows from a JSON list or JSONL file, unchecked (``ktflow.datasets.contract`` checks them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSON list or JSONL file, naming the file and line on any fault (rows unchecked)."""
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

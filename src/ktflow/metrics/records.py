"""Reading a predictions JSONL file, checked completely before anything is scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.metrics.mcq import normalize_label

REQUIRED_TEXT_FIELDS = ("prompt", "predict", "label")


def _where(line: int, field: str | None = None) -> str:
    return f"line {line}" if field is None else f"line {line}, field {field!r}"


def _decode_line(path: Path, raw: bytes, line: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise KtflowInputError(path, _where(line), f"not valid UTF-8 (byte offset {error.start})") from None
    # A BOM on the first line is an editor artefact, not content.
    return text.removeprefix("\ufeff") if line == 1 else text


def _parse_row(path: Path, text: str, line: int) -> dict[str, Any]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise KtflowInputError(
            path, _where(line), f"invalid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(row, dict):
        raise KtflowInputError(path, _where(line), f"expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise KtflowInputError(path, _where(line, "id"), "missing")
    if isinstance(row["id"], bool) or not isinstance(row["id"], str | int):
        raise KtflowInputError(path, _where(line, "id"), f"must be a string or integer, got {row['id']!r}")
    for field in REQUIRED_TEXT_FIELDS:
        if field not in row:
            raise KtflowInputError(path, _where(line, field), "missing")
        if not isinstance(row[field], str):
            got = type(row[field]).__name__
            raise KtflowInputError(path, _where(line, field), f"must be a string, got {got}")
    return row


def load_predictions(path: str | Path, task: str = "generation") -> list[dict[str, Any]]:
    """Read ``{"id", "prompt", "predict", "label"}`` rows; any defect raises KtflowInputError.

    Blank lines are skipped. For ``task="mcq"`` every label must name an option
    ("A".."E" or AfriMed-QA's "option1".."option5"); it is not rewritten here.
    """
    source = Path(path)
    if not source.is_file():
        raise KtflowInputError(source, None, "no such file")
    rows: list[dict[str, Any]] = []
    # Keyed by str(id): 7 and "7" would be indistinguishable in the per-sample JSONL.
    first_line_of: dict[str, int] = {}
    with open(source, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            text = _decode_line(source, raw, line)
            if not text.strip():
                continue
            row = _parse_row(source, text, line)
            key = str(row["id"])
            if key in first_line_of:
                message = f"duplicate id {key!r} (first on line {first_line_of[key]})"
                raise KtflowInputError(source, _where(line, "id"), message)
            first_line_of[key] = line
            if task == "mcq":
                try:
                    normalize_label(row["label"])
                except ValueError as error:
                    raise KtflowInputError(source, _where(line, "label"), str(error)) from None
            rows.append(row)
    if not rows:
        raise KtflowInputError(source, None, "no prediction rows (empty file)")
    return rows

"""The dataset contract: the one check of data-set rows, used by every step that reads them.

``prepare-task`` (what it writes), ``tiny-tasks`` (what it writes), ``train`` (before
LLaMA-Factory starts) and ``infer`` (before a model loads) all call :func:`check_rows`, so a
row one step accepts is never refused, nor silently mangled, by a later one. Rows are
numbered from 1 everywhere (``row 1`` is the first object of a JSON list or the first
non-blank line of a JSONL file); a fault is one KtflowInputError naming the file, ``row N``
and the column.

The layout of a row is LLaMA-Factory's ``dataset_info.json`` entry (``formatting``,
``ranking``, ``columns``, ``tags``): alpaca rows (instruction / input / output, or chosen /
rejected for DPO, plus a boolean kto_tag column for KTO) or sharegpt rows (a list of messages
whose role and content keys, and role names, come from ``tags``). What is refused here is
what LLaMA-Factory would crash on (an integer ``output`` becomes a pyarrow error) or would
silently skip (a conversation with turns out of order) or train on wrongly (a missing prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError

# dataset_info.json entries per training format, before training.dataset's overrides.
# LLaMA-Factory sets every column it does not find in "columns" to None, so each names all its own.
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
# LLaMA-Factory's own defaults for sharegpt tags (llamafactory.data.parser.DatasetAttr).
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# The pipeline's own task files (train.json / test.json): alpaca rows with a unique id.
TASK = "alpaca"


def row_name(number: int, key: str | None = None) -> str:
    """How every step names a row: 1-based, with the column after a dot."""
    return f"row {number}" + (f".{key}" if key else "")


@dataclass(frozen=True)
class Layout:
    """One data set's row layout, resolved from its dataset_info entry and training format."""

    data_format: str
    formatting: str
    ranking: bool
    columns: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def of(cls, data_format: str, entry: dict[str, Any] | None = None) -> Layout:
        entry = entry if entry is not None else DEFAULT_ENTRY[data_format]
        columns = {role: name for role, name in (entry.get("columns") or {}).items() if name}
        formatting = str(entry.get("formatting") or "alpaca")
        layout = cls(
            data_format,
            formatting,
            bool(entry.get("ranking", False)),
            columns,
            {**DEFAULT_TAGS, **(entry.get("tags") or {})},
        )
        for role in layout.needed_roles():
            if role not in columns:
                message = (
                    f"format {data_format} needs a column for {role!r} (none is implied once columns is set)"
                )
                raise KtflowInputError("config", "training.dataset.columns", message)
        return layout

    def needed_roles(self) -> tuple[str, ...]:
        if self.formatting == "sharegpt":
            roles: tuple[str, ...] = ("messages",)
        else:
            roles = ("prompt",) if self.ranking else ("prompt", "response")
        extra = {"pairwise": ("chosen", "rejected"), "kto": ("kto_tag",)}.get(self.data_format, ())
        return (*roles, *extra)


def check_rows(
    path: Path | str,
    rows: list[Any],
    data_format: str = TASK,
    entry: dict[str, Any] | None = None,
    require_id: bool = False,
) -> None:
    """Every row fits the layout; ids, where rows carry them (always with ``require_id``), are unique."""
    layout = Layout.of(data_format, entry)
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise KtflowInputError(path, row_name(number), f"expected an object, got {type(row).__name__}")
        _check_id(path, number, row, require_id, seen)
        if layout.formatting == "sharegpt":
            _check_conversation(path, number, row, layout)
        else:
            _check_alpaca(path, number, row, layout)
        if layout.data_format == "kto":
            key = layout.columns["kto_tag"]
            if not isinstance(row.get(key), bool):
                raise KtflowInputError(path, row_name(number, key), "must be true or false (the KTO label)")


def check_task_rows(path: Path | str, rows: list[Any]) -> None:
    """The pipeline's task files (prepare-task / tiny-tasks output, infer's test rows)."""
    check_rows(path, rows, TASK, require_id=True)


def _check_id(
    path: Path | str, number: int, row: dict[str, Any], required: bool, seen: dict[str, int]
) -> None:
    if "id" not in row and not required:
        return
    value = row.get("id")
    if not isinstance(value, str) or not value:
        raise KtflowInputError(path, row_name(number, "id"), "missing, empty or not a string")
    if value in seen:
        raise KtflowInputError(path, row_name(number, "id"), f"duplicate id {value!r} (row {seen[value]})")
    seen[value] = number


def _text(path: Path | str, number: int, row: dict[str, Any], key: str, data_format: str | None) -> str:
    """The column as a string; missing is refused when the format needs it (else ''), not-a-string always."""
    if key not in row or row[key] is None:
        if data_format:
            raise KtflowInputError(path, row_name(number, key), f"missing (format {data_format})")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise KtflowInputError(path, row_name(number, key), f"must be a string, got {type(value).__name__}")
    return value


def _check_alpaca(path: Path | str, number: int, row: dict[str, Any], layout: Layout) -> None:
    prompt_key, query_key = layout.columns["prompt"], layout.columns.get("query")
    prompt = _text(path, number, row, prompt_key, layout.data_format)
    query = _text(path, number, row, query_key, None) if query_key else ""
    if not (prompt.strip() or query.strip()):
        other = f" or {query_key}" if query_key else ""
        raise KtflowInputError(
            path, row_name(number, prompt_key), f"empty prompt (needs {prompt_key}{other})"
        )
    answers = ("chosen", "rejected") if layout.ranking else ("response",)
    for role in answers:
        key = layout.columns[role]
        if not _text(path, number, row, key, layout.data_format).strip():
            raise KtflowInputError(path, row_name(number, key), f"empty (format {layout.data_format})")


def _check_conversation(path: Path | str, number: int, row: dict[str, Any], layout: Layout) -> None:
    """sharegpt turns as LLaMA-Factory's converter reads them (it skips, silently, what fails here)."""
    key, tags = layout.columns["messages"], layout.tags
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        raise KtflowInputError(path, row_name(number, key), "must be a non-empty list of messages")
    first = (
        1 if isinstance(messages[0], dict) and messages[0].get(tags["role_tag"]) == tags["system_tag"] else 0
    )
    user = (tags["user_tag"], tags["observation_tag"])
    assistant = (tags["assistant_tag"], tags["function_tag"])
    for index in range(first, len(messages)):
        expected = user if (index - first) % 2 == 0 else assistant
        _check_message(path, f"{row_name(number, key)}[{index}]", messages[index], tags, expected)
    turns = len(messages) - first
    # ranking: the prompt ends with the user's turn (chosen/rejected answer it); else with a reply.
    if turns == 0 or turns % 2 != (1 if layout.ranking else 0):
        ending = "the user's turn" if layout.ranking else "the assistant's reply"
        message = (
            f"{turns} turns; format {layout.data_format} needs user/assistant turns ending with {ending}"
        )
        raise KtflowInputError(path, row_name(number, key), message)
    if layout.ranking:
        for role in ("chosen", "rejected"):
            column = layout.columns[role]
            _check_message(path, row_name(number, column), row.get(column), tags, assistant)


def _check_message(
    path: Path | str, where: str, message: Any, tags: dict[str, str], roles: tuple[str, ...]
) -> None:
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if not isinstance(message, dict):
        raise KtflowInputError(path, where, f"must be a message object with {role_tag!r} and {content_tag!r}")
    if message.get(role_tag) not in roles:
        wanted = " or ".join(repr(role) for role in roles)
        raise KtflowInputError(
            path, f"{where}.{role_tag}", f"{message.get(role_tag)!r} where {wanted} is expected"
        )
    content = message.get(content_tag)
    if not isinstance(content, str) or not content.strip():
        raise KtflowInputError(path, f"{where}.{content_tag}", "missing, empty or not a string")

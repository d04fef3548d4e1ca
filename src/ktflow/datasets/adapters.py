"""Adapters: one class per raw data-set format, each turning raw records into pipeline examples.

The pipeline's task format is alpaca (``instruction``, ``input``, ``output``) plus a unique
``id``. Every adapter reads the whole raw file and checks it before anything is written;
a fault names the file, the row and the column. Rows an adapter deliberately leaves out
(another AfriMed-QA question type, an MCQ with several correct answers) are counted, never
silently lost.
"""

from __future__ import annotations

import csv
import io
import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ktflow.errors import KtflowInputError

ON_INVALID = ("error", "skip")


@dataclass(frozen=True)
class Example:
    """One pipeline row; ``split`` is the raw data set's own split label, when it has one."""

    id: str
    instruction: str
    input: str
    output: str
    split: str | None = None

    def as_row(self) -> dict[str, str]:
        return {"id": self.id, "instruction": self.instruction, "input": self.input, "output": self.output}


@dataclass
class Adapted:
    examples: list[Example]
    # reason -> rows left out; "invalid <column>" reasons appear only with on_invalid="skip"
    left_out: Counter[str] = field(default_factory=Counter)
    first_invalid: list[str] = field(default_factory=list)


class LeftOut(Exception):
    """A row the adapter leaves out on purpose (not an error in the file)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_utf8(path: Path) -> str:
    """The file as text; invalid UTF-8 is reported with its line and byte offset."""
    if not path.is_file():
        raise KtflowInputError(path, None, "raw data file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise KtflowInputError(
            path,
            f"line {line}",
            f"not valid UTF-8 (byte {error.start}, column {column}: {data[error.start]:#04x})",
        ) from None
    return text.removeprefix("\ufeff")


def clean_text(value: str) -> str:
    """Trim the text and drop whitespace-only lines (crowd-sourced questions carry many)."""
    lines = [line.rstrip() for line in value.strip().splitlines()]
    return "\n".join(line for line in lines if line.strip())


class RawAdapter(ABC):
    """Reads one raw format; ``kind`` is the task kind its rows suit (None: either)."""

    name: ClassVar[str]
    kind: ClassVar[str | None] = None
    has_split_column: ClassVar[bool] = False

    def __init__(self, on_invalid: str = "error") -> None:
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
        self.on_invalid = on_invalid

    @abstractmethod
    def records(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number, raw record) pairs; file-level faults raise here."""

    @abstractmethod
    def convert(self, path: Path, row: int, record: dict[str, Any], id_prefix: str) -> Example:
        """One pipeline example; raises KtflowInputError (bad row) or LeftOut."""

    def read(self, path: Path, id_prefix: str = "row") -> Adapted:
        adapted = Adapted(examples=[])
        seen: dict[str, int] = {}
        for row, record in self.records(path):
            try:
                example = self.convert(path, row, record, id_prefix)
                if example.id in seen:
                    raise KtflowInputError(
                        path, f"row {row}.id", f"duplicate id {example.id!r} (row {seen[example.id]})"
                    )
            except LeftOut as left:
                adapted.left_out[left.reason] += 1
                continue
            except KtflowInputError as error:
                if self.on_invalid == "error":
                    raise
                column = (error.field or "").partition(".")[2] or "row"
                adapted.left_out[f"invalid {column}"] += 1
                if len(adapted.first_invalid) < 5:
                    adapted.first_invalid.append(error.format())
                continue
            seen[example.id] = row
            adapted.examples.append(example)
        if not adapted.examples:
            detail = ", ".join(f"{reason}: {count}" for reason, count in adapted.left_out.items())
            raise KtflowInputError(
                path, None, f"no usable rows for adapter {self.name}" + (f" ({detail})" if detail else "")
            )
        return adapted


# ---- alpaca-shaped JSON (Translational-Style, NekoQA-10K, any alpaca file) ----------------


class AlpacaAdapter(RawAdapter):
    """A JSON list (or JSONL) of ``{"instruction", "input", "output"}`` objects; ``id`` optional."""

    name = "alpaca"
    # Fields that must be non-empty; an alpaca prompt needs an instruction or an input.
    required: ClassVar[tuple[str, ...]] = ("output",)
    prompt_fields: ClassVar[tuple[str, ...]] = ("instruction", "input")

    def records(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        text = read_utf8(path)
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                yield number, self._object(path, number, _loads(path, line, f"line {number}"))
            return
        data = _loads(path, text, None)
        if not isinstance(data, list):
            raise KtflowInputError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
        for number, record in enumerate(data, start=1):
            yield number, self._object(path, number, record)

    @staticmethod
    def _object(path: Path, row: int, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise KtflowInputError(path, f"row {row}", f"expected an object, got {type(record).__name__}")
        return record

    def convert(self, path: Path, row: int, record: dict[str, Any], id_prefix: str) -> Example:
        values: dict[str, str] = {}
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise KtflowInputError(
                    path, f"row {row}.{key}", f"must be a string, got {type(value).__name__}"
                )
            values[key] = (value or "").strip()
        if not any(values.values()):
            raise KtflowInputError(path, f"row {row}", "empty row (no instruction, input or output)")
        for key in self.required:
            if not values[key]:
                raise KtflowInputError(path, f"row {row}.{key}", f"missing or empty (adapter {self.name})")
        if not any(values[key] for key in self.prompt_fields):
            fields = " or ".join(self.prompt_fields)
            raise KtflowInputError(path, f"row {row}.{self.prompt_fields[0]}", f"needs a non-empty {fields}")
        raw_id = record.get("id")
        example_id = (
            str(raw_id) if isinstance(raw_id, str | int) and str(raw_id) else f"{id_prefix}-{row:05d}"
        )
        return Example(id=example_id, **values)


class TranslationalStyleAdapter(AlpacaAdapter):
    """Translational-Style-ChatLLM (TslDial.json): empty ``instruction``, Chinese ``input``/``output``."""

    name = "translational-style"
    kind = "generation"
    required = ("input", "output")
    prompt_fields = ("input",)


class NekoQAAdapter(AlpacaAdapter):
    """NekoQA-10K: ``instruction`` (the user's turn) and ``output`` (the cat-girl reply)."""

    name = "nekoqa"
    kind = "generation"
    required = ("instruction", "output")
    prompt_fields = ("instruction",)


def _loads(path: Path, text: str, where: str | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        field_name = where or f"line {error.lineno}"
        raise KtflowInputError(
            path, field_name, f"invalid JSON ({error.msg}, column {error.colno})"
        ) from None


# ---- AfriMed-QA v2 CSV ------------------------------------------------------------------

LETTERS = "ABCDE"
_OPTION = re.compile(r"option([1-5])")
# AfriMed-QA's data preparation drops options whose text is "N/A" (true/false questions
# carry option3..option5 as "N/A"), so the prompt offers only the real options.
NOT_AN_OPTION = "N/A"


def mcq_instruction(letters: str) -> str:
    """The MCQ instruction, naming only the letters the question offers ("A or B", "A, B, C or D")."""
    named = letters[0] if len(letters) == 1 else f"{', '.join(letters[:-1])} or {letters[-1]}"
    return (
        f"Answer the multiple-choice question with the letter of the one correct option ({named}) "
        "and nothing else."
    )


SAQ_INSTRUCTION = "Answer the short-answer medical question: give a short answer, then the rationale for it."


class AfriMedQAAdapter(RawAdapter):
    """The AfriMed-QA v2 CSV: one row per question, ``question_type`` mcq / saq / consumer_queries."""

    question_type: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    has_split_column = True

    def records(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise KtflowInputError(path, None, "empty CSV file (no header)") from None
        except csv.Error as error:
            raise KtflowInputError(path, "line 1", f"unreadable CSV header ({error})") from None
        missing = [name for name in self.columns if name not in header]
        if missing:
            raise KtflowInputError(
                path,
                "header",
                f"missing column(s) {', '.join(missing)} for adapter {self.name}; found {header}",
            )
        row = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise KtflowInputError(
                    path, f"row {row + 1} (line {reader.line_num})", f"bad CSV ({error})"
                ) from None
            if not values:  # a blank line between records
                continue
            row += 1
            if not any(value.strip() for value in values):
                raise KtflowInputError(path, f"row {row} (line {reader.line_num})", "empty row")
            if len(values) != len(header):
                raise KtflowInputError(
                    path,
                    f"row {row} (line {reader.line_num})",
                    f"{len(values)} fields, the header has {len(header)}",
                )
            yield row, dict(zip(header, values, strict=True))

    def convert(self, path: Path, row: int, record: dict[str, Any], id_prefix: str) -> Example:
        kind = record["question_type"].strip().lower()
        if kind != self.question_type:
            raise LeftOut(f"question_type {kind or '(empty)'}")
        # question_clean is the curators' whitespace-fixed text; fall back to the raw question.
        question = clean_text(record.get("question_clean") or "") or clean_text(record["question"])
        if not question:
            raise KtflowInputError(path, f"row {row}.question", "empty question")
        instruction, prompt, answer = self.question(path, row, record, question)
        sample_id = (record.get("sample_id") or "").strip()
        split = (record.get("split") or "").strip().lower() or None
        return Example(sample_id or f"{id_prefix}-{row:05d}", instruction, prompt, answer, split)

    @abstractmethod
    def question(self, path: Path, row: int, record: dict[str, Any], question: str) -> tuple[str, str, str]:
        """(instruction, input, output) for one row of this question type."""


class AfriMedQAMCQAdapter(AfriMedQAAdapter):
    """MCQ rows: question + options A-E (option1..option5) -> the answer letter."""

    name = "afrimed-qa-mcq"
    kind = "mcq"
    question_type = "mcq"
    columns = ("question_type", "question", "answer_options", "correct_answer")

    def question(self, path: Path, row: int, record: dict[str, Any], question: str) -> tuple[str, str, str]:
        options = self._options(path, row, record["answer_options"])
        answer = record["correct_answer"].strip().lower().replace(" ", "")
        chosen = [_OPTION.fullmatch(part) for part in answer.split(",")]
        if len(chosen) > 1 and all(chosen):
            # Single-letter exact match (the paper's MCQ metric) cannot grade several answers.
            raise LeftOut("several correct answers")
        match = chosen[0]
        if match is None:
            raise KtflowInputError(
                path,
                f"row {row}.correct_answer",
                f"must be one of option1..option5, got {record['correct_answer']!r}",
            )
        number = int(match.group(1))
        if number not in options:
            raise KtflowInputError(
                path,
                f"row {row}.correct_answer",
                f"option{number} is not among answer_options (empty and N/A options are dropped)",
            )
        offered = sorted(options)
        lines = [question] + [f"{LETTERS[n - 1]}. {options[n]}" for n in offered]
        instruction = mcq_instruction("".join(LETTERS[n - 1] for n in offered))
        return instruction, "\n".join(lines), LETTERS[number - 1]

    @staticmethod
    def _options(path: Path, row: int, raw: str) -> dict[int, str]:
        where = f"row {row}.answer_options"
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            raise KtflowInputError(path, where, f"not valid JSON ({error.msg})") from None
        if not isinstance(data, dict):
            raise KtflowInputError(
                path, where, f"expected a JSON object of option1..option5, got {type(data).__name__}"
            )
        options: dict[int, str] = {}
        for key, value in data.items():
            match = _OPTION.fullmatch(str(key).strip().lower())
            if match is None:
                raise KtflowInputError(path, where, f"unexpected key {key!r} (expected option1..option5)")
            text = " ".join(clean_text(str(value)).split()) if value is not None else ""
            # Letters stay tied to option numbers (as in AfriMed-QA), so a blank or "N/A"
            # option leaves a gap, not a shift.
            if text and text.upper() != NOT_AN_OPTION:
                options[int(match.group(1))] = text
        if len(options) < 2:
            raise KtflowInputError(
                path, where, f"needs at least two options that are neither empty nor N/A, got {len(options)}"
            )
        return options


class AfriMedQASAQAdapter(AfriMedQAAdapter):
    """SAQ rows: question -> the contributor's answer_rationale (the reference answer)."""

    name = "afrimed-qa-saq"
    kind = "generation"
    question_type = "saq"
    columns = ("question_type", "question", "answer_rationale")

    def question(self, path: Path, row: int, record: dict[str, Any], question: str) -> tuple[str, str, str]:
        reference = clean_text(record["answer_rationale"])
        if not reference:
            raise KtflowInputError(
                path, f"row {row}.answer_rationale", "empty (it is the SAQ reference answer)"
            )
        return SAQ_INSTRUCTION, question, reference


ADAPTERS: dict[str, type[RawAdapter]] = {
    cls.name: cls
    for cls in (
        AlpacaAdapter,
        TranslationalStyleAdapter,
        NekoQAAdapter,
        AfriMedQAMCQAdapter,
        AfriMedQASAQAdapter,
    )
}


def adapter_for(name: str, on_invalid: str = "error") -> RawAdapter:
    if name not in ADAPTERS:
        raise KtflowInputError(
            None, "adapter", f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[name](on_invalid)

"""Multiple-choice accuracy: AfriMed-QA's official rule, and a separately reported extraction.

``official`` (``accuracy`` in METRICS.json, and what the tables show): AfriMed-QA's
no-explanation scoring takes the model output's first character as the answer
(``[text[0] for text in outputs]``), with no stripping and no upper-casing, and compares
it with the answer letter (option1..option5 -> A..E). " C", "c" and "Answer: C" are
therefore wrong, and a blank output has no first character and is wrong.

``extracted`` (``accuracy_extracted``): the letter a reader would take from the output,
for models that do not answer with a bare letter. Tried in order:

1. ``leading``: a letter at the start, after any whitespace, brackets, quotes or markdown
   ("C", "**B**", "(c)", "C) Malaria", "C项");
2. ``cue``: a letter after "answer", "option" or "choice" (optionally "is" / "would be" and
   ":"), or after 答案 / 选项 / 选 ("The answer is C.", "Answer: D", "答案是C", "选B");
3. ``option_number``: "option 3" / "option3" -> C.

An upper-case letter counts when no letter or digit follows it. A lower-case letter counts
only when the text ends after it or it is followed by closing punctuation that does not
run into another letter: "a viral infection ..." is an article and "e.g. malaria" an
abbreviation, not answers A and E, while "c." and "(b)" are answers. A capital "A patient
..." still reads as A: it cannot be told apart from "A is correct".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ktflow.metrics.flavours import is_blank

LETTERS = "ABCDE"
_OPTION_NUMBER = re.compile(r"option\s*([1-5])", re.IGNORECASE)
_LETTER = (
    r"(?:(?P<upper>[A-E])(?![A-Za-z0-9])"
    r"|(?P<lower>[a-e])(?=[\s\"'`*_]*$|[).:\]}>,*_'\"`]+(?![A-Za-z])))"
)
_DECORATION = r"[\s(\[{<*_#\"'`]*"
_EXTRACTORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("leading", re.compile(r"^" + _DECORATION + _LETTER)),
    (
        "cue",
        re.compile(
            r"(?:(?i:\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be))?\s*[:：=\-]?)"
            r"|(?:答案|选项|选择|选)\s*(?:是|为|应该是|应为)?\s*[:：]?)\s*"
            r"[(\[{*_\"'`（]*" + _LETTER
        ),
    ),
    ("option_number", re.compile(r"(?i:\boption\s*(?P<number>[1-5])\b)")),
)
OFFICIAL_RULE = (
    "official (AfriMed-QA): the output's literal first character must equal the answer letter "
    "(no stripping, no upper-casing); a blank output is wrong"
)
EXTRACTED_RULE = (
    "extracted (ktflow): a leading letter after whitespace/brackets/markdown, else a letter after "
    "answer/option/choice or 答案/选项, else 'option N'; lower-case letters only when punctuation or "
    "the end follows (not articles or abbreviations)"
)


def normalize_label(raw: str) -> str:
    """'A'..'E' (any case) or AfriMed-QA's 'option1'..'option5' -> 'A'..'E'; else ValueError."""
    text = raw.strip()
    if len(text) == 1 and text.upper() in LETTERS:
        return text.upper()
    found = _OPTION_NUMBER.fullmatch(text)
    if found:
        return LETTERS[int(found.group(1)) - 1]
    raise ValueError(f"expected an option letter A-E or option1..option5, got {raw!r}")


def official_choice(text: str) -> str | None:
    """AfriMed-QA's rule: the output's first character, as it is (None for an empty output)."""
    return text[0] if text else None


@dataclass(frozen=True)
class ChoiceMatch:
    """The letter the extraction read from one output and the rule that read it (None: none)."""

    letter: str | None
    rule: str | None


def extract_choice(text: str) -> ChoiceMatch:
    for rule, pattern in _EXTRACTORS:
        found = pattern.search(text)
        if found:
            number = found.groupdict().get("number")
            letter = LETTERS[int(number) - 1] if number else (found["upper"] or found["lower"]).upper()
            return ChoiceMatch(letter, rule)
    return ChoiceMatch(None, None)


def parse_choice(text: str) -> str | None:
    """The answer letter the extraction mode reads from ``text`` (None when it finds none)."""
    return extract_choice(text).letter


@dataclass(frozen=True)
class McqScore:
    label: str
    official: str | None
    extracted: ChoiceMatch
    blank: bool

    @property
    def correct(self) -> bool:
        return self.official == self.label

    @property
    def correct_extracted(self) -> bool:
        return self.extracted.letter == self.label

    def as_row(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "official": self.official,
            "correct": self.correct,
            "extracted": self.extracted.letter,
            "extraction_rule": self.extracted.rule,
            "correct_extracted": self.correct_extracted,
            "empty_prediction": self.blank,
        }


def score_mcq(predictions: Sequence[str], labels: Sequence[str]) -> list[McqScore]:
    """Score each output against its label (labels normalised by ``normalize_label``)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    return [
        McqScore(normalize_label(label), official_choice(text), extract_choice(text), is_blank(text))
        for text, label in zip(predictions, labels, strict=True)
    ]


def summarize_mcq(scores: Sequence[McqScore]) -> dict[str, Any]:
    if not scores:
        raise ValueError("no samples to summarise")
    n = len(scores)
    return {
        "task": "mcq",
        "rule": OFFICIAL_RULE,
        "extraction_rule": EXTRACTED_RULE,
        "n": n,
        "accuracy": sum(score.correct for score in scores) / n,
        "accuracy_extracted": sum(score.correct_extracted for score in scores) / n,
        "empty_predictions": sum(score.blank for score in scores),
        "not_extracted": sum(score.extracted.letter is None for score in scores),
    }

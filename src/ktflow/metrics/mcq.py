"""Multiple-choice accuracy with AfriMed-QA's answer rule plus a documented fallback.

AfriMed-QA's official scoring takes the first character of the model output as
the answer letter (options option1..option5 map to A..E). Read literally, that
turns "Answer: C" into A and "Because ..." into B, so ktflow applies it as:

1. ``first_char`` (official): the first character of the stripped output, upper-cased,
   when it is one of A-E and is not the start of a longer word (the next character,
   if any, is not an ASCII letter). "C", "c.", "B) Malaria", "C项", "A patient ..." parse here.
2. Fallbacks, tried in order only when rule 1 finds nothing:
   ``decorated``: the same after leading brackets, quotes or markdown ("(c)", "**B**");
   ``cue``: a letter after "answer", "option" or "choice", optionally followed by
   "is" / "would be" and ":" ("Answer: C", "The answer is B.", "correct option is (d)");
   ``option_number``: "option 3" / "option3" -> C.
   In ``decorated`` and ``cue`` a lower-case letter counts only when nothing but
   punctuation follows it, so "the answer is a viral infection" is not read as A.
3. Otherwise the output is ``unparsed`` and counts as wrong.

The literal official rule (first character, upper-cased, no word check) is reported
beside it as ``accuracy_first_char`` so published numbers stay comparable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = "ABCDE"
_FIRST_CHAR = re.compile(r"[A-Ea-e](?![A-Za-z])")
_OPTION_NUMBER = re.compile(r"option\s*([1-5])", re.IGNORECASE)
# Upper case: any letter not glued to a following word character. Lower case: only
# when followed by punctuation or the end, because "a" is also an English article.
_LETTER = r"(?:(?P<upper>[A-E])(?![A-Za-z0-9])|(?P<lower>[a-e])(?=[\s).:\],*'\"]*$|[).:\],*'\"]))"
_FALLBACKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("decorated", re.compile(r"^[\s(\[{<*_#\"'`]+" + _LETTER)),
    (
        "cue",
        re.compile(
            r"(?i:\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be))?\s*[:：=\-]?\s*[(\[{*\"'`]*)"
            + _LETTER
        ),
    ),
    ("option_number", re.compile(r"(?i:\boption\s*(?P<number>[1-5])\b)")),
)


@dataclass(frozen=True)
class ChoiceMatch:
    """The letter read from one output and the rule that read it (None: unparsed)."""

    letter: str | None
    rule: str | None

    @property
    def fallback_used(self) -> bool:
        return self.rule not in (None, "first_char")


def normalize_label(raw: str) -> str:
    """'A'..'E' (any case) or AfriMed-QA's 'option1'..'option5' -> 'A'..'E'; else ValueError."""
    text = raw.strip()
    if len(text) == 1 and text.upper() in LETTERS:
        return text.upper()
    found = _OPTION_NUMBER.fullmatch(text)
    if found:
        return LETTERS[int(found.group(1)) - 1]
    raise ValueError(f"expected an option letter A-E or option1..option5, got {raw!r}")


def first_char_choice(text: str) -> str | None:
    """AfriMed-QA's literal rule: the first character of the stripped output, upper-cased."""
    stripped = text.strip()
    return stripped[0].upper() if stripped and stripped[0].upper() in LETTERS else None


def match_choice(text: str) -> ChoiceMatch:
    stripped = text.strip()
    if _FIRST_CHAR.match(stripped):
        return ChoiceMatch(stripped[0].upper(), "first_char")
    for rule, pattern in _FALLBACKS:
        found = pattern.search(stripped)
        if found:
            number = found.groupdict().get("number")
            letter = LETTERS[int(number) - 1] if number else (found["upper"] or found["lower"]).upper()
            return ChoiceMatch(letter, rule)
    return ChoiceMatch(None, None)


def parse_choice(text: str) -> tuple[str | None, bool]:
    """(answer letter or None, whether a fallback rule was needed)."""
    found = match_choice(text)
    return found.letter, found.fallback_used


@dataclass(frozen=True)
class McqScore:
    label: str
    match: ChoiceMatch
    first_char: str | None

    @property
    def correct(self) -> bool:
        return self.match.letter == self.label

    def as_row(self) -> dict[str, Any]:
        return {
            "parsed": self.match.letter,
            "label": self.label,
            "correct": self.correct,
            "rule": self.match.rule,
            "first_char": self.first_char,
            "correct_first_char": self.first_char == self.label,
        }


def score_mcq(predictions: Sequence[str], labels: Sequence[str]) -> list[McqScore]:
    """Score each output against its label (labels normalised by ``normalize_label``)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    return [
        McqScore(normalize_label(label), match_choice(text), first_char_choice(text))
        for text, label in zip(predictions, labels, strict=True)
    ]


def summarize_mcq(scores: Sequence[McqScore]) -> dict[str, Any]:
    if not scores:
        raise ValueError("no samples to summarise")
    n = len(scores)
    return {
        "task": "mcq",
        "rule": "afrimed-qa first character, with ktflow fallbacks (see ktflow.metrics.mcq)",
        "n": n,
        "accuracy": sum(score.correct for score in scores) / n,
        "accuracy_first_char": sum(score.first_char == score.label for score in scores) / n,
        "unparsed": sum(score.match.letter is None for score in scores),
        "fallback_used": sum(score.match.fallback_used for score in scores),
    }

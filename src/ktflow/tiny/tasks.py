"""Two seeded toy tasks that mirror the paper's: a style rewrite and a multiple-choice quiz.

The command is ``ktflow tiny-tasks`` (:mod:`ktflow.steps.tiny_tasks`).

- ``style`` (generation, scored with BLEU/ROUGE): plain English sentences rewritten
  in a stilted "translational" register, like the Translational-Style data set.
- ``choice`` (multiple choice, scored by accuracy): "which word names a <category>?" or
  "which word is the same kind of thing as <word>?" with five options A-E and the
  answer letter, like AfriMed-QA's MCQ split.

Both are built from fixed word lists with a seeded RNG, so every run makes the
same files; train and test splits are disjoint by construction.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from ktflow.atomic import write_json

SUBJECTS = {
    "the old farmer": "the aged farmer",
    "my sister": "my honoured sister",
    "a young doctor": "a youthful physician",
    "the teacher": "the esteemed teacher",
    "our neighbour": "our good neighbour",
    "the little boy": "the small child",
    "a tired soldier": "a weary soldier",
    "the quiet student": "the silent scholar",
}
VERBS = {
    "found": "did discover",
    "carried": "did bear",
    "painted": "did adorn",
    "sold": "did trade away",
    "lost": "did misplace",
    "cleaned": "did purify",
    "opened": "did unseal",
    "borrowed": "did take on loan",
}
OBJECTS = ["a red box", "the wooden door", "an old map", "the broken clock", "a small boat", "the silver key"]
PLACES = ["in the market", "near the river", "at the station", "behind the house", "on the hill"]
TIMES = {
    "yesterday": "upon the previous day",
    "last night": "during the night that has passed",
    "this morning": "in the early hours of this day",
    "on sunday": "upon the day of sunday",
}
# The closing formula varies at random, so no model can score 100: like a real
# style corpus, the reference is one of several acceptable renderings.
ENDINGS = ["so it is told", "as the elders say", "thus it was recorded"]
STYLE_INSTRUCTION = "Rewrite the sentence in translational style."

CATEGORIES = {
    "animal": ["cat", "horse", "rabbit", "tiger", "sheep", "eagle", "whale", "mouse"],
    "colour": ["red", "green", "purple", "yellow", "orange", "brown", "white", "blue"],
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "lemon", "grape", "peach"],
    "tool": ["hammer", "saw", "wrench", "drill", "shovel", "chisel", "ladder", "needle"],
    "number": ["seven", "twelve", "three", "forty", "nine", "eighty", "five", "sixty"],
}
LETTERS = "ABCDE"
CHOICE_INSTRUCTION = "Answer the multiple-choice question with the letter of the correct option."


def style_example(subject: str, verb: str, obj: str, place: str, time: str, ending: str) -> dict[str, str]:
    plain = f"{subject} {verb} {obj} {place} {time}."
    styled = f"It was {TIMES[time]} that {SUBJECTS[subject]} {VERBS[verb]} {obj} {place}, {ending}."
    return {"instruction": STYLE_INSTRUCTION, "input": plain, "output": styled[0].upper() + styled[1:]}


def style_task(seed: int, n_train: int, n_test: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    combos = list(itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES, TIMES))
    rng = random.Random(seed)
    rng.shuffle(combos)
    if n_train + n_test > len(combos):
        raise ValueError(f"style task has {len(combos)} distinct sentences, asked for {n_train + n_test}")
    rows = [style_example(*combo, rng.choice(ENDINGS)) for combo in combos[: n_train + n_test]]
    return _split(rows, n_train, "style")


def choice_example(rng: random.Random) -> dict[str, str]:
    """Options list one word per category in a fixed category order, so the answer is learnable
    from word knowledge: half the questions name the category, half give another member of it."""
    categories = list(CATEGORIES)
    target = rng.choice(categories)
    options = [rng.choice(CATEGORIES[category]) for category in categories]
    answer = categories.index(target)
    if rng.random() < 0.5:
        article = "an" if target[0] in "aeiou" else "a"
        question = f"Which word names {article} {target}?"
    else:
        hint = rng.choice([word for word in CATEGORIES[target] if word != options[answer]])
        question = f"Which word is the same kind of thing as {hint}?"
    lines = [question] + [f"{LETTERS[i]}. {word}" for i, word in enumerate(options)]
    return {"instruction": CHOICE_INSTRUCTION, "input": "\n".join(lines), "output": LETTERS[answer]}


def choice_task(seed: int, n_train: int, n_test: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(seed + 1)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < n_train + n_test:
        row = choice_example(rng)
        if row["input"] not in seen:  # disjoint splits: no question appears twice
            seen.add(row["input"])
            rows.append(row)
    return _split(rows, n_train, "choice")


def _split(
    rows: list[dict[str, Any]], n_train: int, prefix: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    for index, row in enumerate(rows):
        row["id"] = f"{prefix}-{index:05d}"
    return rows[:n_train], rows[n_train:]


TASKS = {"style": ("generation", style_task), "choice": ("mcq", choice_task)}


def corpus(seed: int = 0) -> list[str]:
    """Every text the tiny tasks can contain, for training the tiny tokenizer."""
    train, test = style_task(seed, len(SUBJECTS) * len(VERBS) * len(OBJECTS) * len(PLACES) * len(TIMES), 0)
    texts = [STYLE_INSTRUCTION, CHOICE_INSTRUCTION]
    texts += [f"{row['input']}\n{row['output']}" for row in train + test]
    rng = random.Random(seed)
    texts += [choice_example(rng)["input"] for _ in range(500)]
    return texts


# Preference data for the DPO / KTO stages, derived from a task's alpaca rows: the
# reference answer is the preferred one, and each task knows a plausible wrong one.
FORMATS = ("alpaca", "sharegpt", "pairwise", "kto")


def style_rejected(row: dict[str, Any], rng: random.Random) -> str:
    """The plain sentence echoed back: right content, wrong register."""
    plain = str(row["input"])
    return plain[0].upper() + plain[1:]


def choice_rejected(row: dict[str, Any], rng: random.Random) -> str:
    """A wrong option letter, drawn with the task's seeded RNG."""
    return rng.choice([letter for letter in LETTERS if letter != row["output"]])


REJECTED = {"style": style_rejected, "choice": choice_rejected}


def derive(name: str, rows: list[dict[str, Any]], data_format: str, seed: int) -> list[dict[str, Any]]:
    """``rows`` (alpaca, with ids) in ``data_format``; the same rows and seed give the same output.

    pairwise: chosen = the reference, rejected = the task's wrong answer. kto: one row per
    prompt, alternately the reference (``kto_tag`` true) and the wrong answer (false), so
    desirable and undesirable examples are balanced.
    """
    if data_format == "alpaca":
        return rows
    if data_format == "sharegpt":
        return [
            {
                "id": row["id"],
                "conversations": [
                    {
                        "from": "human",
                        "value": "\n".join(filter(None, (row["instruction"], row.get("input")))),
                    },
                    {"from": "gpt", "value": row["output"]},
                ],
            }
            for row in rows
        ]
    rng = random.Random(seed + 2)
    prompt = ("id", "instruction", "input")
    derived: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        wrong = REJECTED[name](row, rng)
        base = {key: row[key] for key in prompt if key in row}
        if data_format == "pairwise":
            derived.append({**base, "chosen": row["output"], "rejected": wrong})
        elif data_format == "kto":
            desirable = index % 2 == 0
            derived.append({**base, "output": row["output"] if desirable else wrong, "kto_tag": desirable})
        else:
            raise ValueError(f"unknown data format {data_format!r} (one of {FORMATS})")
    return derived


def write_task(
    name: str, out_dir: Path, seed: int, n_train: int, n_test: int, data_format: str = "alpaca"
) -> None:
    _, builder = TASKS[name]
    train, test = builder(seed, n_train, n_test)
    write_checked(out_dir / "train.json", derive(name, train, data_format, seed), data_format)
    write_checked(out_dir / "test.json", test, "alpaca")


def write_checked(path: Path, rows: list[dict[str, Any]], data_format: str) -> None:
    """Rows go out only if the dataset contract (what train and infer check) accepts them."""
    from ktflow.datasets.contract import check_rows

    check_rows(path, rows, data_format, require_id=True)
    write_json(path, rows)

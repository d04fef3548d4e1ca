"""Deterministic train/test splits: seeded random, the first N rows, or the data set's own column."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ktflow.datasets.adapters import Example
from ktflow.errors import KtflowInputError

METHODS = ("random", "head", "column")


@dataclass(frozen=True)
class SplitSpec:
    """``random``: a seeded ``test_size`` (fraction < 1, or a row count); ``head``: the first
    ``train_rows`` rows train, the rest test (Translational-Style's published split);
    ``column``: the raw set's own train/test labels (AfriMed-QA's ``split``). ``max_train`` /
    ``max_test`` then keep a seeded sample, in file order, to bound training or inference cost.
    """

    method: str = "random"
    test_size: float = 0.1
    train_rows: int | None = None
    max_train: int | None = None
    max_test: int | None = None
    seed: int = 42

    @classmethod
    def from_config(cls, data: dict[str, Any], seed: int) -> SplitSpec:
        known = {"method", "test_size", "train_rows", "max_train", "max_test"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KtflowInputError(None, "split", f"unknown key(s) {unknown}; known: {sorted(known)}")
        spec = cls(**data, seed=seed)
        if spec.method not in METHODS:
            raise KtflowInputError(None, "split.method", f"must be one of {METHODS}, got {spec.method!r}")
        if spec.method == "head" and spec.train_rows is None:
            raise KtflowInputError(None, "split.train_rows", "split method head needs train_rows")
        return spec


def _rows_for_test(spec: SplitSpec, total: int) -> int:
    count = round(spec.test_size * total) if spec.test_size < 1 else int(spec.test_size)
    if not 1 <= count < total:
        raise KtflowInputError(
            None,
            "split.test_size",
            f"{spec.test_size} leaves {count} of {total} rows for test; need 1..{total - 1}",
        )
    return count


def _cap(rows: list[Example], limit: int | None, rng: random.Random) -> list[Example]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[index] for index in keep]


def split_examples(
    examples: list[Example], spec: SplitSpec, has_split_column: bool = True
) -> tuple[list[Example], list[Example], Counter[str]]:
    """(train, test, rows left out by reason); both splits keep the raw file's order."""
    dropped: Counter[str] = Counter()
    total = len(examples)
    if spec.method == "random":
        order = list(range(total))
        random.Random(spec.seed).shuffle(order)
        test_index = set(order[: _rows_for_test(spec, total)])
        train = [row for index, row in enumerate(examples) if index not in test_index]
        test = [row for index, row in enumerate(examples) if index in test_index]
    elif spec.method == "head":
        assert spec.train_rows is not None
        if not 1 <= spec.train_rows < total:
            raise KtflowInputError(
                None,
                "split.train_rows",
                f"{spec.train_rows} must be between 1 and {total - 1} ({total} usable rows)",
            )
        train, test = examples[: spec.train_rows], examples[spec.train_rows :]
    else:
        if not has_split_column:
            raise KtflowInputError(
                None, "split.method", "column needs a raw format with a split column (AfriMed-QA)"
            )
        train = [row for row in examples if row.split == "train"]
        test = [row for row in examples if row.split == "test"]
        dropped.update(
            f"split {row.split or '(empty)'}" for row in examples if row.split not in ("train", "test")
        )
    rng = random.Random(spec.seed + 1)
    capped_train, capped_test = _cap(train, spec.max_train, rng), _cap(test, spec.max_test, rng)
    dropped["over max_train"] += len(train) - len(capped_train)
    dropped["over max_test"] += len(test) - len(capped_test)
    for name, rows in (("train", capped_train), ("test", capped_test)):
        if not rows:
            raise KtflowInputError(
                None, "split", f"the {name} split is empty ({spec.method} split of {total} rows)"
            )
    return capped_train, capped_test, +dropped

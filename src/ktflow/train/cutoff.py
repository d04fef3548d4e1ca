"""Training rows longer than ``cutoff_len``: LLaMA-Factory cuts them silently; ktflow says so and counts.

The count is of the row's text tokens (prompt and answers, without the chat template, which
LLaMA-Factory adds on top), so a row reported over the cutoff is surely cut; the figures go
to the log and to the training provenance (``over_cutoff``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ktflow.datasets.contract import Layout, row_name
from ktflow.readers.rows import load_rows
from ktflow.token_count import PromptCounter
from ktflow.train.datasets import HUB_PREFIX
from ktflow.train.spec import TrainSpec

log = logging.getLogger(__name__)


def row_texts(row: dict[str, Any], layout: Layout) -> list[str]:
    """The texts of one (contract-checked) row that LLaMA-Factory tokenizes into one sequence."""
    columns, tags = layout.columns, layout.tags
    if layout.formatting == "sharegpt":
        turns = [*row[columns["messages"]]]
        turns += [row[columns[key]] for key in ("chosen", "rejected") if key in columns]
        return [str(turn.get(tags["content_tag"]) or "") for turn in turns if isinstance(turn, dict)]
    keys = ("prompt", "query", "chosen", "rejected") if layout.ranking else ("prompt", "query", "response")
    return [str(row.get(columns[key]) or "") for key in keys if key in columns]


def text_tokens(counter: PromptCounter, text: str, cutoff: int) -> int:
    """Tokens of ``text``; a text surely over ``cutoff`` is judged by its length, never tokenized whole."""
    floor = counter.at_least(text)
    if floor > cutoff:
        return floor
    return len(counter.tokenizer.encode(text, add_special_tokens=False))


def over_cutoff(path: Path, layout: Layout, tokenizer: Any, cutoff: int) -> dict[str, Any]:
    """Counts of rows over ``cutoff`` text tokens (logged with the first few rows)."""
    counter = PromptCounter(tokenizer)
    rows = load_rows(path)
    over: list[int] = []
    longest = 0
    for number, row in enumerate(rows, start=1):
        tokens = text_tokens(counter, "\n".join(row_texts(row, layout)), cutoff)
        longest = max(longest, tokens)
        if tokens > cutoff:
            over.append(number)
    if over:
        first = ", ".join(row_name(number) for number in over[:5])
        log.warning(
            "%s: %d of %d rows have more than cutoff_len %d tokens of text (longest %d; %s%s); "
            "LLaMA-Factory truncates them to cutoff_len",
            path, len(over), len(rows), cutoff, longest, first, ", ..." if len(over) > 5 else "",
        )  # fmt: skip
    return {"cutoff_len": cutoff, "rows": len(rows), "over_cutoff": len(over), "longest_text_tokens": longest}


def report(spec: TrainSpec, location: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """``over_cutoff`` for a local data file (a hub data set is not read by ktflow)."""
    if location.startswith(HUB_PREFIX):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, trust_remote_code=spec.trust_remote_code)
    return over_cutoff(Path(location), Layout.of(spec.data_format, entry), tokenizer, spec.cutoff_len)

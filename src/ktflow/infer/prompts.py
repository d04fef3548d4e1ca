"""Prompt length: rows whose prompt would not fit the model are refused or cut, before it loads.

The limit is ``inference.max_prompt_tokens`` or the model's ``max_position_embeddings`` minus
``max_new_tokens``, whichever is smaller; a prompt is counted as the backend sends it (the
chat template around the row's instruction and input). ``inference.overlong`` says what
happens to a longer row: ``refuse`` (the default: one error naming the file, row and field)
or ``truncate`` (the prompt keeps its first tokens; each cut row is logged and counted in
the provenance). A huge row is judged by its length in characters first, so a 20 MB row
never reaches the tokenizer, let alone the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktflow.datasets.contract import row_name
from ktflow.errors import KtflowInputError
from ktflow.infer.base import Request, Sampling
from ktflow.token_count import PromptCounter

log = logging.getLogger(__name__)

POLICIES = ("refuse", "truncate")


@dataclass(frozen=True)
class PromptLimit:
    tokens: int
    origin: str  # where the figure comes from, for messages and provenance
    policy: str


def _positions(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an external server's model: only max_prompt_tokens can bound it
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def prompt_limit(spec: dict[str, Any], model_dir: Path) -> PromptLimit | None:
    """The bound for this run, or None when neither the config nor the model gives one."""
    policy = spec.get("overlong", "refuse")
    if policy not in POLICIES:
        raise KtflowInputError(
            "config", "inference.overlong", f"{policy!r} is not one of {', '.join(POLICIES)}"
        )
    candidates: list[tuple[int, str]] = []
    if "max_prompt_tokens" in spec:
        candidates.append((int(spec["max_prompt_tokens"]), "inference.max_prompt_tokens"))
    positions = _positions(model_dir)
    if positions is not None:
        new = int(spec.get("max_new_tokens", Sampling.max_new_tokens))
        if positions - new < 1:
            message = f"{new} leaves no room for a prompt in max_position_embeddings {positions}"
            raise KtflowInputError("config", "inference.max_new_tokens", message)
        candidates.append((positions - new, f"max_position_embeddings {positions} - max_new_tokens {new}"))
    if not candidates:
        return None
    tokens, origin = min(candidates)
    return PromptLimit(tokens, origin, policy)


def cut_prompt(counter: PromptCounter, request: Request, limit: int) -> Request:
    """The request with its prompt's end cut off so the whole prompt fits ``limit`` tokens."""
    return dataclasses.replace(request, messages=counter.cut(request.messages, limit))


def longest_field(row: dict[str, Any]) -> str:
    """The column to name for an over-long prompt: the longer of instruction and input."""
    return max(("instruction", "input"), key=lambda key: len(row.get(key) or ""))


def bound_prompts(
    path: Path,
    rows: list[dict[str, Any]],
    requests: list[Request],
    limit: PromptLimit,
    counter: PromptCounter,
) -> tuple[list[Request], dict[str, Any]]:
    """Requests that fit ``limit`` (refusing or cutting the others) and the counts for provenance."""
    bounded: list[Request] = []
    truncated, longest = 0, 0
    for number, (row, request) in enumerate(zip(rows, requests, strict=True), start=1):
        floor = counter.at_least(request.prompt)
        tokens = floor if floor > limit.tokens else counter.count(request.messages)
        longest = max(longest, tokens)
        if tokens <= limit.tokens:
            bounded.append(request)
            continue
        size = f"at least {tokens}" if tokens == floor else str(tokens)
        if limit.policy == "refuse":
            message = (
                f"prompt is {size} tokens, over the limit of {limit.tokens} ({limit.origin}); "
                "set inference.overlong: truncate to cut such prompts, or shorten the row"
            )
            raise KtflowInputError(path, row_name(number, longest_field(row)), message)
        truncated += 1
        if truncated <= 5:
            log.warning("%s: %s: prompt of %s tokens cut to %d", path, row_name(number), size, limit.tokens)
        bounded.append(cut_prompt(counter, request, limit.tokens))
    if truncated:
        log.warning("%s: %d of %d prompts cut to %d tokens (%s)", path, truncated, len(rows), limit.tokens,
                    limit.origin)  # fmt: skip
    facts = {"limit": limit.tokens, "from": limit.origin, "policy": limit.policy, "rows": len(rows),
             "truncated": truncated, "longest_prompt_tokens": longest}  # fmt: skip
    return bounded, facts

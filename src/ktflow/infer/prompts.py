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


class PromptCounter:
    """Counts prompt tokens as the backend will send them (chat template included)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # No token spans more characters than the longest vocabulary entry, so a text of
        # n characters has at least n / longest tokens: an upper bound read without tokenizing.
        self.longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1

    def count(self, messages: list[dict[str, str]]) -> int:
        encoded: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def at_least(self, text: str) -> int:
        return len(text) // self.longest

    def cut(self, request: Request, limit: int) -> Request:
        """The request with its prompt's end cut off so the whole prompt fits ``limit`` tokens."""
        content = request.prompt[: limit * self.longest]
        ids = self.tokenizer.encode(content, add_special_tokens=False)
        keep = max(limit - self.count(_with(request, "").messages), 0)
        while True:
            shorter = _with(request, self.tokenizer.decode(ids[:keep], skip_special_tokens=False))
            excess = self.count(shorter.messages) - limit
            if excess <= 0 or keep == 0:
                return shorter
            keep = max(keep - excess, 0)  # token merges at the cut can add a token or two


def _with(request: Request, content: str) -> Request:
    messages = [*request.messages[:-1], {**request.messages[-1], "content": content}]
    return dataclasses.replace(request, messages=messages)


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
        bounded.append(counter.cut(request, limit.tokens))
    if truncated:
        log.warning("%s: %d of %d prompts cut to %d tokens (%s)", path, truncated, len(rows), limit.tokens,
                    limit.origin)  # fmt: skip
    facts = {"limit": limit.tokens, "from": limit.origin, "policy": limit.policy, "rows": len(rows),
             "truncated": truncated, "longest_prompt_tokens": longest}  # fmt: skip
    return bounded, facts

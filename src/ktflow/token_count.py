"""Token counts of chat prompts and texts, as a tokenizer with its chat template sees them.

Shared by ``infer`` (prompts over the model's limit) and ``train`` (rows over ``cutoff_len``),
so neither step imports the other for it.
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


class PromptCounter:
    """Counts prompt tokens as the backend will send them (chat template included)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # No token spans more characters than the longest vocabulary entry, so a text of
        # n characters has at least n / longest tokens: an upper bound read without tokenizing.
        self.longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1

    def count(self, messages: Messages) -> int:
        encoded: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def at_least(self, text: str) -> int:
        return len(text) // self.longest

    def cut(self, messages: Messages, limit: int) -> Messages:
        """The messages with the last one's end cut off so the whole prompt fits ``limit`` tokens."""
        content = messages[-1]["content"][: limit * self.longest]
        ids = self.tokenizer.encode(content, add_special_tokens=False)
        keep = max(limit - self.count(_with_last(messages, "")), 0)
        while True:
            shorter = _with_last(messages, self.tokenizer.decode(ids[:keep], skip_special_tokens=False))
            excess = self.count(shorter) - limit
            if excess <= 0 or keep == 0:
                return shorter
            keep = max(keep - excess, 0)  # token merges at the cut can add a token or two


def _with_last(messages: Messages, content: str) -> Messages:
    return [*messages[:-1], {**messages[-1], "content": content}]

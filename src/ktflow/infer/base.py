"""The inference interface, the request rows, and the resumable JSONL writer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktflow.atomic import storage_errors, write_jsonl, write_text
from ktflow.datasets.contract import check_task_rows

log = logging.getLogger(__name__)


class InferenceError(RuntimeError):
    """Generation failed for a reason other than bad input (server gone, repeated 5xx, timeouts)."""


class ServerDied(InferenceError):
    """A server ktflow launched exited; a restart (if configured) may continue the run."""


@dataclass(frozen=True)
class Request:
    id: str
    messages: list[dict[str, str]]
    label: str
    # The LoRA adapter's served name, or None for the base model (servers pick it per request).
    adapter: str | None = None

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    batch_size: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceBackend(ABC):
    name: str
    generated_tokens: int = 0

    @abstractmethod
    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, str]]:
        """Yield (request, completion) pairs as they finish; order may differ from the input."""

    def facts(self) -> dict[str, Any]:
        """What provenance should record about how this backend ran (server command, restarts)."""
        return {}

    def close(self) -> None:
        """Release models, servers and connections."""


def requests_from_alpaca(
    path: Path, rows: list[dict[str, Any]], system: str | None = None, adapter: str | None = None
) -> list[Request]:
    """Prompt = instruction + newline + input, exactly as LLaMA-Factory's alpaca converter builds it.

    The rows are checked by the dataset contract first (the same check train and prepare-task use).
    """
    check_task_rows(path, rows)
    requests: list[Request] = []
    for row in rows:
        content = "\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]
        requests.append(Request(id=row["id"], messages=messages, label=row["output"], adapter=adapter))
    return requests


class ResumableJsonl:
    """Rows land in ``<out>.partial`` as they finish; ``finish()`` renames it to ``<out>``.

    After a kill, the partial file tells which ids are done, so a rerun only asks for
    the rest. A torn last line (killed mid-write) is dropped. With a ``fingerprint``
    (a digest of everything that shapes a prediction), rows written under another
    fingerprint are discarded instead of being mixed into this run's output. A full
    disk or a denied write is one StorageError; earlier rows are never truncated (the
    partial file is only ever appended to, or replaced whole).
    """

    def __init__(self, out: Path, fingerprint: str | None = None) -> None:
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.key_file = out.with_name(out.name + ".partial.key")
        self.done: dict[str, dict[str, Any]] = {}
        intact = True
        if self.partial.is_file() and self._same_run(fingerprint):
            for line in self.partial.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    intact = False
                    break
                self.done[row["id"]] = row
        elif self.partial.is_file():
            intact = False
        existed = {path: path.exists() for path in (self.partial, self.key_file)}
        with storage_errors(out):
            try:
                self.partial.parent.mkdir(parents=True, exist_ok=True)
                if fingerprint is not None and (
                    not self.key_file.is_file()
                    or self.key_file.read_text(encoding="utf-8").strip() != fingerprint
                ):
                    write_text(self.key_file, fingerprint + "\n")
                if not intact:  # drop a torn tail or another run's rows, atomically
                    write_jsonl(self.partial, list(self.done.values()))
                self._handle = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except BaseException:
                for path, was_there in existed.items():
                    if not was_there:
                        path.unlink(missing_ok=True)
                raise

    def _same_run(self, fingerprint: str | None) -> bool:
        if fingerprint is None:
            return True
        previous = self.key_file.read_text(encoding="utf-8").strip() if self.key_file.is_file() else None
        if previous != fingerprint:
            log.warning("%s was written with other settings; starting over", self.partial)
            return False
        return True

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with storage_errors(self.out):
            for row in rows:
                self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.done[row["id"]] = row
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        # Every row was fsynced by append(); a close that fails on a full disk loses nothing.
        with contextlib.suppress(OSError):
            self._handle.close()

    def finish(self, order: list[str]) -> None:
        self.close()
        missing = [key for key in order if key not in self.done]
        if missing:
            raise InferenceError(
                f"{self.out}: {len(missing)} rows have no prediction (first: {missing[0]}); left as .partial"
            )
        write_jsonl(self.out, [self.done[key] for key in order])
        with storage_errors(self.out):
            self.partial.unlink()
            self.key_file.unlink(missing_ok=True)

"""One exception type for bad user input, so the CLI can print one clear line."""

from __future__ import annotations

from pathlib import Path


class KtflowInputError(Exception):
    """Bad input: names the file and the field (key, tensor, column) at fault."""

    def __init__(self, path: str | Path | None, field: str | None, message: str) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        where = ": ".join(part for part in (self.path, self.field) if part)
        return f"{where}: {self.message}" if where else self.message


class HardwareError(Exception):
    """The host lacks what a step needs (CPU ISA, GPU); raised before any work is done."""

"""One JSON object read from a file, every fault naming that file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KtflowInputError(path, None, "file not found") from None
    except (OSError, ValueError) as error:
        raise KtflowInputError(path, None, f"not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "expected a JSON object")
    return data

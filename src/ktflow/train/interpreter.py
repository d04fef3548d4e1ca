"""Which Python interpreter trains a backend: ``training.python`` names one per backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ktflow.host.python_env import resolve_python
from ktflow.train.backends import backend_for


def python_for(python_map: dict[str, Any] | None, backend: str) -> Path | None:
    """The interpreter configured for ``backend`` (None: this one); ``kt-legacy`` falls back to ``kt``'s."""
    python_map = python_map or {}
    for key in backend_for(backend).python_keys():
        if python_map.get(key):
            return resolve_python(python_map[key], f"training.python.{key}")
    return None

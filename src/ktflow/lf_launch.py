"""Run ``llamafactory-cli`` in this interpreter, working around CPU-only torchaudio.

LLaMA-Factory 0.9.5 imports torchaudio at module level (``data/mm_plugin.py``) but
uses it only to decode audio inputs. The registry's torchaudio wheels are
CUDA-linked and pinned to one torch each, so a CPU-only environment cannot have
a working torchaudio. Rather than shipping a fake package (which transformers
would then believe is usable), ktflow imports that one LLaMA-Factory module with
a placeholder that raises a clear error if audio is ever touched, then removes
the placeholder so every other library still sees torchaudio as absent.

Usage: ``python -m ktflow.lf_launch train config.yaml`` (any llamafactory-cli args).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from typing import Any


class _Unavailable(types.ModuleType):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self._reason = reason

    def __getattr__(self, attr: str) -> Any:
        # AttributeError keeps hasattr()-style introspection working.
        raise AttributeError(
            f"{self.__name__}.{attr} is unavailable: {self._reason}. Audio datasets need a torchaudio "
            "build that matches the installed torch (install one into this environment)."
        )


def import_llamafactory() -> None:
    """Import LLaMA-Factory's data plugins even where torchaudio cannot load."""
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError) as error:
        # transformers probes torchaudio with find_spec while it initialises; let it
        # finish (seeing no torchaudio) before the placeholder goes in.
        importlib.import_module("transformers")
        importlib.import_module("peft")
        sys.modules["torchaudio"] = _Unavailable("torchaudio", f"torchaudio does not load here ({error})")
        try:
            importlib.import_module("llamafactory.data.mm_plugin")
        finally:
            del sys.modules["torchaudio"]


def main(argv: Sequence[str] | None = None) -> int:
    import_llamafactory()
    from llamafactory.cli import main as lf_main

    sys.argv = ["llamafactory-cli", *(sys.argv[1:] if argv is None else argv)]
    result = lf_main()
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

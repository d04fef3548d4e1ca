"""Inference backends: one file per ``inference.backend`` value, each owning its facts, and the
registry by that name (the schema's enum)."""

from __future__ import annotations

from ktflow.errors import KtflowInputError
from ktflow.infer.backends.base import Backend
from ktflow.infer.backends.hf import HfBackend
from ktflow.infer.backends.llamafactory import LlamaFactoryBackend
from ktflow.infer.backends.openai import OpenAIBackend
from ktflow.infer.backends.sglang import SGLangBackend

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (HfBackend(), OpenAIBackend(), SGLangBackend(), LlamaFactoryBackend())
}
DEFAULT_BACKEND = HfBackend.name


def backend_named(name: str) -> Backend:
    if name not in BACKENDS:
        raise KtflowInputError("config", "inference.backend", f"{name!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[name]

"""The config's inference block as ``ktflow infer`` gets it (``--spec``): known keys, sane values.

Each backend declares the keys only it reads (``ktflow.infer.backends``); the keys here are the
ones every backend shares.
"""

from __future__ import annotations

from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.backends import BACKENDS, DEFAULT_BACKEND, backend_named
from ktflow.infer.base import Sampling

SAMPLING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")
# Settings that change how the run goes but not what it predicts: changing them keeps the
# rows an interrupted run left in OUT.partial.
OPERATIONAL_KEYS = frozenset({"batch_size"}).union(*(b.operational_keys for b in BACKENDS.values()))
SPEC_KEYS = frozenset(
    (*SAMPLING_KEYS, "backend", "dtype", "system", "trust_remote_code", "extra_body", "overlong",
     "max_prompt_tokens")
).union(*(b.spec_keys for b in BACKENDS.values()))  # fmt: skip


def check_spec(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise KtflowInputError("--spec", None, "expected a JSON object (the config's inference block)")
    for key in spec:
        if key not in SPEC_KEYS:
            raise KtflowInputError(
                "--spec", key, f"unknown inference setting (known: {', '.join(sorted(SPEC_KEYS))})"
            )
    backend_named(spec.get("backend", DEFAULT_BACKEND)).check(spec)
    for key in ("concurrency", "batch_size", "max_new_tokens", "threads"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise KtflowInputError(
                "config", f"inference.{key}", f"must be a positive integer, got {spec[key]!r}"
            )
    for key in ("retries", "restarts"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 0):
            raise KtflowInputError(
                "config", f"inference.{key}", f"must be an integer >= 0, got {spec[key]!r}"
            )
    return spec


def sampling_of(spec: dict[str, Any]) -> Sampling:
    return Sampling(
        **{key: spec[key] for key in SAMPLING_KEYS if key in spec}, extra=dict(spec.get("extra_body") or {})
    )

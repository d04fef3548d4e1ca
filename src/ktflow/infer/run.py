"""``ktflow infer``: predictions JSONL {id, prompt, predict, label} for base or base + adapter.

The backend (``inference.backend``, one file each in ``ktflow.infer.backends``) generates;
this driver does what every backend shares. Rows are kept in ``OUT.partial`` as they finish,
so a rerun after a crash, a dead server or Ctrl-C only asks for the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.backends import DEFAULT_BACKEND, backend_named
from ktflow.infer.backends.base import Backend, InferInputs
from ktflow.infer.base import InferenceBackend, InferenceError, Request, ResumableJsonl, requests_from_alpaca
from ktflow.infer.prompts import bound_prompts, prompt_limit
from ktflow.infer.spec import OPERATIONAL_KEYS, check_spec, sampling_of
from ktflow.provenance import recorded
from ktflow.readers.rows import load_rows
from ktflow.token_count import PromptCounter

log = logging.getLogger(__name__)


def _stamp(path: Path) -> list[tuple[str, int, int]]:
    """Cheap identity of a file or directory (names, sizes, mtimes): no 700 GB hashing."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.name != "provenance.json"]  # fmt: skip


def run_fingerprint(spec: dict[str, Any], paths: list[Path | None], adapter_name: str | None) -> str:
    """Everything that shapes a prediction: a partial file written under another one is discarded."""
    shaping = {key: value for key, value in spec.items() if key not in OPERATIONAL_KEYS}
    stamps = [_stamp(path) if path is not None and path.exists() else None for path in paths]
    payload = json.dumps(
        [shaping, [str(p) for p in paths], stamps, adapter_name], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def check_weights(backend: Backend, model_dir: Path, adapter: Path | None) -> None:
    """Weights load only from safetensors: refuse pickles before anything could unpickle them."""
    from ktflow.readers.snapshot import PICKLE_SUFFIXES, validate_snapshot

    if backend.loads_local_weights:
        validate_snapshot(model_dir)
    if adapter is not None:
        weights = adapter / "adapter_model.safetensors"
        pickled = sorted(p.name for p in adapter.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if not weights.is_file() or pickled:
            refused = f" ({', '.join(pickled)} refused)" if pickled else ""
            raise KtflowInputError(weights, None, f"missing: weights load only from safetensors{refused}")


def bounded_requests(
    spec: dict[str, Any],
    model_dir: Path,
    test_file: Path,
    rows: list[dict[str, Any]],
    requests: list[Request],
) -> tuple[list[Request], dict[str, Any] | None]:
    """Prompts over the limit refused or cut (inference.overlong), with only the tokenizer loaded."""
    limit = prompt_limit(spec, model_dir)
    if limit is None:
        return requests, None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=bool(spec.get("trust_remote_code", False))
        )
    except (OSError, ValueError) as error:
        raise KtflowInputError(
            model_dir, "tokenizer", f"cannot load it to count prompt tokens ({error})"
        ) from None
    return bound_prompts(test_file, rows, requests, limit, PromptCounter(tokenizer))


def run_inference(backend: InferenceBackend, requests: list[Request], sink: ResumableJsonl) -> dict[str, Any]:
    todo = [request for request in requests if request.id not in sink.done]
    start = time.perf_counter()
    tokens_before = backend.generated_tokens
    try:
        for request, completion in backend.generate(todo):
            row = {"id": request.id, "prompt": request.prompt, "predict": completion, "label": request.label}
            sink.append([row])
    except BaseException:
        sink.close()
        log.error(
            "%d of %d rows are kept in %s; rerun to resume", len(sink.done), len(requests), sink.partial
        )
        raise
    seconds = time.perf_counter() - start
    sink.finish([request.id for request in requests])
    tokens = backend.generated_tokens - tokens_before
    return {
        "rows": len(requests),
        "resumed_rows": len(requests) - len(todo),
        "generate_s": round(seconds, 3),
        "generated_tokens": tokens,
        "requests_per_s": round(len(todo) / seconds, 3) if seconds and todo else None,
        "tokens_per_s": round(tokens / seconds, 3) if seconds and tokens else None,
    }


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM / SIGHUP (a scheduler cancelling the job) unwind like Ctrl-C, so servers get stopped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def infer(spec_text: str, test_file: Path, out: Path, inputs: InferInputs) -> int:
    """Predict every row of ``test_file`` into ``out`` (resuming ``out``'s partial rows); the exit code."""
    try:
        spec = check_spec(json.loads(spec_text))
    except json.JSONDecodeError as error:
        raise KtflowInputError("--spec", None, f"invalid JSON ({error.msg})") from error
    backend_kind = backend_named(spec.get("backend", DEFAULT_BACKEND))
    adapter_name = inputs.adapter_name if inputs.adapter is not None else None
    rows = load_rows(test_file)
    requests = requests_from_alpaca(test_file, rows, spec.get("system"), adapter_name)
    read: list[str | Path] = [test_file, *(p for p in (inputs.adapter, inputs.int8_dir) if p is not None)]
    check_weights(backend_kind, inputs.model_dir, inputs.adapter)
    requests, prompt_facts = bounded_requests(spec, inputs.model_dir, test_file, rows, requests)
    fingerprint = run_fingerprint(
        spec, [inputs.model_dir, test_file, inputs.adapter, inputs.int8_dir], adapter_name
    )
    sink = ResumableJsonl(out, fingerprint)  # a full disk fails here, before a model loads
    try:
        with (
            interrupts_as_keyboard_interrupt(),
            recorded(out.with_suffix(".provenance.json"), "infer", spec, read) as extra,
        ):
            backend = backend_kind.create(spec, sampling_of(spec), inputs)
            try:
                extra.update(run_inference(backend, requests, sink))
                extra["prompts"] = prompt_facts
                extra["backend"] = backend.facts()
            finally:
                backend.close()
    except InferenceError as error:
        print(f"ktflow infer: failed: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"ktflow infer: interrupted ({interrupt or 'Ctrl-C'})", file=sys.stderr, flush=True)
        return 130
    finally:
        sink.close()
    print(json.dumps({key: extra[key] for key in ("rows", "resumed_rows", "requests_per_s", "tokens_per_s")}))
    return 0

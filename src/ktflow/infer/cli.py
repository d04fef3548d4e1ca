"""``ktflow infer``: predictions JSONL {id, prompt, predict, label} for base or base + adapter.

Backends: ``hf`` (in-process transformers), ``openai`` (a running OpenAI-compatible
server at ``base_url``), and servers ktflow launches and always stops: ``sglang``
(``--lora-paths``, plus KT's ``--kt-*`` flags from ``--int8``) and ``llamafactory``
(LLaMA-Factory's api). Rows are kept in ``OUT.partial`` as they finish, so a rerun
after a crash, a dead server or Ctrl-C only asks for the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.base import (
    InferenceBackend,
    InferenceError,
    Request,
    ResumableJsonl,
    Sampling,
    requests_from_alpaca,
)
from ktflow.infer.prompts import PromptCounter, bound_prompts, prompt_limit
from ktflow.provenance import recorded
from ktflow.train.datasets import load_rows

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")
# Settings that change how the run goes but not what it predicts: changing them keeps the
# rows an interrupted run left in OUT.partial.
OPERATIONAL_KEYS = (
    "batch_size", "concurrency", "request_timeout_s", "retries", "startup_timeout_s", "restarts",
    "python", "server", "api_key_env", "base_url", "threads",
)  # fmt: skip
SPEC_KEYS = frozenset(
    (*SAMPLING_KEYS, *OPERATIONAL_KEYS, "backend", "dtype", "system", "trust_remote_code", "model",
     "adapter_model", "extra_body", "overlong", "max_prompt_tokens")
)  # fmt: skip
BACKENDS = ("hf", "openai", "sglang", "llamafactory")
INT8_RECORD = "ktflow_int8.json"


def check_spec(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise KtflowInputError("--spec", None, "expected a JSON object (the config's inference block)")
    for key in spec:
        if key not in SPEC_KEYS:
            raise KtflowInputError(
                "--spec", key, f"unknown inference setting (known: {', '.join(sorted(SPEC_KEYS))})"
            )
    backend = spec.get("backend", "hf")
    if backend not in BACKENDS:
        raise KtflowInputError(
            "config", "inference.backend", f"{backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if backend == "openai" and not isinstance(spec.get("base_url"), str):
        raise KtflowInputError("config", "inference.base_url", "the openai backend needs the server's URL")
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


def kt_server_args(int8_dir: Path) -> list[str]:
    record = int8_dir / INT8_RECORD
    try:
        args = json.loads(record.read_text(encoding="utf-8"))["sglang_args"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KtflowInputError(
            record, "sglang_args", f"unreadable ({error}); rerun ktflow convert-int8"
        ) from error
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise KtflowInputError(record, "sglang_args", "expected a list of strings")
    return args


def make_backend(
    spec: dict[str, Any],
    model_dir: Path,
    adapter: Path | None,
    adapter_name: str = "lora",
    int8_dir: Path | None = None,
    server_log: Path | None = None,
) -> InferenceBackend:
    sampling = Sampling(
        **{key: spec[key] for key in SAMPLING_KEYS if key in spec}, extra=dict(spec.get("extra_body") or {})
    )
    name = spec.get("backend", "hf")
    if name == "hf":
        from ktflow.infer.hf import HFInference

        return HFInference(
            model_dir,
            sampling,
            adapter_dir=adapter,
            dtype=spec.get("dtype", "float32"),
            trust_remote_code=bool(spec.get("trust_remote_code", False)),
            threads=spec.get("threads"),
        )
    api_key = os.environ.get(spec["api_key_env"]) if spec.get("api_key_env") else None
    options: dict[str, Any] = {
        "concurrency": spec.get("concurrency", sampling.batch_size),
        "timeout_s": float(spec.get("request_timeout_s", 600)),
        "retries": spec.get("retries", 3),
        "api_key": api_key,
    }
    if name == "openai":
        from ktflow.infer.client import OpenAIClient

        models: dict[str | None, str] | None = {None: spec["model"]} if spec.get("model") else None
        client = OpenAIClient(spec["base_url"], sampling, models, **options)
        if adapter is not None:
            # SGLang's "BASE:ADAPTER" unless the server names the adapter's model otherwise.
            client.model_names[adapter_name] = (
                spec.get("adapter_model") or f"{client.model_names[None]}:{adapter_name}"
            )
        return client
    from ktflow.infer.server import LlamaFactoryServer, ManagedBackend, ManagedServer, SGLangServer

    served = (adapter_name, adapter) if adapter is not None else None
    server: ManagedServer
    if name == "sglang":
        kt_args = kt_server_args(int8_dir) if int8_dir is not None else None
        server = SGLangServer(model_dir, spec, served, server_log, kt_args=kt_args)
    else:
        if int8_dir is not None:
            raise KtflowInputError("config", "inference.backend", "--int8 weights need the sglang backend")
        server = LlamaFactoryServer(model_dir, spec, served, server_log)
    return ManagedBackend(server, sampling, options, restarts=spec.get("restarts", 0))


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


def check_weights(backend: str, model_dir: Path, adapter: Path | None) -> None:
    """Weights load only from safetensors: refuse pickles before anything could unpickle them."""
    from ktflow.fetch import PICKLE_SUFFIXES, validate_snapshot

    if backend != "openai":  # an external server loads its own copy
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


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("test_file", type=Path, help="alpaca-format test rows with an id")
    parser.add_argument("out", type=Path, help="predictions JSONL")
    parser.add_argument(
        "--adapter", type=Path, default=None, help="LoRA adapter dir (omit for the base model)"
    )
    parser.add_argument(
        "--adapter-name", default="lora", help="the adapter's name on a server (default: lora)"
    )
    parser.add_argument("--int8", type=Path, default=None, help="`ktflow convert-int8` output (sglang + KT)")
    parser.add_argument(
        "--server-log", type=Path, default=None, help="managed server output (default: stderr)"
    )
    parser.add_argument("--spec", default="{}", help="JSON of the config's inference block")


def main(args: argparse.Namespace) -> int:
    try:
        spec = check_spec(json.loads(args.spec))
    except json.JSONDecodeError as error:
        raise KtflowInputError("--spec", None, f"invalid JSON ({error.msg})") from error
    adapter_name = args.adapter_name if args.adapter is not None else None
    rows = load_rows(args.test_file)
    requests = requests_from_alpaca(args.test_file, rows, spec.get("system"), adapter_name)
    inputs: list[str | Path] = [args.test_file, *(p for p in (args.adapter, args.int8) if p is not None)]
    check_weights(spec.get("backend", "hf"), args.model_dir, args.adapter)
    requests, prompt_facts = bounded_requests(spec, args.model_dir, args.test_file, rows, requests)
    fingerprint = run_fingerprint(
        spec, [args.model_dir, args.test_file, args.adapter, args.int8], adapter_name
    )
    sink = ResumableJsonl(args.out, fingerprint)  # a full disk fails here, before a model loads
    try:
        with (
            interrupts_as_keyboard_interrupt(),
            recorded(args.out.with_suffix(".provenance.json"), "infer", spec, inputs) as extra,
        ):
            backend = make_backend(
                spec, args.model_dir, args.adapter, args.adapter_name, args.int8, args.server_log
            )
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

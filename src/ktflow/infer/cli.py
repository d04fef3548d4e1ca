"""``ktflow infer``: predictions JSONL {id, prompt, predict, label} for base or base + adapter."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ktflow.errors import KtflowInputError
from ktflow.infer.base import InferenceBackend, Request, ResumableJsonl, Sampling, requests_from_alpaca
from ktflow.provenance import recorded
from ktflow.train.datasets import load_rows

SAMPLING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")


def make_backend(spec: dict[str, Any], model_dir: Path, adapter: Path | None) -> InferenceBackend:
    sampling = Sampling(**{key: spec[key] for key in SAMPLING_KEYS if key in spec})
    name = spec.get("backend", "hf")
    if name == "hf":
        from ktflow.infer.hf import HFInference

        return HFInference(
            model_dir,
            sampling,
            adapter_dir=adapter,
            dtype=spec.get("dtype", "float32"),
            trust_remote_code=bool(spec.get("trust_remote_code", False)),
        )
    raise KtflowInputError("config", "inference.backend", f"unknown inference backend {name!r}")


def run_inference(backend: InferenceBackend, requests: list[Request], out: Path) -> dict[str, Any]:
    sink = ResumableJsonl(out)
    todo = [request for request in requests if request.id not in sink.done]
    start = time.perf_counter()
    tokens_before = backend.generated_tokens
    for request, completion in backend.generate(todo):
        sink.append(
            [{"id": request.id, "prompt": request.prompt, "predict": completion, "label": request.label}]
        )
    seconds = time.perf_counter() - start
    sink.finish([request.id for request in requests])
    tokens = backend.generated_tokens - tokens_before
    return {
        "rows": len(requests),
        "resumed_rows": len(requests) - len(todo),
        "generate_s": round(seconds, 3),
        "requests_per_s": round(len(todo) / seconds, 3) if seconds and todo else None,
        "tokens_per_s": round(tokens / seconds, 3) if seconds and tokens else None,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("test_file", type=Path, help="alpaca-format test rows with an id")
    parser.add_argument("out", type=Path, help="predictions JSONL")
    parser.add_argument(
        "--adapter", type=Path, default=None, help="LoRA adapter dir (omit for the base model)"
    )
    parser.add_argument("--spec", default="{}", help="JSON of the config's inference block")


def main(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec)
    requests = requests_from_alpaca(args.test_file, load_rows(args.test_file), spec.get("system"))
    inputs: list[str | Path] = [args.test_file]
    if args.adapter is not None:
        inputs.append(args.adapter)
    with recorded(args.out.with_suffix(".provenance.json"), "infer", spec, inputs) as extra:
        backend = make_backend(spec, args.model_dir, args.adapter)
        try:
            extra.update(run_inference(backend, requests, args.out))
        finally:
            backend.close()
    return 0

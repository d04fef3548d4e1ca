"""``ktflow infer``: predictions JSONL {id, prompt, predict, label} for base or base + adapter.

Backends (``inference.backend``): ``hf`` (in-process transformers), ``openai`` (a running
OpenAI-compatible server at ``base_url``), and servers ktflow launches and always stops:
``sglang`` (``--lora-paths``, plus KT's ``--kt-*`` flags from ``--int8``) and ``llamafactory``
(LLaMA-Factory's api).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.infer.backends.base import InferInputs
from ktflow.infer.run import infer


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
    inputs = InferInputs(args.model_dir, args.adapter, args.adapter_name, args.int8, args.server_log)
    return infer(args.spec, args.test_file, args.out, inputs)

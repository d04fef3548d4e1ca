"""``ktflow doctor``: preflight before any expensive step (host, versions, memory estimates, verdicts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.train.backends import BACKENDS
from ktflow.train.doctor import doctor


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="workflow config (results dir, models, training)")
    parser.add_argument(
        "--training", metavar="JSON", help="a training block as the pipeline passes it; wins over --config"
    )
    parser.add_argument(
        "--model-config", type=Path, action="append", default=[], metavar="PATH",
        help="a model's config.json (or its directory) to estimate; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=list(BACKENDS), help="fail (exit 3) unless this backend can run here"
    )
    parser.add_argument(
        "--python", help="training environment: interpreter or venv (default: training.python, else this one)"
    )
    parser.add_argument("--results-dir", type=Path, help="where outputs go (disk check; default: results)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank for the estimates (default 8 / config)")
    parser.add_argument(
        "--seq-len", type=int, help="tokens per sequence for estimates (default 512 / config)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the report as JSON")


def main(args: argparse.Namespace) -> int:
    return doctor(
        args.config,
        args.training,
        backend=args.backend,
        python=args.python,
        results_dir=args.results_dir,
        model_configs=args.model_config,
        lora_rank=args.lora_rank,
        seq_len=args.seq_len,
        json_out=args.json,
    )

"""``ktflow convert-int8``: BF16 routed experts -> KT's CPU INT8 layout for sglang-kt ``--kt-weight-path``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ktflow.convert_int8.convert import convert_int8


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="BF16 checkpoint (the output of `ktflow cast`)")
    parser.add_argument("out_dir", type=Path, help="directory to pass to sglang-kt as --kt-weight-path")
    parser.add_argument(
        "--kt-checkout",
        type=Path,
        default=None,
        help="ktransformers checkout whose kt-kernel/scripts/convert_cpu_weights.py to run "
        "when the kt_kernel package is not importable",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    parser.add_argument(
        "--threadpool-count",
        type=int,
        default=None,
        help="KT NUMA sub-pools; the server must use the same (default: NUMA nodes)",
    )


def main(args: argparse.Namespace) -> int:
    report = convert_int8(args.model_dir, args.out_dir, args.kt_checkout, args.threads, args.threadpool_count)
    print(json.dumps({**dataclasses.asdict(report), "out_dir": str(report.out_dir)}, indent=2))
    return 0

"""Build the tiny DeepSeek-V3-architecture MoE and write it the way DeepSeek releases V3.

The work is done in :mod:`ktflow.tiny.model`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.tiny.model import build_release


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)


def main(args: argparse.Namespace) -> int:
    build_release(args.out_dir, args.seed, args.vocab_size, args.shards)
    return 0

"""Build the tiny DeepSeek-V3-architecture MoE and write it the way DeepSeek releases V3.

The model is made with transformers' own ``DeepseekV3Config`` (MLA attention, a dense
first layer, 8 routed experts, 1 shared expert), the tokenizer is a byte-level BPE
trained here with ``tokenizers``, and the weights are written as FP8 (e4m3) with
128x128 block ``weight_scale_inv`` in sharded safetensors with an index, plus a
``quantization_config`` in config.json. The default pipeline therefore exercises the
real cast path. Dimensions are chosen so some FP8 blocks are partial (160 = 128 + 32).
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

"""``ktflow chat``: LLaMA-Factory's terminal chat on a finished run (base + adapter, same template).

    ktflow chat results/lora/tiny-v3/style/adapter
    ktflow chat results/lora/tiny-v3/style/adapter --base-only      # the same model without LoRA

The work is done in :mod:`ktflow.chat`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.chat import chat_argv


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter", type=Path, help="a finished run's adapter dir (results/lora/MODEL/TASK/adapter)"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="base model (default: the one it trained on)"
    )
    parser.add_argument("--base-only", action="store_true", help="chat with the base model, adapter left out")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="LLaMA-Factory's sampling defaults, not greedy")
    parser.add_argument("--lf-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="another llamafactory-cli chat argument (repeatable)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from ktflow.lf_launch import main as llamafactory

    argv = chat_argv(args)
    try:
        return llamafactory(argv)
    except (EOFError, KeyboardInterrupt):
        print()  # input ended without `exit`: leave quietly
        return 0

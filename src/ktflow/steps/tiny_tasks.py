"""Two seeded toy tasks that mirror the paper's: a style rewrite and a multiple-choice quiz.

The work is done in :mod:`ktflow.tiny.tasks`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ktflow.tiny.tasks import FORMATS, TASKS, derive, write_checked, write_task


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument(
        "--format", choices=FORMATS, default="alpaca", help="format of train.json (test.json stays alpaca)"
    )
    parser.add_argument(
        "--from", dest="source", type=Path, metavar="TRAIN.json",
        help="derive OUT_DIR/train.json in --format from this alpaca train file of the task (no test.json)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from ktflow.provenance import recorded
    from ktflow.readers.rows import load_rows

    subset = {"task": args.task, "seed": args.seed, "format": args.format}
    if args.source is not None:
        with recorded(args.out_dir / "provenance.json", "tiny-tasks", subset, [args.source]):
            rows = derive(args.task, load_rows(args.source), args.format, args.seed)
            write_checked(args.out_dir / "train.json", rows, args.format)
        return 0
    subset.update(n_train=args.n_train, n_test=args.n_test)
    with recorded(args.out_dir / "provenance.json", "tiny-tasks", subset, []):
        write_task(args.task, args.out_dir, args.seed, args.n_train, args.n_test, args.format)
    return 0

"""``ktflow cast SRC DST [--workers N]`` and ``ktflow cast --verify DST [--source SRC]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ktflow.cast.shards import CAST_MARKER, prefetch
from ktflow.errors import KtflowInputError
from ktflow.provenance import PROVENANCE_NAME, recorded

log = logging.getLogger("ktflow.cast")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", type=Path, help="source model directory (FP8, INT4 or bf16)")
    parser.add_argument(
        "dst", nargs="?", type=Path, help="output bf16 model directory (kept between runs to resume)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="shards cast in parallel, one core each (default 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync (scratch output: a power cut may leave it corrupt)",
    )
    parser.add_argument(
        "--verify",
        type=Path,
        metavar="DST",
        help="only verify an output directory (headers, and every value for NaN / Inf: reads it all)",
    )
    parser.add_argument(
        "--source", type=Path, metavar="SRC", help="with --verify: check shapes against this source"
    )
    parser.epilog = (
        f"DST is complete once DST/{CAST_MARKER} exists; a workflow rule should declare that file as "
        "its output (not directory(DST)) so that a rerun resumes instead of starting over."
    )


def main(args: argparse.Namespace) -> int:
    if args.verify is not None:
        if args.src is not None or args.dst is not None:
            raise KtflowInputError(
                None, "arguments", "--verify DST takes no SRC/DST positionals; use --source"
            )
        from ktflow.cast.verify import verify_checkpoint

        checked = verify_checkpoint(args.verify, args.source, values=True)
        checked.raise_if_failed()
        sizes = f"{checked.tensors} tensors in {checked.shards} shards, {checked.total_size} bytes"
        print(f"{args.verify}: ok: {sizes}")
        return 0
    if args.src is None or args.dst is None:
        raise KtflowInputError(None, "arguments", "need SRC and DST (or --verify DST)")
    if args.source is not None:
        raise KtflowInputError(None, "--source", "only applies with --verify")
    prefetch(args.src)  # let the disk start while the cast is planned
    from ktflow.cast.run import cast_checkpoint

    config = {"workers": args.workers, "durable": not args.no_fsync}
    with recorded(args.dst / PROVENANCE_NAME, "cast", config, [args.src]) as extra:
        report = cast_checkpoint(
            args.src, args.dst, workers=args.workers, progress=not args.no_progress, durable=not args.no_fsync
        )
        extra.update(
            report.to_dict() | {"verify": {"ok": report.verify.ok, "tensors": report.verify.tensors}}
        )
    log.info(
        "%s -> %s: %s, %d shards written, %d resumed, %.2f GB in %.1f s (%.2f GB/s), peak RSS %.2f GB",
        args.src,
        args.dst,
        report.format,
        report.shards_written,
        report.shards_skipped,
        report.bytes_written / 1e9,
        report.seconds,
        report.gb_per_s,
        report.peak_rss_bytes / 1e9,
    )
    return 0

"""``ktflow fetch``: put a model snapshot (config, tokenizer, safetensors) under the results tree.

The work is done in :mod:`ktflow.fetch`.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ktflow.errors import KtflowInputError
from ktflow.fetch import DEFAULT_ALLOW_PATTERNS, fetch_hub, fetch_local


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where the snapshot goes")
    parser.add_argument("--source", choices=("local", "hf"), required=True)
    parser.add_argument("--path", type=Path, help="model directory (--source local)")
    parser.add_argument("--repo-id", help="ORG/NAME on the hub (--source hf)")
    parser.add_argument("--revision", help="branch, tag or commit sha (--source hf; default main)")
    parser.add_argument(
        "--allow-patterns", nargs="+", metavar="PAT",
        help=f"files to fetch (--source hf; default: {' '.join(DEFAULT_ALLOW_PATTERNS)})",
    )  # fmt: skip
    parser.add_argument(
        "--no-hardlink", action="store_true",
        help="always copy (default: clone or hard-link when on the same file system)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    hardlink = not args.no_hardlink
    if args.source == "local":
        if args.path is None:
            raise KtflowInputError(None, "--path", "required with --source local")
        report = fetch_local(args.path, args.out_dir, hardlink=hardlink)
    else:
        if not args.repo_id:
            raise KtflowInputError(None, "--repo-id", "required with --source hf")
        report = fetch_hub(args.repo_id, args.out_dir, args.revision, args.allow_patterns, hardlink=hardlink)
    with contextlib.suppress(BrokenPipeError):
        sha = f" @ {report.commit_sha}" if report.commit_sha else ""
        print(f"{report.out}: {report.files} files, {report.bytes / 1e6:.1f} MB{sha}")
    return 0

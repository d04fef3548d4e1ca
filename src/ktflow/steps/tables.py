"""``ktflow tables``: metrics JSON files -> tables in the paper's layout (CSV, Markdown, HTML).

    ktflow tables MODEL:TASK:VARIANT=METRICS.json ... --spec JSON [--out-dir DIR] [--page PAGE.html]

The work is done in :mod:`ktflow.tables`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ktflow.atomic import write_text
from ktflow.errors import KtflowInputError
from ktflow.provenance import recorded
from ktflow.tables import collect, parse_entry, render_page, show, tables_from, write_tables


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entries", nargs="*", help="MODEL:TASK:VARIANT=METRICS.json")
    parser.add_argument("--out-dir", type=Path, default=None, help="table files (default results/tables)")
    parser.add_argument(
        "--page", type=Path, default=None, help="also (or, without --out-dir, only) this HTML page"
    )
    parser.add_argument("--spec", default="{}", help="JSON: display names, task kinds, published numbers")
    parser.add_argument(
        "--show", type=Path, default=None, metavar="DIR", help="print the tables in DIR and exit"
    )


def main(args: argparse.Namespace) -> int:
    if args.show is not None:
        if not args.show.is_dir():
            print(f"ktflow tables: no tables in {args.show}; run the pipeline first", file=sys.stderr)
            return 1
        show(args.show)
        return 0
    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as error:
        raise KtflowInputError(None, "--spec", f"invalid JSON ({error.msg})") from None
    entries = [parse_entry(text) for text in args.entries]
    out_dir: Path | None = (
        args.out_dir if args.out_dir is not None or args.page is not None else Path("results/tables")
    )
    inputs: list[str | Path] = [path for *_, path in entries]
    results = collect(entries, spec)
    if out_dir is not None:
        with recorded(out_dir / "provenance.json", "tables", spec, inputs):
            write_tables(tables_from(results), out_dir)
    if args.page is not None:
        with recorded(args.page.with_name(args.page.stem + ".provenance.json"), "tables-page", spec, inputs):
            write_text(args.page, render_page(results))
    return 0

"""``ktflow status``: for the current config, which steps are up to date, which would rerun, and why.

The work is done in :mod:`ktflow.status`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ktflow.errors import KtflowInputError
from ktflow.status import ask_snakemake, render, snakemake_base, status


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snakefile", type=Path, default=Path("Snakefile"), help="default: ./Snakefile")
    parser.add_argument("--configfile", type=Path, action="append", help="as for snakemake (repeatable)")
    parser.add_argument("--directory", type=Path, help="working directory (default: the current one)")
    parser.add_argument("--only-changes", action="store_true", help="list only the steps that would run")
    parser.add_argument("--json", type=Path, help="also write the steps as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when anything would run")
    parser.add_argument(
        "snakemake_args", nargs="*", metavar="-- ARG", help="more snakemake arguments, after --"
    )


def main(args: argparse.Namespace) -> int:
    if not args.snakefile.is_file():
        raise KtflowInputError(args.snakefile, None, "no Snakefile here; pass --snakefile")
    for path in args.configfile or []:
        if not (args.directory or Path()).joinpath(path).is_file() and not path.is_file():
            raise KtflowInputError(path, None, "config file not found")
    steps = status(*ask_snakemake(snakemake_base(args)))
    print(render(steps, args.only_changes))
    if args.json is not None:
        from ktflow.atomic import write_json

        write_json(args.json, [{**asdict(step), "state": step.state} for step in steps])
    return 1 if args.check and any(step.reason for step in steps) else 0

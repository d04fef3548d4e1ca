"""``ktflow prepare-task``: raw data set -> ``train.json`` + ``test.json`` in the pipeline's format.

    ktflow prepare-task OUT_DIR --spec '{"source": "hf-dataset", "repo_id": ..., "filename": ...,
        "adapter": "afrimed-qa-mcq", "kind": "mcq", "split": {"method": "column"}, "seed": 42}'
    ktflow prepare-task OUT_DIR --adapter nekoqa --raw-file NekoQA-10K.json --test-size 0.1

The work is done in :mod:`ktflow.datasets.prepare`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ktflow.datasets.adapters import ADAPTERS, ON_INVALID
from ktflow.datasets.prepare import prepare
from ktflow.errors import KtflowInputError
from ktflow.provenance import recorded


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory for train.json and test.json")
    parser.add_argument(
        "--spec", default="{}", help="JSON: the task's config block (source, adapter, split, ...)"
    )
    parser.add_argument("--name", default="row", help="task name; prefixes ids of rows that carry none")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where URL downloads are kept (default OUT_DIR/.raw)"
    )
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), help="shortcut for spec.adapter")
    parser.add_argument("--raw-file", help="shortcut for spec.source=raw, spec.raw_file")
    parser.add_argument("--test-size", type=float, help="shortcut for spec.split.test_size (random split)")
    parser.add_argument("--seed", type=int, help="shortcut for spec.seed")
    parser.add_argument("--on-invalid", choices=ON_INVALID, help="shortcut for spec.on_invalid")


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as error:
        raise KtflowInputError(None, "--spec", f"invalid JSON ({error.msg})") from None
    if not isinstance(spec, dict):
        raise KtflowInputError(None, "--spec", "expected a JSON object")
    shortcuts = {"adapter": args.adapter, "seed": args.seed, "on_invalid": args.on_invalid}
    spec.update({key: value for key, value in shortcuts.items() if value is not None})
    if args.raw_file is not None:
        spec.update(source="raw", raw_file=args.raw_file)
    if args.test_size is not None:
        spec["split"] = {**spec.get("split", {}), "test_size": args.test_size}
    return spec


def main(args: argparse.Namespace) -> int:
    spec = _spec(args)
    out_dir: Path = args.out_dir
    cache_dir = args.cache_dir or out_dir / ".raw"
    inputs: list[str | Path] = (
        [spec["raw_file"]] if spec.get("source") == "raw" and "raw_file" in spec else []
    )
    with recorded(out_dir / "provenance.json", "prepare-task", spec, inputs) as extra:
        extra.update(prepare(spec, out_dir, cache_dir, args.name))
    return 0

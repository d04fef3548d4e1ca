"""``ktflow evaluate``: BLEU-1..4 / ROUGE-1/2/L for generation, accuracy for multiple choice.

    ktflow evaluate PREDICTIONS.jsonl --task generation|mcq -o METRICS.json
        [--per-sample PER_SAMPLE.jsonl] [--flavour paper|standard] [--workers N]

Input rows are ``{"id", "prompt", "predict", "label"}``; the whole file is checked
before anything is scored. METRICS.json, the per-sample JSONL and
``<METRICS>.provenance.json`` are written atomically, only when scoring succeeds.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ktflow.atomic import write_json, write_jsonl
from ktflow.errors import KtflowInputError
from ktflow.metrics.flavours import FLAVOURS, is_blank
from ktflow.metrics.generation import default_workers, score_generation, summarize_generation
from ktflow.metrics.mcq import score_mcq, summarize_mcq
from ktflow.metrics.records import load_predictions
from ktflow.provenance import recorded

log = logging.getLogger(__name__)
TASKS = ("generation", "mcq")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", type=Path, help="JSONL with id, prompt, predict, label")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True, help="METRICS.json to write")
    parser.add_argument("--per-sample", type=Path, help="also write each row's scores here (JSONL)")
    parser.add_argument(
        "--flavour",
        choices=tuple(FLAVOURS),
        help="generation only: 'paper' (default) = the KTransformers SFT metric behind the published "
        "tables; 'standard' = sacreBLEU + rouge-score, comparable with the literature",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        help="scoring processes for generation (default: usable CPUs, at most 8); "
        "the numbers do not depend on it",
    )


def provenance_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".json") + ".provenance.json")


def _generation(rows: list[dict[str, Any]], flavour: str, workers: int) -> tuple[dict[str, Any], list[Any]]:
    predictions = [row["predict"] for row in rows]
    labels = [row["label"] for row in rows]
    per_sample = score_generation(predictions, labels, flavour=flavour, workers=workers)
    summary = summarize_generation(predictions, labels, per_sample, flavour=flavour)
    traced = [
        {
            "id": row["id"],
            **scores,
            "empty_prediction": is_blank(row["predict"]),
            "empty_label": is_blank(row["label"]),
        }
        for row, scores in zip(rows, per_sample, strict=True)
    ]
    return summary, traced


def _mcq(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    scores = score_mcq([row["predict"] for row in rows], [row["label"] for row in rows])
    traced = [{"id": row["id"], **score.as_row()} for row, score in zip(rows, scores, strict=True)]
    return summarize_mcq(scores), traced


def main(args: argparse.Namespace) -> int:
    source: Path = args.predictions
    output: Path = args.output
    if args.task == "mcq" and args.flavour is not None:
        raise KtflowInputError(None, "--flavour", "applies only to --task generation")
    if args.per_sample is not None and args.per_sample.resolve() == output.resolve():
        raise KtflowInputError(args.per_sample, "--per-sample", "must differ from -o/--output")
    flavour = args.flavour or "paper"
    rows = load_predictions(source, task=args.task)
    config = {
        "task": args.task,
        "flavour": flavour if args.task == "generation" else None,
        "workers": args.workers,
        "per_sample": str(args.per_sample) if args.per_sample else None,
    }
    with recorded(provenance_path(output), "evaluate", config, [source]) as extra:
        started = time.perf_counter()
        if args.task == "generation":
            summary, traced = _generation(rows, flavour, args.workers)
        else:
            summary, traced = _mcq(rows)
        seconds = time.perf_counter() - started
        if args.per_sample is not None:
            write_jsonl(args.per_sample, traced)
        write_json(output, summary)
        extra.update({"n": len(rows), "scoring_seconds": round(seconds, 3)})
    shown = {key: value for key, value in summary.items() if isinstance(value, int | float)}
    log.info("%s: %s (%d rows in %.1fs)", output, shown, len(rows), seconds)
    return 0

"""``ktflow plots``: training-loss curves of every run, and base-vs-LoRA metric bars per task (PNG).

    ktflow plots --loss LOSS.png --metrics METRICS.png --spec JSON \\
        --train-logs MODEL:TASK=ADAPTER_DIR ... --entries MODEL:TASK:VARIANT=METRICS.json ...

The work is done in :mod:`ktflow.plots`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ktflow.errors import KtflowInputError
from ktflow.plots import TRAINER_LOG, parse_log_entry, plot_losses, plot_metrics, read_loss
from ktflow.provenance import recorded
from ktflow.tables import collect, parse_entry

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", type=Path, required=True, help="PNG of the training-loss curves")
    parser.add_argument("--metrics", type=Path, required=True, help="PNG of the metric bars per task")
    parser.add_argument("--spec", default="{}", help="JSON: display names, task kinds, published numbers")
    parser.add_argument("--train-logs", nargs="*", default=[], metavar="MODEL:TASK=PATH", help="adapter dirs")
    parser.add_argument("--entries", nargs="*", default=[], metavar="MODEL:TASK:VARIANT=PATH", help="metrics")


def main(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as error:
        raise KtflowInputError(None, "--spec", f"invalid JSON ({error.msg})") from None
    logs = [parse_log_entry(text) for text in args.train_logs]
    entries = [parse_entry(text) for text in args.entries]
    results = collect(entries, spec)  # every metrics file is checked before anything is drawn
    inputs: list[str | Path] = [path for *_, path in entries]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for model, task, path in logs:
        log_file = path / TRAINER_LOG if path.is_dir() else path
        if not log_file.is_file():
            # A missing log costs a curve, not the report: the adapter itself is still valid.
            log.warning("%s: no %s; its loss curve is left out", path, TRAINER_LOG)
            continue
        steps, losses = read_loss(log_file)
        if not losses:
            log.warning("%s: no loss values (fewer steps than logging_steps?)", log_file)
            continue
        inputs.append(log_file)
        curves[f"{spec.get('models', {}).get(model, model)} / {task}"] = (steps, losses)
    with recorded(args.loss.parent / "provenance.json", "plots", spec, inputs) as extra:
        plot_losses(curves, args.loss)
        plot_metrics(results, args.metrics)
        extra.update({"curves": sorted(curves), "bars": len(results)})
    return 0

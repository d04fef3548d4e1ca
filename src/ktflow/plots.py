"""``ktflow plots``: training-loss curves of every run, and base-vs-LoRA metric bars per task (PNG).

    ktflow plots --loss LOSS.png --metrics METRICS.png --spec JSON \\
        --train-logs MODEL:TASK=ADAPTER_DIR ... --entries MODEL:TASK:VARIANT=METRICS.json ...

Loss curves come from LLaMA-Factory's ``trainer_log.jsonl`` (published next to each adapter);
the bars reuse ``ktflow tables``' reading of the metrics, so published numbers named in the
spec appear as black markers over the matching bars. Figures are drawn with matplotlib's Agg
canvas directly (no pyplot state, no display needed) and written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ktflow.atomic import atomic_file
from ktflow.errors import KtflowInputError
from ktflow.tables import KINDS, Result

log = logging.getLogger(__name__)
TRAINER_LOG = "trainer_log.jsonl"


def parse_log_entry(text: str) -> tuple[str, str, Path]:
    key, sep, path = text.partition("=")
    parts = key.split(":")
    if not sep or len(parts) != 2:
        raise KtflowInputError(text, None, "expected MODEL:TASK=ADAPTER_DIR (or trainer_log.jsonl)")
    return parts[0], parts[1], Path(path)


def read_loss(path: Path) -> tuple[list[float], list[float]]:
    """(steps, losses) from a trainer_log.jsonl; eval-only lines (no "loss") are skipped."""
    steps: list[float] = []
    losses: list[float] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise KtflowInputError(path, f"line {number}", f"invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "loss" not in record:
            continue
        step = record.get("current_steps", record.get("step", len(steps) + 1))
        if not isinstance(step, int | float) or not isinstance(record["loss"], int | float):
            raise KtflowInputError(path, f"line {number}", "current_steps and loss must be numbers")
        steps.append(float(step))
        losses.append(float(record["loss"]))
    return steps, losses


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, out: Path) -> None:
    with atomic_file(out, "wb") as handle:
        figure.savefig(handle, format="png", metadata={"Software": None})


def plot_losses(curves: dict[str, tuple[list[float], list[float]]], out: Path) -> None:
    """Every run's training loss against its optimizer step, on one set of axes."""
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    for label, (steps, losses) in curves.items():
        axes.plot(steps, losses, marker="o" if len(steps) < 3 else None, label=label)
    if curves:
        axes.legend(fontsize="small")
    else:
        axes.text(
            0.5, 0.5, f"no {TRAINER_LOG} with loss values", ha="center", va="center", transform=axes.transAxes
        )
    axes.set(xlabel="optimizer step", ylabel="training loss", title="LoRA training loss")
    axes.grid(alpha=0.3)
    _save(figure, out)


def plot_metrics(results: list[Result], out: Path) -> None:
    """One panel per task: metrics on the x axis, a bar per (model, base / LoRA)."""
    tasks = list(dict.fromkeys(r.task for r in results))
    figure = _figure(9, 3.2 * max(len(tasks), 1))
    if not tasks:
        figure.text(0.5, 0.5, "no metrics", ha="center")
    from matplotlib import colormaps

    models = list(dict.fromkeys(r.display for r in results))
    palette = colormaps["tab20"]
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(len(tasks), 1, index + 1)
        rows = [r for r in results if r.task == task]
        columns, _, _, heading = KINDS[rows[0].kind]
        width = 0.8 / len(rows)
        marked = False
        for position, result in enumerate(rows):
            offsets = [m + (position - (len(rows) - 1) / 2) * width for m in range(len(columns))]
            heights = [result.values[key] or 0.0 for key in columns]
            # Same hue per model: light for the base model, dark for its LoRA.
            colour = palette(2 * (models.index(result.display) % 10) + (1 if result.variant == "base" else 0))
            axes.bar(offsets, heights, width, label=result.label, color=colour)
            if result.paper:
                marks = [(x, result.paper[key]) for x, key in zip(offsets, columns, strict=True)]
                shown = [(x, y) for x, y in marks if y is not None]
                axes.scatter(
                    [x for x, _ in shown], [y for _, y in shown], marker="_", s=200, color="black", zorder=3,
                    label=None if marked else "published",
                )  # fmt: skip
                marked = True
        axes.set_xticks(range(len(columns)), list(columns.values()))
        axes.set_title(f"{task}: {heading}")
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="small", ncols=2)
    _save(figure, out)

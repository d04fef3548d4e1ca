"""``ktflow tables``: metrics JSON files -> tables in the paper's layout (CSV, Markdown, HTML).

Rows are "<model> (no LoRA)" and "<model> + LoRA" per task; generation tasks get
BLEU-1..4 / ROUGE-1 / ROUGE-2 / ROUGE-L columns, multiple-choice tasks an accuracy
table. Published numbers named in the config sit beside the reproduced rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ktflow.atomic import write_text
from ktflow.errors import KtflowInputError
from ktflow.provenance import recorded

GENERATION_COLUMNS = {
    "bleu-1": "BLEU-1",
    "bleu-2": "BLEU-2",
    "bleu-3": "BLEU-3",
    "bleu-4": "BLEU-4",
    "rouge-1": "ROUGE-1",
    "rouge-2": "ROUGE-2",
    "rouge-l": "ROUGE-L",
}
VARIANT_LABEL = {"base": "{model} (no LoRA)", "lora": "{model} + LoRA"}


def parse_entry(text: str) -> tuple[str, str, str, Path]:
    key, sep, path = text.partition("=")
    parts = key.split(":")
    if not sep or len(parts) != 3:
        raise KtflowInputError(text, None, "expected MODEL:TASK:VARIANT=PATH")
    return parts[0], parts[1], parts[2], Path(path)


def load_metrics(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise KtflowInputError(path, None, "metrics file not found") from error
    except json.JSONDecodeError as error:
        raise KtflowInputError(path, f"line {error.lineno}", "invalid JSON") from error
    if not isinstance(data, dict):
        raise KtflowInputError(path, None, "expected a JSON object")
    return data


def _row(label: str, task: str, values: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"Task": task, "Model": label}
    for key, title in columns.items():
        row[title] = round(float(values[key]), 2) if values.get(key) is not None else None
    return row


def build_tables(entries: list[tuple[str, str, str, Path]], spec: dict[str, Any]) -> dict[str, pd.DataFrame]:
    generation: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    paper = spec.get("paper", {})
    for model, task, variant, path in entries:
        metrics = load_metrics(path)
        kind = spec["tasks"][task]
        display = spec["models"].get(model, model)
        label = VARIANT_LABEL[variant].format(model=display)
        published = paper.get(model, {}).get(task, {}).get(variant)
        if kind == "generation":
            missing = [key for key in GENERATION_COLUMNS if key not in metrics]
            if missing:
                raise KtflowInputError(path, missing[0], "metric missing (is this a generation task's metrics?)")
            generation.append(_row(label, task, metrics, GENERATION_COLUMNS))
            if published:
                generation.append(_row(f"{label} (paper)", task, published, GENERATION_COLUMNS))
        else:
            if "accuracy" not in metrics:
                raise KtflowInputError(path, "accuracy", "metric missing (is this an mcq task's metrics?)")
            accuracy.append({"Task": task, "Model": label, "Accuracy": round(float(metrics["accuracy"]), 4)})
            if published and "accuracy" in published:
                accuracy.append(
                    {"Task": task, "Model": f"{label} (paper)", "Accuracy": round(float(published["accuracy"]), 4)}
                )
    return {
        "generation": pd.DataFrame(generation, columns=["Task", "Model", *GENERATION_COLUMNS.values()]),
        "accuracy": pd.DataFrame(accuracy, columns=["Task", "Model", "Accuracy"]),
    }


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    written = []
    for name, frame in tables.items():
        for suffix, text in (
            (".csv", frame.to_csv(index=False)),
            (".md", frame.to_markdown(index=False) + "\n"),
            (".html", frame.to_html(index=False, border=0)),
        ):
            path = out_dir / f"{name}{suffix}"
            write_text(path, text)
            written.append(path)
    return written


def show(out_dir: Path) -> None:
    for name in ("generation", "accuracy"):
        path = out_dir / f"{name}.md"
        if path.is_file():
            title = "Generation (BLEU / ROUGE, x100)" if name == "generation" else "Multiple choice (accuracy)"
            print(f"\n## {title}  [{path}]\n\n{path.read_text()}")
    print(f"Tables (CSV / Markdown / HTML) are in {out_dir}/")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entries", nargs="*", help="MODEL:TASK:VARIANT=METRICS.json")
    parser.add_argument("--out-dir", type=Path, default=Path("results/tables"))
    parser.add_argument("--spec", default="{}", help="JSON: display names, task kinds, published numbers")
    parser.add_argument("--show", type=Path, default=None, metavar="DIR", help="print the tables in DIR and exit")


def main(args: argparse.Namespace) -> int:
    if args.show is not None:
        if not args.show.is_dir():
            print(f"ktflow tables: no tables in {args.show}; run the pipeline first", file=sys.stderr)
            return 1
        show(args.show)
        return 0
    spec = json.loads(args.spec)
    entries = [parse_entry(text) for text in args.entries]
    with recorded(args.out_dir / "provenance.json", "tables", spec, [path for *_, path in entries]):
        write_tables(build_tables(entries, spec), args.out_dir)
    return 0

"""Metrics JSON files -> tables in the paper's layout (CSV, Markdown, HTML).

The command is ``ktflow tables`` (:mod:`ktflow.steps.tables`).

Rows are "<model> (no LoRA)" and "<model> + LoRA" per task, in the config's model order;
generation tasks get BLEU-1..4 / ROUGE-1 / ROUGE-2 / ROUGE-L columns (x100), multiple-choice
tasks an accuracy column. When the spec names published numbers (config ``tables.paper``),
a "(paper)" row sits under the reproduced row and "Δ <metric>" columns give reproduced
minus published. ``--out-dir`` gets ``generation.*`` and ``accuracy.*`` (all tasks, with a
Task column) and ``tasks/<task>.*`` (one table per task); ``--page`` one self-contained
HTML page with every task's table (the Snakemake report embeds it).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ktflow.atomic import write_text
from ktflow.errors import KtflowInputError

GENERATION_COLUMNS = {
    "bleu-1": "BLEU-1",
    "bleu-2": "BLEU-2",
    "bleu-3": "BLEU-3",
    "bleu-4": "BLEU-4",
    "rouge-1": "ROUGE-1",
    "rouge-2": "ROUGE-2",
    "rouge-l": "ROUGE-L",
}
# ``accuracy`` is AfriMed-QA's official rule (the output's literal first character); the
# title says so because the metrics JSON also carries a looser ``accuracy_extracted``.
MCQ_COLUMNS = {"accuracy": "Accuracy (official)"}
# kind -> (metric key -> column title, decimals, combined table name, heading)
KINDS: dict[str, tuple[dict[str, str], int, str, str]] = {
    "generation": (GENERATION_COLUMNS, 2, "generation", "Generation (BLEU / ROUGE, x100)"),
    "mcq": (
        MCQ_COLUMNS,
        4,
        "accuracy",
        "Multiple choice (accuracy, AfriMed-QA official rule: the output's first character)",
    ),
}
# Rows whose prediction is blank: they score 0 (generation) or count as wrong (MCQ).
BLANK_KEY, BLANK_TITLE = "empty_predictions", "Blank"
BLANK_NOTE = "Blank = predictions with no text, scored 0 / counted wrong and included in the mean."
VARIANT_LABEL = {"base": "{model} (no LoRA)", "lora": "{model} + LoRA"}
PAPER_SUFFIX = " (paper)"


@dataclass(frozen=True)
class Result:
    """One reproduced (model, task, variant) cell block, with the published numbers if any."""

    model: str
    display: str
    task: str
    kind: str
    variant: str
    values: dict[str, float | None]
    paper: dict[str, float | None] | None
    blank: int | None = None

    @property
    def label(self) -> str:
        return VARIANT_LABEL[self.variant].format(model=self.display)


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


def _number(value: Any, where: str, path: str | Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KtflowInputError(path, where, f"expected a number, got {value!r}")
    return float(value)


def _published(
    spec: dict[str, Any], model: str, task: str, variant: str, kind: str
) -> dict[str, float | None] | None:
    published = spec.get("paper", {}).get(model, {}).get(task, {}).get(variant)
    if not published:
        return None
    columns = KINDS[kind][0]
    where = f"paper.{model}.{task}.{variant}"
    unknown = sorted(set(published) - set(columns))
    if unknown:
        raise KtflowInputError(
            "--spec", where, f"unknown metric(s) {unknown} for a {kind} task; known: {list(columns)}"
        )
    return {key: _number(published.get(key), f"{where}.{key}", "--spec") for key in columns}


def _blank_count(metrics: dict[str, Any], path: Path) -> int | None:
    """The metrics file's blank-prediction count; None for files written before it was counted."""
    value = metrics.get(BLANK_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KtflowInputError(path, BLANK_KEY, f"expected a count (integer >= 0), got {value!r}")
    return value


def collect(entries: list[tuple[str, str, str, Path]], spec: dict[str, Any]) -> list[Result]:
    """Read every metrics file (all checked before any table is built), in table order."""
    results: list[Result] = []
    for model, task, variant, path in entries:
        kind = spec.get("tasks", {}).get(task)
        if kind not in KINDS:
            raise KtflowInputError(
                "--spec", f"tasks.{task}", f"kind must be one of {list(KINDS)}, got {kind!r}"
            )
        if variant not in VARIANT_LABEL:
            raise KtflowInputError(
                f"{model}:{task}:{variant}", None, f"variant must be one of {list(VARIANT_LABEL)}"
            )
        metrics = load_metrics(path)
        columns = KINDS[kind][0]
        missing = [key for key in columns if key not in metrics]
        if missing:
            raise KtflowInputError(path, missing[0], f"metric missing (is this a {kind} task's metrics?)")
        values = {key: _number(metrics[key], key, path) for key in columns}
        display = spec.get("models", {}).get(model, model)
        published = _published(spec, model, task, variant, kind)
        results.append(
            Result(model, display, task, kind, variant, values, published, _blank_count(metrics, path))
        )
    # The paper's layout: task by task, models in config order, base above LoRA.
    tasks = list(dict.fromkeys(r.task for r in results))
    models = list(dict.fromkeys(r.model for r in results))
    variants = list(VARIANT_LABEL)
    return sorted(
        results, key=lambda r: (tasks.index(r.task), models.index(r.model), variants.index(r.variant))
    )


def frame(results: list[Result], kind: str, with_task: bool) -> pd.DataFrame:
    """One kind's rows; "Δ" columns appear only when some row has published numbers."""
    columns, decimals, _, _ = KINDS[kind]
    with_paper = any(result.paper for result in results)
    titles = (["Task"] if with_task else []) + ["Model", *columns.values(), BLANK_TITLE]
    if with_paper:
        titles += [f"Δ {title}" for title in columns.values()]
    rows: list[dict[str, Any]] = []
    for result in results:
        row: dict[str, Any] = {"Task": result.task, "Model": result.label, BLANK_TITLE: result.blank}
        for key, title in columns.items():
            value = result.values[key]
            row[title] = round(value, decimals) if value is not None else None
            published = result.paper.get(key) if result.paper else None
            if with_paper and value is not None and published is not None:
                row[f"Δ {title}"] = round(value - published, decimals)
        rows.append(row)
        if result.paper:
            paper_row: dict[str, Any] = {"Task": result.task, "Model": result.label + PAPER_SUFFIX}
            for key, title in columns.items():
                published = result.paper[key]
                paper_row[title] = round(published, decimals) if published is not None else None
            rows.append(paper_row)
    table = pd.DataFrame(rows, columns=titles)
    # Integer counts with gaps (published rows have none): not floats like 2.0.
    table[BLANK_TITLE] = table[BLANK_TITLE].astype("Int64")
    return table


def build_tables(entries: list[tuple[str, str, str, Path]], spec: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``generation`` / ``accuracy`` (all tasks, Task column) and ``tasks/<task>`` per task."""
    return tables_from(collect(entries, spec))


def tables_from(results: list[Result]) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    for kind, (_, _, name, _) in KINDS.items():
        tables[name] = frame([r for r in results if r.kind == kind], kind, with_task=True)
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        tables[f"tasks/{task}"] = frame(rows, rows[0].kind, with_task=False)
    return tables


def _cell(value: Any, title: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return "<td></td>"
    if title.startswith("Δ "):
        return f'<td class="{"up" if value > 0 else "down" if value < 0 else ""}">{value:+g}</td>'
    if isinstance(value, float):
        return f"<td>{value:g}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(table: pd.DataFrame) -> str:
    """A plain HTML table; published rows carry class "paper" so a stylesheet can set them apart."""
    head = "".join(f"<th>{html.escape(str(title))}</th>" for title in table.columns)
    body = []
    for record in table.to_dict("records"):
        paper = str(record.get("Model", "")).endswith(PAPER_SUFFIX)
        cells = "".join(_cell(record[title], str(title)) for title in table.columns)
        body.append(f'<tr class="paper">{cells}</tr>' if paper else f"<tr>{cells}</tr>")
    return (
        f'<table class="ktflow">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table>\n"
    )


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.ktflow { border-collapse: collapse; margin-bottom: 2em; }
table.ktflow th, table.ktflow td { border-bottom: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
table.ktflow th:first-child, table.ktflow td:first-child { text-align: left; }
tr.paper td { color: #666; font-style: italic; }
td.up { color: #1a7f37; } td.down { color: #b42318; }
"""


def render_page(results: list[Result], title: str = "ktflow results") -> str:
    """One self-contained HTML page (inline CSS, no scripts) with a section per task."""
    sections = []
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        heading = f"{task} — {KINDS[rows[0].kind][3]}"
        sections.append(
            f"<h2>{html.escape(heading)}</h2>\n{html_table(frame(rows, rows[0].kind, with_task=False))}"
        )
    note = "<p>Rows marked (paper) are the published numbers; Δ = reproduced − published.</p>"
    paper = (note if any(r.paper for r in results) else "") + f"<p>{html.escape(BLANK_NOTE)}</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{paper}\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    written = []
    for name, table in tables.items():
        for suffix, text in (
            (".csv", table.to_csv(index=False)),
            # tabulate blanks None but prints float NaN as "nan": hand it None.
            (
                ".md",
                table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="")
                + "\n",
            ),
            (".html", html_table(table)),
        ):
            path = out_dir / f"{name}{suffix}"
            write_text(path, text)
            written.append(path)
    return written


def show(out_dir: Path) -> None:
    for _, _, name, title in KINDS.values():
        path = out_dir / f"{name}.md"
        if path.is_file() and len(path.read_text().splitlines()) > 2:
            print(f"\n## {title}  [{path}]\n\n{path.read_text()}")
    print(f"{BLANK_NOTE}\nTables (CSV / Markdown / HTML, all tasks and tasks/<task>.*) are in {out_dir}/")

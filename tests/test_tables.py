"""Tables in the paper's layout: per task, published rows and Δ columns, CSV / Markdown / HTML."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import run_ktflow

from ktflow.errors import KtflowInputError
from ktflow.tables import GENERATION_COLUMNS, build_tables, collect, render_page, write_tables

KEYS = list(GENERATION_COLUMNS)
Run = tuple[list[str], dict[str, Any]]  # (CLI entries, spec) of one finished matrix


def generation_metrics(scale: float) -> dict[str, Any]:
    return {key: round(scale * (10 - index), 4) for index, key in enumerate(KEYS)} | {"n": 60}


def write_metrics(root: Path, model: str, task: str, variant: str, data: dict[str, Any]) -> str:
    path = root / model / task / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return f"{model}:{task}:{variant}={path}"


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """Two models x (a generation task, an mcq task) x (base, lora), paper numbers for one model."""
    entries = []
    for model, offset in (("v2", 1.0), ("v3", 2.0)):
        for variant, boost in (("base", 0.0), ("lora", 1.5)):
            entries.append(
                write_metrics(tmp_path, model, "style", variant, generation_metrics(offset + boost))
            )
            blank = int(offset + boost * 2)  # v2: 1 / 4, v3: 2 / 5 blank predictions
            accuracy = {"accuracy": 0.2 * offset + 0.3 * boost / 1.5, "n": 60, "empty_predictions": blank}
            entries.append(write_metrics(tmp_path, model, "quiz", variant, accuracy))
    paper = {
        "v2": {
            "style": {"base": dict(zip(KEYS, [20.66, 8.33, 4.54, 2.89, 22.71, 4.52, 19.19], strict=True))},
            "quiz": {"base": {"accuracy": 0.0645}, "lora": {"accuracy": 0.4812}},
        }
    }
    spec = {
        "models": {"v2": "V2-Lite", "v3": "V3"},
        "tasks": {"style": "generation", "quiz": "mcq"},
        "paper": paper,
    }
    return entries, spec


def parsed(entries: list[str]) -> list[tuple[str, str, str, Path]]:
    from ktflow.tables import parse_entry

    return [parse_entry(text) for text in entries]


def test_rows_follow_the_paper_layout_with_published_rows_and_deltas(
    run: Run,
) -> None:
    entries, spec = run
    tables = build_tables(parsed(entries), spec)
    style = tables["tasks/style"]
    assert list(style["Model"]) == [
        "V2-Lite (no LoRA)", "V2-Lite (no LoRA) (paper)", "V2-Lite + LoRA", "V3 (no LoRA)", "V3 + LoRA",
    ]  # fmt: skip
    assert list(style.columns[:8]) == [
        "Model",
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
    ]
    reproduced = style.iloc[0]
    published = style.iloc[1]
    for title in GENERATION_COLUMNS.values():
        assert reproduced[f"Δ {title}"] == pytest.approx(reproduced[title] - published[title], abs=0.011)
        assert math.isnan(published[f"Δ {title}"])  # the published row has no delta
        assert math.isnan(style.iloc[2][f"Δ {title}"])  # nothing published for V2-Lite + LoRA
    assert published["BLEU-1"] == 20.66
    quiz = tables["tasks/quiz"]
    assert list(quiz.columns) == ["Model", "Accuracy (official)", "Blank", "Δ Accuracy (official)"]
    lora = quiz.set_index("Model").loc["V2-Lite + LoRA"]
    assert lora["Δ Accuracy (official)"] == pytest.approx(round(0.5 - 0.4812, 4))
    # Blank predictions per cell, from each metrics file; published rows have none.
    assert [None if pd.isna(x) else x for x in quiz["Blank"]] == [1, None, 4, None, 2, 5]
    assert style.columns[8] == "Blank"


def test_combined_tables_carry_the_task_column(run: Run) -> None:
    entries, spec = run
    tables = build_tables(parsed(entries), spec)
    assert set(tables["generation"]["Task"]) == {"style"}
    assert set(tables["accuracy"]["Task"]) == {"quiz"}
    assert len(tables["accuracy"]) == 4 + 2  # four reproduced rows, two published


def test_no_published_numbers_no_delta_columns(run: Run) -> None:
    entries, spec = run
    tables = build_tables(parsed(entries), {**spec, "paper": {}})
    assert not any(str(c).startswith("Δ") for t in tables.values() for c in t.columns)
    assert len(tables["tasks/style"]) == 4


def test_written_files_render_blanks_not_nan(run: Run, tmp_path: Path) -> None:
    entries, spec = run
    written = write_tables(build_tables(parsed(entries), spec), tmp_path / "tables")
    names = {p.relative_to(tmp_path / "tables").as_posix() for p in written}
    for stem in ("generation", "accuracy", "tasks/style", "tasks/quiz"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.html"} <= names
    markdown = (tmp_path / "tables/tasks/style.md").read_text()
    assert "nan" not in markdown.lower()
    assert "V2-Lite (no LoRA) (paper)" in markdown
    quiz_md = (tmp_path / "tables/tasks/quiz.md").read_text().splitlines()
    # Counts print as integers, and a published row's count is empty.
    assert [line.split("|")[3].strip() for line in quiz_md[2:]] == ["1", "", "4", "", "2", "5"]
    csv = pd.read_csv(tmp_path / "tables/accuracy.csv")
    assert list(csv.columns) == ["Task", "Model", "Accuracy (official)", "Blank", "Δ Accuracy (official)"]
    html = (tmp_path / "tables/tasks/quiz.html").read_text()
    assert html.count('<tr class="paper">') == 2
    assert "+0.0188" in html  # V2-Lite + LoRA vs the published 0.4812
    assert "<td>4</td>" in html and "<NA>" not in html


def test_page_is_self_contained_with_a_section_per_task(run: Run) -> None:
    entries, spec = run
    page = render_page(collect(parsed(entries), spec))
    assert page.index("<h2>style") < page.index("<h2>quiz")
    assert "<script" not in page
    assert "http" not in page.replace('lang="en"', "")
    assert "Δ = reproduced − published" in page


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda spec: spec["paper"]["v2"]["quiz"]["lora"].update(acc=0.5), "paper.v2.quiz.lora"),
        (lambda spec: spec["tasks"].update(quiz="choice"), "tasks.quiz"),
        (lambda spec: spec["paper"]["v2"]["quiz"]["lora"].update(accuracy="high"), "expected a number"),
    ],
)
def test_bad_spec_names_the_key(run: Run, edit: Any, message: str) -> None:
    entries, spec = run
    edit(spec)
    with pytest.raises(KtflowInputError, match=message):
        build_tables(parsed(entries), spec)


def test_metrics_of_the_wrong_kind_are_refused(run: Run, tmp_path: Path) -> None:
    _, spec = run
    bad = write_metrics(tmp_path, "v2", "style", "base", {"accuracy": 0.5})
    with pytest.raises(KtflowInputError, match="generation task's metrics") as caught:
        build_tables(parsed([bad]), spec)
    assert caught.value.field == "bleu-1"


def test_cli_keeps_the_rule_contract_and_writes_the_page(run: Run, tmp_path: Path) -> None:
    entries, spec = run
    out = tmp_path / "tables"
    run_ktflow("tables", "--out-dir", str(out), "--spec", json.dumps(spec), *entries)
    assert (out / "generation.csv").is_file()
    assert (out / "accuracy.csv").is_file()
    assert json.loads((out / "provenance.json").read_text())["step"] == "tables"
    shown = run_ktflow("tables", "--show", str(out)).stdout
    assert "V3 + LoRA" in shown
    assert "Δ Accuracy (official)" in shown
    assert "Blank = predictions with no text" in shown
    page = tmp_path / "report/tables.html"
    run_ktflow("tables", "--page", str(page), "--spec", json.dumps(spec), *entries)
    assert "V2-Lite + LoRA" in page.read_text()
    assert not (tmp_path / "report/generation.csv").exists()  # --page alone writes only the page
    assert (tmp_path / "report/tables.provenance.json").is_file()
    bad = run_ktflow(
        "tables", "--out-dir", str(out), "--spec", json.dumps(spec), "v2:style=x.json", check=False
    )
    assert bad.returncode == 2
    assert "MODEL:TASK:VARIANT=PATH" in bad.stderr

"""Dataset adapters, splits and raw sources, on small hand-made files in each hub set's raw format."""

from __future__ import annotations

import csv
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ktflow
from hypothesis import given, settings
from hypothesis import strategies as st

from ktflow.datasets import Example, SplitSpec, adapter_for, raw_source, split_examples
from ktflow.errors import KtflowInputError
from ktflow.infer.base import requests_from_alpaca
from ktflow.train.datasets import check_rows

# The AfriMed-QA v2 CSV header, as in the data set's published sample (data/sample_10.csv).
AFRIMED_COLUMNS = [
    "sample_id", "split", "gender", "discipline", "clinical_experience", "country", "question_type", "prompt",
    "question", "question_clean", "answer_options", "correct_answer", "answer_rationale", "specialty",
    "region_specific", "mentions_Africa", "mentions_age", "mentions_gender", "tier", "neg_percent", "quality",
    "rated_african", "rated_correct", "rated_omission", "rated_hallucination", "rated_reasonable",
    "rated_harmful", "rated_bias", "version", "requires_african_expertise",
]  # fmt: skip
DRUGS = ["Artemether", "Amoxicillin", "Metformin", "Salbutamol", "Omeprazole"]


def afrimed_row(sample_id: str, **values: str) -> dict[str, str]:
    row = dict.fromkeys(AFRIMED_COLUMNS, "")
    row.update(
        sample_id=sample_id, split="train", country="NG", tier="expert", version="v2", question_type="mcq"
    )
    row.update(values)
    return row


def mcq_row(
    sample_id: str, question: str, answer: int, split: str = "train", **values: str
) -> dict[str, str]:
    options = {f"option{n + 1}": drug for n, drug in enumerate(DRUGS)}
    fields = {
        "split": split, "question": question + "\n \n", "question_clean": question,
        "answer_options": json.dumps(options), "correct_answer": f"option{answer}",
    }  # fmt: skip
    return afrimed_row(sample_id, **{**fields, **values})


def write_afrimed_csv(path: Path, rows: list[dict[str, str]], columns: list[str] = AFRIMED_COLUMNS) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def afrimed_quiz(n_train: int, n_test: int) -> list[dict[str, str]]:
    """A small MCQ set with AfriMed-QA's shape: which drug treats condition k (answer cycles A-E)."""
    conditions = ["malaria", "pneumonia", "type 2 diabetes", "asthma", "peptic ulcer"]
    rows = []
    for index in range(n_train + n_test):
        answer = index % 5
        question = f"Case {index}: a patient presents with {conditions[answer]}. Which drug is first line?"
        rows.append(mcq_row(f"q{index:03d}", question, answer + 1, "train" if index < n_train else "test"))
    return rows


@pytest.fixture
def afrimed_csv(tmp_path: Path) -> Path:
    rows = [
        mcq_row("m1", "Which drug treats uncomplicated malaria?", 1),
        mcq_row("m2", "Which drug is a proton pump inhibitor?", 5, split="test"),
        afrimed_row(
            "s1",
            question_type="saq",
            split="test",
            question="How is severe malaria managed?",
            answer_rationale="IV artesunate.\n\nThen a full oral ACT course.",
        ),
        afrimed_row("c1", question_type="consumer_queries", question="Is fever always malaria?"),
        mcq_row("m3", "Which of these treat asthma?", 4, correct_answer="option4, option5"),
    ]
    return write_afrimed_csv(tmp_path / "afrimed.csv", rows)


def test_afrimed_mcq_rows_become_lettered_prompts(afrimed_csv: Path) -> None:
    adapted = adapter_for("afrimed-qa-mcq").read(afrimed_csv)
    assert [e.id for e in adapted.examples] == ["m1", "m2"]
    first = adapted.examples[0]
    assert first.input.splitlines() == [
        "Which drug treats uncomplicated malaria?", "A. Artemether", "B. Amoxicillin", "C. Metformin",
        "D. Salbutamol", "E. Omeprazole",
    ]  # fmt: skip
    assert (first.output, adapted.examples[1].output) == ("A", "E")
    assert adapted.examples[1].split == "test"
    assert adapted.left_out == {
        "question_type saq": 1,
        "question_type consumer_queries": 1,
        "several correct answers": 1,
    }


def test_afrimed_saq_rows_answer_with_the_rationale(afrimed_csv: Path) -> None:
    adapted = adapter_for("afrimed-qa-saq").read(afrimed_csv)
    (only,) = adapted.examples
    assert (only.id, only.input) == ("s1", "How is severe malaria managed?")
    assert only.output == "IV artesunate.\nThen a full oral ACT course."


def test_blank_option_keeps_letters_tied_to_option_numbers(tmp_path: Path) -> None:
    options = {"option1": "True", "option2": "False", "option3": "", "option4": "Unknown"}
    row = mcq_row("t1", "Malaria is caused by a parasite.", 4, answer_options=json.dumps(options))
    (example,) = adapter_for("afrimed-qa-mcq").read(write_afrimed_csv(tmp_path / "a.csv", [row])).examples
    assert example.input.splitlines()[1:] == ["A. True", "B. False", "D. Unknown"]
    assert example.output == "D"


def test_na_options_are_dropped_and_the_instruction_names_only_offered_letters(tmp_path: Path) -> None:
    # AfriMed-QA's true/false questions carry option3..option5 as "N/A"; its data preparation
    # drops them, and the prompt must not offer C-E.
    true_false = {"option1": "True", "option2": "False", "option3": "N/A", "option4": "n/a", "option5": "N/A"}
    four = {f"option{n + 1}": drug for n, drug in enumerate(DRUGS[:4])} | {"option5": "N/A"}
    rows = [
        mcq_row("t1", "Malaria is caused by a parasite.", 1, answer_options=json.dumps(true_false)),
        mcq_row("f1", "Which drug is an antibiotic?", 2, answer_options=json.dumps(four)),
        mcq_row("e1", "Which drug treats uncomplicated malaria?", 1),
    ]
    examples = adapter_for("afrimed-qa-mcq").read(write_afrimed_csv(tmp_path / "a.csv", rows)).examples
    assert [e.input.splitlines()[1:] for e in examples[:2]] == [
        ["A. True", "B. False"],
        ["A. Artemether", "B. Amoxicillin", "C. Metformin", "D. Salbutamol"],
    ]
    assert ["(A or B)" in examples[0].instruction, "(A, B, C or D)" in examples[1].instruction] == [
        True,
        True,
    ]
    assert "(A, B, C, D or E)" in examples[2].instruction
    assert "N/A" not in " ".join(e.input for e in examples)


def test_answer_pointing_at_an_na_option_is_an_error(tmp_path: Path) -> None:
    options = {"option1": "True", "option2": "False", "option3": "N/A"}
    row = mcq_row("t1", "Q?", 3, answer_options=json.dumps(options))
    with pytest.raises(KtflowInputError, match="N/A options are dropped") as caught:
        adapter_for("afrimed-qa-mcq").read(write_afrimed_csv(tmp_path / "a.csv", [row]))
    assert caught.value.field == "row 1.correct_answer"


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (
            mcq_row("b1", "Q?", 2, answer_options='{"option1": "x", "option2": '),
            "row 1.answer_options",
            "JSON",
        ),
        (mcq_row("b1", "Q?", 2, answer_options='["x", "y"]'), "row 1.answer_options", "option1..option5"),
        (mcq_row("b1", "Q?", 2, answer_options='{"a": "x", "b": "y"}'), "row 1.answer_options", "'a'"),
        (mcq_row("b1", "Q?", 2, correct_answer="B"), "row 1.correct_answer", "option1..option5"),
        (mcq_row("b1", "Q?", 2, correct_answer="option7"), "row 1.correct_answer", "option1..option5"),
        (mcq_row("b1", "Q?", 2, correct_answer=""), "row 1.correct_answer", "option1..option5"),
        (mcq_row("b1", "", 2), "row 1.question", "empty question"),
    ],
)
def test_bad_mcq_rows_name_the_file_row_and_column(
    tmp_path: Path, row: dict[str, str], field: str, message: str
) -> None:
    path = write_afrimed_csv(tmp_path / "bad.csv", [row])
    with pytest.raises(KtflowInputError) as caught:
        adapter_for("afrimed-qa-mcq").read(path)
    assert (caught.value.path, caught.value.field) == (str(path), field)
    assert message in caught.value.message


def test_missing_columns_are_named_before_any_row(tmp_path: Path) -> None:
    columns = [c for c in AFRIMED_COLUMNS if c != "correct_answer"]
    path = write_afrimed_csv(tmp_path / "a.csv", [mcq_row("m1", "Q?", 1)], columns)
    with pytest.raises(KtflowInputError, match="correct_answer") as caught:
        adapter_for("afrimed-qa-mcq").read(path)
    assert caught.value.field == "header"
    # The SAQ adapter does not need that column.
    with pytest.raises(KtflowInputError, match="no usable rows"):
        adapter_for("afrimed-qa-saq").read(path)


def test_empty_row_invalid_utf8_and_duplicate_ids_are_errors(tmp_path: Path) -> None:
    blank = dict.fromkeys(AFRIMED_COLUMNS, "")
    empty = write_afrimed_csv(
        tmp_path / "empty.csv", [mcq_row("m1", "Q1?", 1), blank, mcq_row("m2", "Q2?", 2)]
    )
    with pytest.raises(KtflowInputError, match="empty row") as caught:
        adapter_for("afrimed-qa-mcq").read(empty)
    assert caught.value.field is not None
    assert caught.value.field.startswith("row 2 ")

    good = write_afrimed_csv(tmp_path / "a.csv", [mcq_row("m1", "Q1?", 1), mcq_row("m2", "Q2?", 2)])
    latin1 = tmp_path / "latin1.csv"
    data = good.read_bytes()
    latin1.write_bytes(data.replace(b"Q2?", "Qé?".encode("latin-1")))
    with pytest.raises(KtflowInputError, match="UTF-8") as caught:
        adapter_for("afrimed-qa-mcq").read(latin1)
    line = data[: data.index(b"Q2?")].count(b"\n") + 1
    assert caught.value.field == f"line {line}"

    twice = write_afrimed_csv(tmp_path / "twice.csv", [mcq_row("m1", "Q1?", 1), mcq_row("m1", "Q2?", 2)])
    with pytest.raises(KtflowInputError, match="duplicate id 'm1'") as caught:
        adapter_for("afrimed-qa-mcq").read(twice)
    assert caught.value.field == "row 2.id"


def test_on_invalid_skip_counts_bad_rows(tmp_path: Path) -> None:
    rows = [
        mcq_row("m1", "Q1?", 1),
        mcq_row("m2", "Q2?", 2, correct_answer="option9"),
        mcq_row("m3", "Q3?", 3),
    ]
    adapted = adapter_for("afrimed-qa-mcq", on_invalid="skip").read(
        write_afrimed_csv(tmp_path / "a.csv", rows)
    )
    assert [e.id for e in adapted.examples] == ["m1", "m3"]
    assert adapted.left_out == {"invalid correct_answer": 1}
    assert "row 2.correct_answer" in adapted.first_invalid[0]


def test_empty_saq_reference_is_an_error(tmp_path: Path) -> None:
    path = write_afrimed_csv(tmp_path / "a.csv", [afrimed_row("s1", question_type="saq", question="Why?")])
    with pytest.raises(KtflowInputError, match="reference answer") as caught:
        adapter_for("afrimed-qa-saq").read(path)
    assert caught.value.field == "row 1.answer_rationale"


# ---- alpaca-shaped sets --------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_translational_style_keeps_the_empty_instruction(tmp_path: Path) -> None:
    rows = [
        {"instruction": "", "input": f"你最近看过电影吗？{i}", "output": f"天啊，我的朋友，看过！{i}"}
        for i in range(3)
    ]
    adapted = adapter_for("translational-style").read(write_json(tmp_path / "TslDial.json", rows), "tsl")
    assert [e.id for e in adapted.examples] == ["tsl-00001", "tsl-00002", "tsl-00003"]
    assert adapted.examples[0].as_row() == {
        "id": "tsl-00001",
        "instruction": "",
        **{k: rows[0][k] for k in ("input", "output")},
    }


def test_nekoqa_rows_need_an_instruction(tmp_path: Path) -> None:
    rows = [
        {"instruction": "你好", "output": "喵~主人好！"},
        {"instruction": "", "input": "再见", "output": "呜..."},
    ]
    with pytest.raises(KtflowInputError, match="instruction") as caught:
        adapter_for("nekoqa").read(write_json(tmp_path / "NekoQA-10K.json", rows))
    assert caught.value.field == "row 2.instruction"
    # The generic alpaca adapter accepts the input as the prompt.
    assert len(adapter_for("alpaca").read(tmp_path / "NekoQA-10K.json").examples) == 2


@pytest.mark.parametrize(
    ("name", "text", "field", "message"),
    [
        ("a.json", '{"instruction": "x"}', None, "JSON list"),
        ("a.json", '[{"instruction": "x", "output": "y"}, "oops"]', "row 2", "expected an object"),
        ("a.json", '[{"instruction": "x", "output": 3}]', "row 1.output", "must be a string"),
        ("a.json", '[{"instruction": "x", "output": ""}]', "row 1.output", "missing or empty"),
        ("a.json", '[{"instruction": "", "input": "", "output": ""}]', "row 1", "empty row"),
        ("a.json", '[{"instruction": "x", "output": "y"},\n  {"instruction": }]', "line 2", "invalid JSON"),
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x",\n', "line 2", "invalid JSON"),
    ],
)
def test_bad_alpaca_files_name_the_row(
    tmp_path: Path, name: str, text: str, field: str | None, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KtflowInputError, match=message) as caught:
        adapter_for("alpaca").read(path)
    assert caught.value.field == field


def test_adapter_output_is_what_training_and_inference_accept(afrimed_csv: Path) -> None:
    rows = [e.as_row() for e in adapter_for("afrimed-qa-mcq").read(afrimed_csv).examples]
    check_rows(afrimed_csv, rows, "alpaca")
    requests = requests_from_alpaca(afrimed_csv, rows)
    assert requests[0].label == "A"
    assert requests[0].prompt.startswith("Answer the multiple-choice question")


# ---- splits --------------------------------------------------------------------------


def examples(n: int, splits: tuple[str, ...] = ()) -> list[Example]:
    return [
        Example(f"e{i}", "", f"in {i}", f"out {i}", splits[i % len(splits)] if splits else None)
        for i in range(n)
    ]


def test_head_split_is_the_first_rows() -> None:
    train, test, _ = split_examples(examples(10), SplitSpec(method="head", train_rows=7))
    assert [e.id for e in train] == [f"e{i}" for i in range(7)]
    assert [e.id for e in test] == ["e7", "e8", "e9"]


def test_column_split_follows_the_raw_labels_and_counts_the_rest() -> None:
    rows = examples(9, ("train", "test", "dev"))
    train, test, dropped = split_examples(rows, SplitSpec(method="column"))
    assert {e.split for e in train} == {"train"}
    assert {e.split for e in test} == {"test"}
    assert dropped == {"split dev": 3}
    with pytest.raises(KtflowInputError, match="split column"):
        split_examples(rows, SplitSpec(method="column"), has_split_column=False)


def test_random_split_is_seeded_and_caps_keep_file_order() -> None:
    rows = examples(100)
    first = split_examples(rows, SplitSpec(test_size=0.2, seed=1))
    assert first == split_examples(rows, SplitSpec(test_size=0.2, seed=1))
    assert [e.id for e in first[1]] != [
        e.id for e in split_examples(rows, SplitSpec(test_size=0.2, seed=2))[1]
    ]
    train, test, dropped = split_examples(rows, SplitSpec(test_size=30, max_test=10, max_train=50))
    assert (len(train), len(test), dropped) == (50, 10, {"over max_test": 20, "over max_train": 20})
    assert [int(e.id[1:]) for e in test] == sorted(int(e.id[1:]) for e in test)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_random_split_partitions_the_rows(n: int, fraction: float, seed: int) -> None:
    rows = examples(n)
    try:
        train, test, _ = split_examples(rows, SplitSpec(test_size=fraction, seed=seed))
    except KtflowInputError as error:
        assert error.field == "split.test_size"  # noqa: PT017  # a fraction that rounds to 0 or n rows
        return
    assert {e.id for e in train}.isdisjoint(e.id for e in test)
    assert len(train) + len(test) == n
    assert len(test) == round(fraction * n)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (SplitSpec(test_size=10), "split.test_size"),
        (SplitSpec(method="head", train_rows=10), "split.train_rows"),
    ],
)
def test_impossible_splits_name_the_key(spec: SplitSpec, field: str) -> None:
    with pytest.raises(KtflowInputError) as caught:
        split_examples(examples(10), spec)
    assert caught.value.field == field


# ---- raw sources and the prepare-task command ----------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real local HTTP server (no network needed) serving a directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_url_source_downloads_checks_sha256_and_caches(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    import hashlib

    root, base = http_root
    rows = [{"instruction": "", "input": f"q{i}", "output": f"a{i}"} for i in range(10)]
    data = write_json(root / "TslDial.json", rows).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    got = raw_source({"source": "url", "url": f"{base}/TslDial.json", "sha256": digest}).fetch(cache)
    assert got == cache / "TslDial.json"
    assert got.read_bytes() == data
    (root / "TslDial.json").unlink()  # served from the cache from now on
    assert raw_source({"source": "url", "url": f"{base}/TslDial.json", "sha256": digest}).fetch(cache) == got
    with pytest.raises(KtflowInputError, match="download failed"):
        raw_source({"source": "url", "url": f"{base}/missing.json"}).fetch(cache)
    write_json(root / "other.json", rows[:3])
    with pytest.raises(KtflowInputError, match="sha256") as caught:
        raw_source({"source": "url", "url": f"{base}/other.json", "sha256": digest}).fetch(cache)
    assert caught.value.field == "sha256"
    assert not (cache / "other.json").exists()


def test_prepare_task_cli_splits_afrimed_by_its_column(tmp_path: Path) -> None:
    raw = write_afrimed_csv(tmp_path / "afrimed.csv", afrimed_quiz(8, 4))
    spec = {
        "source": "raw",
        "raw_file": str(raw),
        "adapter": "afrimed-qa-mcq",
        "kind": "mcq",
        "split": {"method": "column"},
    }
    run_ktflow("prepare-task", str(tmp_path / "out"), "--name", "afri", "--spec", json.dumps(spec))
    train = json.loads((tmp_path / "out/train.json").read_text())
    test = json.loads((tmp_path / "out/test.json").read_text())
    assert (len(train), len(test)) == (8, 4)
    assert set(train[0]) == {"id", "instruction", "input", "output"}
    assert test[0]["id"] == "q008"
    provenance = json.loads((tmp_path / "out/provenance.json").read_text())
    assert provenance["extra"]["rows"] == {"usable": 12, "train": 8, "test": 4}
    assert provenance["inputs"][str(raw)]["sha256"] == provenance["extra"]["raw"]["sha256"]


def test_prepare_task_cli_rejects_an_adapter_of_the_wrong_kind(tmp_path: Path) -> None:
    raw = write_afrimed_csv(tmp_path / "afrimed.csv", afrimed_quiz(4, 2))
    result = run_ktflow(
        "prepare-task", str(tmp_path / "out"), "--adapter", "afrimed-qa-mcq", "--raw-file", str(raw),
        "--spec", '{"kind": "generation"}', check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "kind" in result.stderr
    assert not (tmp_path / "out").exists()


def _hub_cache(root: Path, repo_id: str, commit: str, filename: str, data: bytes) -> Path:
    """The on-disk layout huggingface_hub's cache uses for one file of a data-set repository."""
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(data)
    return root


def test_hub_source_uses_the_cache_offline_and_explains_a_miss(tmp_path: Path) -> None:
    rows = [{"instruction": f"你好{i}", "output": f"喵{i}"} for i in range(20)]
    data = json.dumps(rows, ensure_ascii=False).encode()
    commit = "1b2110c996a8237823b86c1a3d3e8a6762b38430"
    cache = _hub_cache(tmp_path / "hub", "liumindmind/NekoQA-10K", commit, "NekoQA-10K.json", data)
    spec = {"source": "hf-dataset", "repo_id": "liumindmind/NekoQA-10K", "filename": "NekoQA-10K.json",
            "adapter": "nekoqa", "split": {"test_size": 0.25}}  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    for revision in (commit, "main"):
        out = tmp_path / f"out-{revision}"
        run_ktflow("prepare-task", str(out), "--spec", json.dumps({**spec, "revision": revision}), **env)
        assert len(json.loads((out / "test.json").read_text())) == 5
    missing = {**spec, "repo_id": "someone/not-cached"}
    result = run_ktflow(
        "prepare-task", str(tmp_path / "x"), "--spec", json.dumps(missing), check=False, **env
    )
    assert result.returncode == 2
    assert "unreachable" in result.stderr
    assert "hf download someone/not-cached NekoQA-10K.json" in result.stderr

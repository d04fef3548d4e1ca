"""ktflow evaluate: the paper metric against an independent reference, the standard
flavour, MCQ parsing, input checking and the CLI's outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jieba
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ktflow import cli
from ktflow.errors import KtflowInputError
from ktflow.metrics import (
    is_blank,
    load_predictions,
    mean_scores,
    normalize_label,
    parse_choice,
    score_generation,
    score_mcq,
    summarize_generation,
    summarize_mcq,
)
from ktflow.metrics.flavours import CjkRougeTokenizer
from ktflow.metrics.generation import MIN_PARALLEL_SAMPLES

PAPER_KEYS = ("bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-1", "rouge-2", "rouge-l")


def reference_paper(
    predictions: list[str], labels: list[str]
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The KTransformers SFT metric written out from its definition, one sample at a time."""
    rows = []
    for pred, label in zip(predictions, labels, strict=True):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            rows.append(dict.fromkeys(PAPER_KEYS, 0.0))
            continue
        row = {}
        for n, weights in (
            (1, (1, 0, 0, 0)),
            (2, (0.5, 0.5, 0, 0)),
            (3, (1 / 3, 1 / 3, 1 / 3, 0)),
            (4, (0.25, 0.25, 0.25, 0.25)),
        ):
            score = sentence_bleu(
                [reference], hypothesis, weights=weights, smoothing_function=SmoothingFunction().method3
            )
            row[f"bleu-{n}"] = round(score * 100, 4)
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            row[key] = round(rouge[key]["f"] * 100, 4)
        rows.append(row)
    means = {key: sum(row[key] for row in rows) / len(rows) for key in PAPER_KEYS}
    return rows, means


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    for key in PAPER_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def assert_identical(got: dict[str, float], want: dict[str, float]) -> None:
    """Per-sample scores: the same floats as the reference, after its 4-decimal rounding."""
    assert {key: got[key] for key in PAPER_KEYS} == want


CASES = {
    "english": ("The cat sat on the mat today.", "The cat is sitting on the mat today."),
    "english_disjoint": ("Completely different words here.", "Nothing overlaps with that."),
    "chinese": ("我爱北京天安门，天安门上太阳升。", "我爱北京天安门，太阳升起来了。"),
    "chinese_short": ("好", "好的"),
    "mixed": ("使用 KTransformers 微调 DeepSeek-V3 模型", "用KTransformers来微调DeepSeek V3模型。"),
    "multiline": ("第一句。\n第二句！Second line?", "第一句。\n第三句。Second line."),
    "rationale": (
        "Malaria in pregnancy is treated with artemether-lumefantrine (ACT) in the second and third "
        "trimesters; quinine plus clindamycin is used in the first. Give 5 mg/kg, e.g. twice daily, "
        "and refer if severe. The the the patient should sleep under nets.",
        "In the first trimester, quinine with clindamycin for 7 days is recommended; from the second "
        "trimester an ACT such as artemether-lumefantrine is first-line. Severe malaria needs IV "
        "artesunate and referral. Insecticide-treated nets prevent infection.",
    ),
    "dialogue": (
        "主人～今天也辛苦了喵！要不要先喝杯热茶？我已经把 GPU 的温度降下来了……明天见哦。",
        "主人今天辛苦了喵～先喝杯热茶休息一下吧！GPU 的温度已经降下来了，明天也要加油哦？",
    ),
    "punctuation_only": ("!!! ...", "？？？。。。"),
    "punctuation_vs_text": ("，。！", "这是一个句子。"),
    "empty_prediction": ("", "A reference sentence."),
    "whitespace_prediction": (" \n\t\u3000", "参考答案"),
    "empty_label": ("Some prediction.", ""),
    "both_empty": ("", "   "),
}


def test_paper_matches_reference_on_each_kind_of_text() -> None:
    predictions = [pred for pred, _ in CASES.values()]
    labels = [label for _, label in CASES.values()]
    got = score_generation(predictions, labels, flavour="paper")
    want_rows, want_means = reference_paper(predictions, labels)
    for name, got_row, want_row in zip(CASES, got, want_rows, strict=True):
        assert set(got_row) == set(PAPER_KEYS), name
        assert_identical(got_row, want_row)
    summary = summarize_generation(predictions, labels, got, flavour="paper")
    assert_close(summary, want_means)
    assert summary["n"] == len(CASES)
    assert summary["empty_predictions"] == 3
    assert summary["empty_labels"] == 2
    assert summary["flavour"] == "paper"
    # Texts that share words must score above zero, or the comparison above proves little.
    assert min(got[0]["bleu-4"], got[2]["rouge-l"], got[4]["bleu-1"]) > 0


def test_blank_rows_score_zero_and_count_in_the_mean() -> None:
    rows = score_generation(["", "same words here"], ["same words here", "same words here"])
    assert rows[0] == dict.fromkeys(PAPER_KEYS, 0.0)
    assert rows[1]["bleu-4"] == pytest.approx(100.0)
    assert mean_scores(rows)["bleu-4"] == pytest.approx(50.0)


_POOL = [
    "the", "cat", "模型", "微调", "训练", "数据", "on", "mat", "Hello", "世界", "，", "。", "!", "?",
    " ", "  ", "\n", "\u3000", "3.5", "DeepSeek", "天安门", "我们", "是", "a", "B", "the the",
    "？”", "……", "......", "mg/kg", "e.g.", "x-ray", "50%", "\t", "！", "喵～",
]  # fmt: skip
# Token soups (repeated tokens, sentence ends, whitespace runs) and arbitrary Unicode.
_texts = st.one_of(st.lists(st.sampled_from(_POOL), max_size=25).map("".join), st.text(max_size=30))


@settings(max_examples=60, deadline=None, database=None)
@given(pairs=st.lists(st.tuples(_texts, _texts), min_size=1, max_size=4))
def test_paper_matches_reference_on_random_text(pairs: list[tuple[str, str]]) -> None:
    predictions = [pred for pred, _ in pairs]
    labels = [label for _, label in pairs]
    got = score_generation(predictions, labels, flavour="paper")
    want_rows, want_means = reference_paper(predictions, labels)
    for got_row, want_row in zip(got, want_rows, strict=True):
        assert_identical(got_row, want_row)
    assert_close(mean_scores(got), want_means)


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(max_size=30))
def test_blank_test_is_upstreams_token_test(text: str) -> None:
    assert is_blank(text) == (len(" ".join(jieba.cut(text)).split()) == 0)


def synthetic_pairs(count: int, seed: int = 7) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["model", "data", "train", "layer", "token", "expert", "memory", "kernel", "answer", "weight"]
    chars = "我们的模型在数据上训练专家层内存答案权重"
    predictions, labels = [], []
    for index in range(count):
        if index % 2:
            label = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
            pred = " ".join(w if rng.random() > 0.3 else rng.choice(words) for w in label.split())
        else:
            label = "".join(rng.choice(chars) for _ in range(rng.randint(3, 30))) + "。"
            pred = "".join(c if rng.random() > 0.3 else rng.choice(chars) for c in label)
        predictions.append(pred if index % 17 else "")
        labels.append(label)
    return predictions, labels


@pytest.mark.parametrize("flavour", ["paper", "standard"])
def test_workers_give_identical_results(flavour: str) -> None:
    predictions, labels = synthetic_pairs(MIN_PARALLEL_SAMPLES + 150)
    single = score_generation(predictions, labels, flavour=flavour, workers=1)
    parallel = score_generation(predictions, labels, flavour=flavour, workers=2)
    assert parallel == single
    assert mean_scores(parallel) == mean_scores(single)


def test_standard_flavour_handles_cjk_and_matches_13a_on_english() -> None:
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu import corpus_bleu

    text = "我爱北京天安门"
    rows = score_generation([text], [text], flavour="standard")
    assert rows[0]["rouge_score-rouge1"] == pytest.approx(100.0)
    # The reason for the tokenizer: rouge-score's default one sees no tokens in Chinese.
    assert RougeScorer(["rouge1"]).score(text, text)["rouge1"].fmeasure == 0

    predictions, labels = synthetic_pairs(40)
    english = [(p, lab) for p, lab in zip(predictions, labels, strict=True) if lab.isascii()]
    preds_en = [p for p, _ in english]
    labels_en = [lab for _, lab in english]
    summary = summarize_generation(
        preds_en, labels_en, score_generation(preds_en, labels_en, flavour="standard"), flavour="standard"
    )
    assert summary["sacrebleu-bleu"] == pytest.approx(
        corpus_bleu(preds_en, [labels_en], tokenize="13a").score
    )
    assert "tok:zh" in summary["sacrebleu-signature"]
    assert summary["flavour"] == "standard"
    assert "bleu-4" not in summary


@settings(max_examples=100, deadline=None, database=None)
@given(text=st.text(alphabet="abcdefgxyz0189 .,!?'-\n", max_size=40))
def test_cjk_rouge_tokenizer_equals_rouge_score_default_on_ascii(text: str) -> None:
    from rouge_score.tokenizers import DefaultTokenizer

    assert CjkRougeTokenizer().tokenize(text) == DefaultTokenizer().tokenize(text)


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("C", "C"),
        ("  b. Malaria", "B"),
        ("E) none of the above", "E"),
        ("C) Malaria", "C"),
        ("C项正确", "C"),
        ("**B**", "B"),
        ("(c)", "C"),
        ("Answer: D", "D"),
        ("The answer is C.", "C"),
        ("The correct option is (d) because", "D"),
        ("答案是C", "C"),
        ("答案：B。", "B"),
        ("我选D", "D"),
        ("option3", "C"),
        ("I pick option 2", "B"),
        ("A patient with fever", "A"),  # a capital cannot be told from "A is correct"
        # Lower-case articles and abbreviations are not answers.
        ("a viral infection caused by plasmodium", None),
        ("e.g. malaria", None),
        ("the answer is a viral infection", None),
        ("answer: e.g. malaria", None),
        ("Because of the fever", None),
        ("", None),
    ],
)
def test_extraction_mode(output: str, letter: str | None) -> None:
    assert parse_choice(output) == letter


@pytest.mark.parametrize(
    ("output", "label", "correct"),
    [
        ("C", "C", True),
        ("C) Malaria", "option3", True),
        ("Cough", "C", True),  # the first character, read literally, as AfriMed-QA does
        (" C", "C", False),  # no stripping
        ("c", "C", False),  # no upper-casing
        ("Answer: C", "C", False),
        ("**C**", "C", False),
        ("", "A", False),
    ],
)
def test_official_rule_is_the_literal_first_character(output: str, label: str, correct: bool) -> None:
    assert score_mcq([output], [label])[0].correct is correct


def test_labels_accept_letters_and_afrimed_options() -> None:
    assert [normalize_label(x) for x in ("A", "e", " option3 ", "Option5")] == ["A", "E", "C", "E"]
    for bad in ("F", "option6", "AB", ""):
        with pytest.raises(ValueError, match="option letter"):
            normalize_label(bad)


def test_mcq_accuracy_and_counts() -> None:
    outputs = ["C", "Answer: B", "Because", "b", " A", "", "e.g. malaria"]
    labels = ["C", "option2", "A", "B", "A", "D", "E"]
    summary = summarize_mcq(score_mcq(outputs, labels))
    assert summary["n"] == 7
    # Official, literal first character: C, A, B, b, " ", none, e -> right on row 1 only.
    assert summary["accuracy"] == pytest.approx(1 / 7)
    # Extracted: C, B, none, B, A, none, none -> right on rows 1, 2, 4 and 5.
    assert summary["accuracy_extracted"] == pytest.approx(4 / 7)
    assert summary["not_extracted"] == 3
    assert summary["empty_predictions"] == 1
    assert "first character" in summary["rule"]


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def row(index: int, predict: Any = "pred", label: Any = "label", **extra: Any) -> dict[str, Any]:
    return {"id": f"r{index}", "prompt": "p", "predict": predict, "label": label, **extra}


@pytest.mark.parametrize(
    ("content", "task", "expected"),
    [
        (b"", "generation", "empty file"),
        (b"\n  \n", "generation", "empty file"),
        (
            b'{"id": "a", "prompt": "p", "predict": "x", "label": "y"}\n{oops\n',
            "generation",
            "line 2: invalid JSON",
        ),
        (b"[1, 2]\n", "generation", "line 1: expected a JSON object"),
        (b'{"prompt": "p", "predict": "x", "label": "y"}\n', "generation", "line 1, field 'id': missing"),
        (b'{"id": true, "prompt": "p", "predict": "x", "label": "y"}\n', "generation", "field 'id': must be"),
        (b'{"id": 1, "predict": "x", "label": "y"}\n', "generation", "line 1, field 'prompt': missing"),
        (b'{"id": 1, "prompt": "p", "label": "y"}\n', "generation", "field 'predict': missing"),
        (
            b'{"id": 1, "prompt": "p", "predict": 3, "label": "y"}\n',
            "generation",
            "'predict': must be a string",
        ),
        (
            b'{"id": 1, "prompt": "p", "predict": "x", "label": null}\n',
            "generation",
            "'label': must be a string",
        ),
        (
            b'{"id": 1, "prompt": "p", "predict": "x", "label": "y"}\n\n'
            b'{"id": "1", "prompt": "p", "predict": "x", "label": "y"}\n',
            "generation",
            "line 3, field 'id': duplicate id '1' (first on line 1)",
        ),
        (
            b'{"id": 1, "prompt": "p", "predict": "\xff", "label": "y"}\n',
            "generation",
            "line 1: not valid UTF-8",
        ),
        (b'{"id": 1, "prompt": "p", "predict": "x", "label": "option9"}\n', "mcq", "line 1, field 'label'"),
    ],
)
def test_bad_input_names_file_line_and_field(
    tmp_path: Path, content: bytes, task: str, expected: str
) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    with pytest.raises(KtflowInputError) as caught:
        load_predictions(path, task=task)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KtflowInputError, match="no such file"):
        load_predictions(tmp_path / "absent.jsonl")


def test_cli_writes_metrics_per_sample_and_provenance(tmp_path: Path) -> None:
    predictions, labels = synthetic_pairs(30)
    source = write_rows(
        tmp_path / "preds.jsonl",
        [row(i, predict=p, label=lab) for i, (p, lab) in enumerate(zip(predictions, labels, strict=True))],
    )
    out = tmp_path / "out" / "metrics.json"
    per_sample = tmp_path / "out" / "per_sample.jsonl"
    code = cli.main(
        ["evaluate", str(source), "--task", "generation", "-o", str(out), "--per-sample", str(per_sample)]
    )
    assert code == 0
    metrics = json.loads(out.read_text(encoding="utf-8"))
    traced = [json.loads(line) for line in per_sample.read_text(encoding="utf-8").splitlines()]
    _, want = reference_paper(predictions, labels)
    assert_close(metrics, want)
    assert (metrics["n"], metrics["empty_predictions"]) == (30, 2)
    assert [r["id"] for r in traced] == [f"r{i}" for i in range(30)]
    # A table cell is the mean of its per-sample column.
    assert sum(r["rouge-l"] for r in traced) / 30 == pytest.approx(metrics["rouge-l"], abs=1e-9)
    assert sum(r["empty_prediction"] for r in traced) == 2
    provenance = json.loads((tmp_path / "out" / "metrics.provenance.json").read_text(encoding="utf-8"))
    assert provenance["step"] == "evaluate"
    assert str(source) in provenance["inputs"]
    assert provenance["config"]["flavour"] == "paper"


def test_cli_mcq(tmp_path: Path) -> None:
    rows = [row(0, "C", "option3"), row(1, "The answer is B.", "B"), row(2, "no idea", "A")]
    source = write_rows(tmp_path / "mcq.jsonl", rows)
    out = tmp_path / "mcq_metrics.json"
    per_sample = tmp_path / "mcq_rows.jsonl"
    assert (
        cli.main(["evaluate", str(source), "--task", "mcq", "-o", str(out), "--per-sample", str(per_sample)])
        == 0
    )
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["accuracy_extracted"] == pytest.approx(2 / 3)
    assert (metrics["not_extracted"], metrics["empty_predictions"]) == (1, 0)
    traced = [json.loads(line) for line in per_sample.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["official"], r["extracted"], r["label"]) for r in traced] == [
        ("r0", "C", "C", "C"),
        ("r1", "T", "B", "B"),
        ("r2", "n", None, "A"),
    ]


def test_cli_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "bad.jsonl", [row(0), row(1, predict=None)])
    out = tmp_path / "metrics.json"
    code = cli.main(
        ["evaluate", str(source), "--task", "generation", "-o", str(out), "--per-sample", str(tmp_path / "s")]
    )
    assert code == 2
    assert "line 2, field 'predict'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_rejects_flavour_for_mcq(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "mcq.jsonl", [row(0, "A", "A")])
    args = ["evaluate", str(source), "--task", "mcq", "--flavour", "paper", "-o", str(tmp_path / "m.json")]
    assert cli.main(args) == 2
    assert not (tmp_path / "m.json").exists()

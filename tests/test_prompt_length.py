"""Prompt length is bounded before the model loads: refused, or cut and counted (inference.overlong).

The tiny model has max_position_embeddings 512, so with max_new_tokens 8 a prompt may hold
504 tokens (chat template included). A 3,000-word row is refused with one line naming the
file, row and field, or, with ``overlong: truncate``, cut to fit, logged and counted in the
provenance. A 20 MB row is refused from its length alone: the tokenizer never sees it and
the process stays small.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ktflow_env, run_ktflow
from transformers import AutoTokenizer

from ktflow.infer.base import requests_from_alpaca
from ktflow.infer.prompts import PromptLimit, bound_prompts, prompt_limit
from ktflow.token_count import PromptCounter

ROWS = [
    {"id": f"r{n}", "instruction": "Rewrite.", "input": f"line {n}", "output": f"LINE {n}"} for n in range(3)
]
LONG = " ".join(f"word{n % 50}" for n in range(3000))
SPEC = {"max_new_tokens": 8, "batch_size": 4}


def test_the_limit_is_the_model_s_positions_less_the_new_tokens(tiny_bf16: Path) -> None:
    assert prompt_limit(SPEC, tiny_bf16) == PromptLimit(
        504, "max_position_embeddings 512 - max_new_tokens 8", "refuse"
    )
    tighter = prompt_limit({**SPEC, "max_prompt_tokens": 100, "overlong": "truncate"}, tiny_bf16)
    assert tighter == PromptLimit(100, "inference.max_prompt_tokens", "truncate")


def test_a_cut_prompt_fits_and_keeps_its_start(tiny_bf16: Path) -> None:
    counter = PromptCounter(AutoTokenizer.from_pretrained(tiny_bf16))
    rows = [*ROWS, {"id": "long", "instruction": "Rewrite.", "input": LONG, "output": "x"}]
    requests = requests_from_alpaca(Path("t.json"), rows)
    for limit in (40, 200, 504):
        bounded, facts = bound_prompts(
            Path("t.json"), rows, requests, PromptLimit(limit, "test", "truncate"), counter
        )
        assert facts["truncated"] == 1 and facts["longest_prompt_tokens"] > 504
        assert bounded[:3] == requests[:3]
        assert limit - 3 <= counter.count(bounded[3].messages) <= limit
        assert bounded[3].prompt.startswith("Rewrite.\nword0 word1")


def infer(
    tmp_path: Path, rows: list[dict[str, Any]], tiny_bf16: Path, **spec: Any
) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test.json"
    test.write_text(json.dumps(rows))
    out = tmp_path / "out" / "base.jsonl"
    return run_ktflow("infer", str(tiny_bf16), str(test), str(out), "--spec", json.dumps({**SPEC, **spec}),
                      check=False)  # fmt: skip


def test_an_overlong_prompt_is_refused_naming_file_row_and_field(tiny_bf16: Path, tmp_path: Path) -> None:
    result = infer(tmp_path, [*ROWS[:1], {**ROWS[1], "input": LONG}, ROWS[2]], tiny_bf16)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ktflow infer: error: ")]
    assert f"{tmp_path / 'test.json'}: row 2.input: prompt is " in line and "over the limit of 504" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncate_cuts_logs_and_counts(tiny_bf16: Path, tmp_path: Path) -> None:
    result = infer(tmp_path, [*ROWS[:1], {**ROWS[1], "input": LONG}, ROWS[2]], tiny_bf16, overlong="truncate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 3 prompts cut to 504 tokens" in result.stderr
    predictions = [json.loads(line) for line in (tmp_path / "out" / "base.jsonl").read_text().splitlines()]
    assert [row["id"] for row in predictions] == ["r0", "r1", "r2"]
    assert predictions[1]["prompt"].startswith("Rewrite.\nword0") and len(predictions[1]["prompt"]) < len(
        LONG
    )
    provenance = json.loads((tmp_path / "out" / "base.provenance.json").read_text())
    prompts = provenance["extra"]["prompts"]
    assert prompts["truncated"] == 1 and prompts["limit"] == 504 and prompts["policy"] == "truncate"


def test_a_20_mb_row_fails_fast_and_small(tiny_bf16: Path, tmp_path: Path) -> None:
    test = tmp_path / "test.json"
    test.write_text(json.dumps([ROWS[0], {**ROWS[1], "input": "token " * 3_500_000}]))
    assert test.stat().st_size > 20_000_000
    out = tmp_path / "base.jsonl"
    # Peak RSS of this process alone (not of the test session's other children).
    argv = ["ktflow", "infer", str(tiny_bf16), str(test), str(out), "--spec", json.dumps(SPEC)]
    probe = (
        "import resource, runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('ktflow', run_name='__main__')\n"
        "except SystemExit as done:\n    code = done.code\n"
        "print('RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, code, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ktflow_env())
    assert f"{test}: row 2.input: prompt is at least " in result.stderr, result.stderr[-3000:]
    rss_mb, code = result.stderr.split("RSS_MB ")[1].split()[:2]
    assert code == "2" and int(rss_mb) < 2000, result.stderr[-2000:]
    assert not out.exists()


# ---- training rows over cutoff_len: LLaMA-Factory cuts them; ktflow logs and counts them -------------


def test_training_rows_over_cutoff_are_counted_and_logged(
    tiny_bf16: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ktflow.datasets.contract import Layout
    from ktflow.train.cutoff import over_cutoff

    data = tmp_path / "train.json"
    data.write_text(json.dumps([*ROWS, {**ROWS[1], "id": "long", "input": LONG}, {**ROWS[0], "id": "huge",
                                "input": "token " * 200_000}]))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_bf16)
    with caplog.at_level("WARNING"):
        facts = over_cutoff(data, Layout.of("alpaca"), tokenizer, 256)
    assert facts == {
        "cutoff_len": 256,
        "rows": 5,
        "over_cutoff": 2,
        "longest_text_tokens": facts["longest_text_tokens"],
    }
    assert facts["longest_text_tokens"] > 3000
    (message,) = [r.getMessage() for r in caplog.records if "cutoff_len" in r.getMessage()]
    assert "2 of 5 rows have more than cutoff_len 256 tokens" in message and "row 4, row 5" in message

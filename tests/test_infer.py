"""Inference: request building, the resumable writer, and real generation with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktflow.errors import KtflowInputError
from ktflow.infer.base import Request, ResumableJsonl, Sampling, requests_from_alpaca


def test_prompt_matches_llamafactory_alpaca_join() -> None:
    rows = [{"id": "a", "instruction": "Do it.", "input": "x y", "output": "z"}]
    (request,) = requests_from_alpaca(Path("t.json"), rows, system="Be brief.")
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Do it.\nx y"},
    ]
    assert request.prompt == "Do it.\nx y" and request.label == "z"


def test_duplicate_or_missing_ids_name_the_row() -> None:
    rows = [{"id": "a", "instruction": "i", "output": "o"}, {"id": "a", "instruction": "i", "output": "o"}]
    with pytest.raises(KtflowInputError, match="duplicate id") as error:
        requests_from_alpaca(Path("t.json"), rows)
    assert error.value.field == "row 2.id"  # rows are numbered from 1 in every step
    with pytest.raises(KtflowInputError) as error:
        requests_from_alpaca(Path("t.json"), [{"instruction": "i", "output": "o"}])
    assert error.value.field == "row 1.id"


def test_resumable_writer_keeps_done_rows_and_drops_torn_tail(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    sink = ResumableJsonl(out)
    sink.append([{"id": "1", "predict": "a"}, {"id": "2", "predict": "b"}])
    sink._handle.close()
    with open(sink.partial, "a") as handle:
        handle.write('{"id": "3", "pre')  # killed mid-write
    resumed = ResumableJsonl(out)
    assert set(resumed.done) == {"1", "2"}
    assert not out.exists()
    resumed.append([{"id": "3", "predict": "c"}])
    resumed.finish(["3", "1", "2"])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["3", "1", "2"]
    assert not resumed.partial.exists()


def test_finish_refuses_to_publish_a_short_file(tmp_path: Path) -> None:
    sink = ResumableJsonl(tmp_path / "p.jsonl")
    sink.append([{"id": "1"}])
    with pytest.raises(RuntimeError, match="1 rows have no prediction"):
        sink.finish(["1", "2"])
    assert not (tmp_path / "p.jsonl").exists() and sink.partial.exists()


def test_hf_backend_generates_deterministically_in_batches(tiny_bf16: Path) -> None:
    from ktflow.infer.backends.hf import HFInference

    requests = [
        Request(id=str(i), messages=[{"role": "user", "content": "word " * (i + 1)}], label="")
        for i in range(5)
    ]
    first = HFInference(tiny_bf16, Sampling(max_new_tokens=6, batch_size=2))
    one = dict((r.id, text) for r, text in first.generate(requests))
    two = dict((r.id, text) for r, text in first.generate(list(reversed(requests))))
    single = HFInference(tiny_bf16, Sampling(max_new_tokens=6, batch_size=1))
    three = dict((r.id, text) for r, text in single.generate(requests))
    assert set(one) == {str(i) for i in range(5)}
    assert one == two  # order of requests does not change results
    assert one == three  # left padding does not change greedy results
    assert first.generated_tokens > 0


def test_schema_backend_enum_is_the_registry() -> None:
    import yaml

    from ktflow.infer.backends import BACKENDS

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$defs"]["inference"]["properties"]["backend"]["enum"] == list(BACKENDS)


def test_spec_keys_are_the_backends_own_plus_the_shared_ones() -> None:
    from ktflow.infer.backends import BACKENDS
    from ktflow.infer.spec import OPERATIONAL_KEYS, SPEC_KEYS

    for backend in BACKENDS.values():
        assert backend.operational_keys <= backend.spec_keys <= SPEC_KEYS, backend.name
        assert backend.operational_keys <= OPERATIONAL_KEYS, backend.name

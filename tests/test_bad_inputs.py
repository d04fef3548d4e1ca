"""A catalogue of bad inputs, each run through the real CLI (or `snakemake -n` for the config).

Every case must give exactly one message that names the file and the field at fault, exit
non-zero before any expensive work, and leave no output (nor a temp sibling of one) behind.
The parsers behind the catalogue are also fuzzed with Hypothesis: whatever the bytes, they
return parsed rows or raise KtflowInputError, never anything else.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import BIN, REPO, alias_tensor, ktflow_env, rewrite_layout, run_ktflow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ktflow.config import check_config
from ktflow.errors import KtflowInputError
from ktflow.infer.base import requests_from_alpaca
from ktflow.metrics.records import load_predictions
from ktflow.readers.rows import load_rows
from ktflow.readers.safetensors_header import read_header
from ktflow.train.datasets import check_rows

INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00004.safetensors"
FP8_WEIGHT = "model.layers.0.mlp.down_proj.weight"
ALPACA = [
    {"id": f"r{i}", "instruction": "Rewrite.", "input": f"line {i}", "output": f"LINE {i}"} for i in range(4)
]
SFT = {"stage": "sft", "format": "alpaca", "backend": "hf"}


@dataclass(frozen=True)
class Bad:
    """A ktflow invocation on a bad input, and what its one error line must name."""

    argv: list[str]
    file: Path | str
    key: str | None
    outputs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Inputs:
    tmp: Path
    release: Path
    bf16: Path

    def copy_release(self) -> Path:
        return Path(shutil.copytree(self.release, self.tmp / "release"))


CASES: dict[str, Callable[[Inputs], Bad]] = {}


def case(name: str) -> Callable[[Callable[[Inputs], Bad]], Callable[[Inputs], Bad]]:
    def register(build: Callable[[Inputs], Bad]) -> Callable[[Inputs], Bad]:
        CASES[name] = build
        return build

    return register


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def edit_shard(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, change: Callable[[Any], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- checkpoints: `ktflow cast` and `ktflow fetch` ----------------------------------------------


def cast(inputs: Inputs, src: Path, file: Path | str, field_name: str | None) -> Bad:
    out = inputs.tmp / "out" / "bf16"
    return Bad(["cast", str(src), str(out), "--no-progress"], file, field_name, (out,))


@case("checkpoint-corrupt-shard-header")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    data = bytearray((src / SHARD1).read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header's first bytes
    write(src / SHARD1, bytes(data))
    return cast(i, src, src / SHARD1, None)


@case("checkpoint-truncated-shard")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    data = (src / SHARD1).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    write(src / SHARD1, data[:-100])
    return cast(i, src, src / SHARD1, last)


@case("checkpoint-missing-scale")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_shard(src / SHARD1, lambda t: t.pop(FP8_WEIGHT + "_scale_inv"))
    edit_json(src / INDEX, lambda d: d["weight_map"].pop(FP8_WEIGHT + "_scale_inv"))
    return cast(i, src, src / SHARD1, FP8_WEIGHT)


@case("checkpoint-mismatched-scale-shape")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_shard(src / SHARD1, lambda t: t.update({FP8_WEIGHT + "_scale_inv": torch.ones(5, 5)}))
    return cast(i, src, src / SHARD1, FP8_WEIGHT + "_scale_inv")


@case("checkpoint-index-names-missing-file")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_json(src / INDEX, lambda d: d["weight_map"].update({FP8_WEIGHT: "model-00009-of-00009.safetensors"}))
    return cast(i, src, src / INDEX, FP8_WEIGHT)


@case("checkpoint-index-names-absent-tensor")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_json(src / INDEX, lambda d: d["weight_map"].update({"model.layers.9.ghost.weight": SHARD1}))
    return cast(i, src, src / INDEX, "model.layers.9.ghost.weight")


@case("checkpoint-config-not-json")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    write(src / "config.json", "{'model_type': deepseek_v3")
    return cast(i, src, src / "config.json", None)


@case("checkpoint-unknown-quant-method")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_json(src / "config.json", lambda d: d["quantization_config"].update(quant_method="awq"))
    return cast(i, src, src / "config.json", "quantization_config.quant_method")


@case("checkpoint-fetch-index-names-missing-file")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_json(src / INDEX, lambda d: d["weight_map"].update({FP8_WEIGHT: "model-00009-of-00009.safetensors"}))
    out = i.tmp / "out" / "release"
    return Bad(
        ["fetch", str(out), "--source", "local", "--path", str(src)], src / INDEX, "weight_map", (out,)
    )


@case("checkpoint-fetch-config-without-model-type")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_json(src / "config.json", lambda d: d.pop("model_type"))
    out = i.tmp / "out" / "release"
    return Bad(
        ["fetch", str(out), "--source", "local", "--path", str(src)],
        src / "config.json",
        "model_type",
        (out,),
    )


# ---- LoRA adapters: `ktflow convert-lora` ---------------------------------------------------------

LORA_KEY = "base_model.model.model.layers.0.self_attn.o_proj.lora_{}.weight"


def adapter(i: Inputs, rank_in_file: int = 4, config: dict[str, Any] | None = None) -> Path:
    root = i.tmp / "adapter"
    root.mkdir()
    save_file(
        {LORA_KEY.format("A"): torch.zeros(rank_in_file, 64), LORA_KEY.format("B"): torch.zeros(160, 4)},
        str(root / "adapter_model.safetensors"),
    )
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["o_proj"]}
    write(root / "adapter_config.json", config if config is not None else base)
    return root


def convert(i: Inputs, root: Path, file: Path, field_name: str | None) -> Bad:
    out = i.tmp / "out" / "sglang"
    return Bad(["convert-lora", str(root), str(out), "--base-model", str(i.bf16)], file, field_name, (out,))


@case("adapter-config-without-rank")
def _(i: Inputs) -> Bad:
    root = adapter(i, config={"peft_type": "LORA", "lora_alpha": 8})
    return convert(i, root, root / "adapter_config.json", "r")


@case("adapter-matrix-of-another-rank")
def _(i: Inputs) -> Bad:
    root = adapter(i, rank_in_file=6)
    return convert(i, root, root / "adapter_model.safetensors", LORA_KEY.format("A"))


@case("adapter-corrupt-safetensors")
def _(i: Inputs) -> Bad:
    root = adapter(i)
    write(root / "adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return convert(i, root, root / "adapter_model.safetensors", None)


@case("adapter-dora-is-not-servable")
def _(i: Inputs) -> Bad:
    root = adapter(i, config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    return convert(i, root, root / "adapter_config.json", "use_dora")


# ---- datasets: `ktflow train` (checked before LLaMA-Factory starts) and `ktflow prepare-task` -----


def train(i: Inputs, data: Path, field_name: str | None, spec: dict[str, Any] = SFT) -> Bad:
    out, work = i.tmp / "out" / "adapter", i.tmp / "out" / "work"
    argv = ["train", str(i.bf16), str(data), str(out), "--work-dir", str(work), "--spec", json.dumps(spec)]
    return Bad(argv, data, field_name, (out, work))


@case("dataset-missing-column")
def _(i: Inputs) -> Bad:
    rows = [{k: v for k, v in row.items() if k != "output"} for row in ALPACA]
    return train(i, write(i.tmp / "train.json", rows), "row 1.output")


@case("dataset-empty-row")
def _(i: Inputs) -> Bad:
    return train(i, write(i.tmp / "train.json", [*ALPACA[:2], {}, *ALPACA[2:]]), "row 3.instruction")


@case("dataset-wrong-format-for-stage")
def _(i: Inputs) -> Bad:
    spec = {**SFT, "stage": "dpo", "format": "pairwise"}
    return train(i, write(i.tmp / "train.json", ALPACA), "row 1.chosen", spec)


@case("dataset-format-impossible-for-stage")
def _(i: Inputs) -> Bad:
    bad = train(i, write(i.tmp / "train.json", ALPACA), "training.format", {**SFT, "stage": "kto"})
    return Bad(bad.argv, "config", bad.key, bad.outputs)


@case("dataset-kto-tag-not-boolean")
def _(i: Inputs) -> Bad:
    rows = [{**row, "kto_tag": "yes"} for row in ALPACA]
    return train(
        i, write(i.tmp / "train.json", rows), "row 1.kto_tag", {**SFT, "stage": "kto", "format": "kto"}
    )


@case("dataset-invalid-utf8")
def _(i: Inputs) -> Bad:
    data = json.dumps(ALPACA).encode().replace(b"line 2", b"line \xe9")
    return train(i, write(i.tmp / "train.json", data), f"byte {data.index(bytes([0xE9]))}")


@case("dataset-empty-list")
def _(i: Inputs) -> Bad:
    return train(i, write(i.tmp / "train.json", []), None)


@case("dataset-not-a-list")
def _(i: Inputs) -> Bad:
    return train(i, write(i.tmp / "train.json", {"rows": ALPACA}), None)


@case("dataset-invalid-json")
def _(i: Inputs) -> Bad:
    return train(i, write(i.tmp / "train.json", json.dumps(ALPACA)[:-5]), "line 1")


@case("dataset-jsonl-bad-line")
def _(i: Inputs) -> Bad:
    text = jsonl(ALPACA[:1]) + '{"instruction": "x", \n' + jsonl(ALPACA[1:])
    return train(i, write(i.tmp / "train.jsonl", text), "line 2")


@case("dataset-duplicate-ids-at-inference")
def _(i: Inputs) -> Bad:
    test = write(i.tmp / "test.json", [*ALPACA, {**ALPACA[1]}])
    out = i.tmp / "out" / "base.jsonl"
    return Bad(["infer", str(i.bf16), str(test), str(out)], test, "row 5.id", (out,))


@case("dataset-missing-id-at-inference")
def _(i: Inputs) -> Bad:
    test = write(i.tmp / "test.json", [{k: v for k, v in row.items() if k != "id"} for row in ALPACA])
    out = i.tmp / "out" / "base.jsonl"
    return Bad(["infer", str(i.bf16), str(test), str(out)], test, "row 1.id", (out,))


def prepare(i: Inputs, raw: Path, field_name: str | None, adapter_name: str = "nekoqa") -> Bad:
    out = i.tmp / "out" / "data"
    spec = {"source": "raw", "raw_file": str(raw), "adapter": adapter_name, "kind": "generation"}
    return Bad(["prepare-task", str(out), "--spec", json.dumps(spec)], raw, field_name, (out,))


@case("raw-dataset-duplicate-ids")
def _(i: Inputs) -> Bad:
    return prepare(i, write(i.tmp / "raw.json", [*ALPACA, ALPACA[0]]), "row 5.id")


@case("raw-dataset-empty-row")
def _(i: Inputs) -> Bad:
    return prepare(i, write(i.tmp / "raw.json", [ALPACA[0], {"instruction": "", "output": ""}]), "row 2")


@case("raw-dataset-wrong-format-for-adapter")
def _(i: Inputs) -> Bad:
    # Translational-Style rows carry the sentence in `input`; a NekoQA-shaped file has none.
    rows = [{"instruction": row["input"], "output": row["output"]} for row in ALPACA]
    return prepare(i, write(i.tmp / "raw.json", rows), "row 1.input", "translational-style")


@case("raw-dataset-invalid-utf8")
def _(i: Inputs) -> Bad:
    data = jsonl(ALPACA).encode().replace(b"LINE 3", b"LINE \xff")
    return prepare(i, write(i.tmp / "raw.jsonl", data), "line 4")


# ==== issue 13 item 7: one dataset contract (ktflow.datasets.contract), rows numbered from 1 ======
# Every step that reads rows (prepare-task, tiny-tasks, train, infer) runs the same check, so
# one bad row gets the same "row N.<column>" in every step. Stage columns follow the
# dataset_info entry (training.dataset: formatting, ranking, columns, tags).

DPO_SHAREGPT = {
    "ranking": True,
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
}
KTO_SHAREGPT = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}}  # fmt: skip


def turn(role: str, text: str, role_tag: str = "from", content_tag: str = "value") -> dict[str, str]:
    return {role_tag: role, content_tag: text}


def train_from_entry(i: Inputs, rows: Any, field_name: str, stage: str, entry: dict[str, Any]) -> Bad:
    data = write(i.tmp / "train.json", rows)
    return train(
        i, data, field_name, {**SFT, "stage": stage, "format": None, "dataset": {**entry, "file": str(data)}}
    )


@case("contract-integer-output-at-train")
def _(i: Inputs) -> Bad:
    # Before the contract, train passed it and LLaMA-Factory died in pyarrow.
    return train(i, write(i.tmp / "train.json", [ALPACA[0], {**ALPACA[1], "output": 3}]), "row 2.output")


@case("contract-duplicate-ids-at-train")
def _(i: Inputs) -> Bad:
    return train(i, write(i.tmp / "train.json", [*ALPACA, ALPACA[2]]), "row 5.id")


@case("contract-missing-instruction-at-train")
def _(i: Inputs) -> Bad:
    rows = [ALPACA[0], {k: v for k, v in ALPACA[1].items() if k != "instruction"}]
    return train(i, write(i.tmp / "train.json", rows), "row 2.instruction")


@case("contract-missing-instruction-at-inference")
def _(i: Inputs) -> Bad:
    test = write(i.tmp / "test.json", [ALPACA[0], {k: v for k, v in ALPACA[1].items() if k != "instruction"}])
    out = i.tmp / "out" / "base.jsonl"
    return Bad(["infer", str(i.bf16), str(test), str(out)], test, "row 2.instruction", (out,))


@case("contract-integer-output-at-inference")
def _(i: Inputs) -> Bad:
    test = write(i.tmp / "test.json", [ALPACA[0], {**ALPACA[1], "output": 7}])
    out = i.tmp / "out" / "base.jsonl"
    return Bad(["infer", str(i.bf16), str(test), str(out)], test, "row 2.output", (out,))


@case("contract-dpo-chosen-not-a-string")
def _(i: Inputs) -> Bad:
    rows = [{**ALPACA[0], "chosen": ["A"], "rejected": "B"}]
    return train(
        i, write(i.tmp / "train.json", rows), "row 1.chosen", {**SFT, "stage": "dpo", "format": "pairwise"}
    )


@case("contract-kto-label-missing")
def _(i: Inputs) -> Bad:
    rows = [{**ALPACA[0], "kto_tag": True}, {k: v for k, v in ALPACA[1].items()}]
    return train(
        i, write(i.tmp / "train.json", rows), "row 2.kto_tag", {**SFT, "stage": "kto", "format": "kto"}
    )


@case("contract-dpo-sharegpt-rejected-from-the-user")
def _(i: Inputs) -> Bad:
    row = {
        "conversations": [turn("human", "Which?")],
        "chosen": turn("gpt", "A"),
        "rejected": turn("human", "B"),
    }
    return train_from_entry(i, [row], "row 1.rejected.from", "dpo", DPO_SHAREGPT)


@case("contract-dpo-sharegpt-prompt-ends-with-the-answer")
def _(i: Inputs) -> Bad:
    conversation = [turn("human", "Which?"), turn("gpt", "A")]
    row = {"conversations": conversation, "chosen": turn("gpt", "A"), "rejected": turn("gpt", "B")}
    return train_from_entry(i, [row], "row 1.conversations", "dpo", DPO_SHAREGPT)


@case("contract-kto-sharegpt-label-not-boolean")
def _(i: Inputs) -> Bad:
    messages = [turn("user", "Hi", "role", "content"), turn("assistant", "Hello", "role", "content")]
    rows = [{"messages": messages, "label": True}, {"messages": messages, "label": "false"}]
    return train_from_entry(i, rows, "row 2.label", "kto", KTO_SHAREGPT)


@case("contract-kto-sharegpt-turns-out-of-order")
def _(i: Inputs) -> Bad:
    messages = [turn("assistant", "Hello", "role", "content"), turn("user", "Hi", "role", "content")]
    return train_from_entry(
        i, [{"messages": messages, "label": True}], "row 1.messages[0].role", "kto", KTO_SHAREGPT
    )


# issue 13 item 4: a prompt over the model's positions less max_new_tokens, refused before it loads.
@case("prompt-over-the-model-limit")
def _(i: Inputs) -> Bad:
    long_row = {**ALPACA[1], "input": " ".join(["word"] * 3000)}
    test = write(i.tmp / "test.json", [ALPACA[0], long_row])
    out = i.tmp / "out" / "base.jsonl"
    return Bad(["infer", str(i.bf16), str(test), str(out)], test, "row 2.input", (out,))


@pytest.mark.parametrize("step", ["prepare-task", "train", "infer"])
def test_one_bad_row_has_one_number_in_every_step(step: str, inputs: Inputs) -> None:
    """The third row repeats the first's id: every step calls it row 3."""
    data = write(inputs.tmp / "rows.json", [ALPACA[0], ALPACA[1], ALPACA[0], ALPACA[3]])
    out = inputs.tmp / "out"
    spec = json.dumps({"source": "raw", "raw_file": str(data), "adapter": "alpaca", "kind": "generation"})
    argv = {
        "prepare-task": ["prepare-task", str(out), "--spec", spec],
        "train": train(inputs, data, None).argv,
        "infer": ["infer", str(inputs.bf16), str(data), str(out / "p.jsonl")],
    }[step]
    result = run_ktflow(*argv, check=False)
    assert result.returncode == 2 and f"{data}: row 3.id: duplicate id 'r0' (row 1)" in result.stderr, (
        result.stderr
    )


def test_rows_prepare_task_writes_are_rows_train_and_infer_accept(inputs: Inputs) -> None:
    """Translational-Style rows have an empty instruction: prepare-task wrote them, train refused them."""
    raw = write(
        inputs.tmp / "raw.json",
        [{"instruction": "", "input": f"s {n}", "output": f"t {n}"} for n in range(8)],
    )
    out = inputs.tmp / "data"
    spec = {"source": "raw", "raw_file": str(raw), "adapter": "translational-style", "kind": "generation",
            "split": {"method": "head", "train_rows": 6}}  # fmt: skip
    run_ktflow("prepare-task", str(out), "--spec", json.dumps(spec))
    work = inputs.tmp / "work"
    run_ktflow("train", str(inputs.bf16), str(out / "train.json"), str(inputs.tmp / "adapter"),
               "--work-dir", str(work), "--spec", json.dumps(SFT), "--render-only")  # fmt: skip
    assert (work / "llamafactory.yaml").is_file()
    assert [r.id for r in requests_from_alpaca(out / "test.json", load_rows(out / "test.json"))] == [
        "row-00007", "row-00008"]  # fmt: skip


# ==== end of issue 13 item 7 block ===============================================================


# ---- predictions and metrics: `ktflow evaluate`, `ktflow tables` ----------------------------------

PREDICTIONS = [{"id": f"q{n}", "prompt": "Which?", "predict": "A", "label": "B"} for n in range(3)]


def evaluate(i: Inputs, rows: str | bytes, field_name: str | None, task: str = "mcq") -> Bad:
    path = write(i.tmp / "predictions.jsonl", rows)
    out, samples = i.tmp / "out" / "metrics.json", i.tmp / "out" / "metrics.samples.jsonl"
    argv = ["evaluate", str(path), "--task", task, "-o", str(out), "--per-sample", str(samples)]
    return Bad(argv, path, field_name, (out, samples, i.tmp / "out" / "metrics.provenance.json"))


@case("predictions-missing-field")
def _(i: Inputs) -> Bad:
    rows = [PREDICTIONS[0], {k: v for k, v in PREDICTIONS[1].items() if k != "predict"}]
    return evaluate(i, jsonl(rows), "line 2, field 'predict'", "generation")


@case("predictions-empty-file")
def _(i: Inputs) -> Bad:
    return evaluate(i, "", None)


@case("predictions-blank-lines-only")
def _(i: Inputs) -> Bad:
    return evaluate(i, "\n\n  \n", None, "generation")


@case("predictions-torn-last-line")
def _(i: Inputs) -> Bad:
    return evaluate(i, jsonl(PREDICTIONS)[:-9], "line 3")


@case("predictions-label-not-an-option")
def _(i: Inputs) -> Bad:
    return evaluate(i, jsonl([{**PREDICTIONS[0], "label": "maybe"}]), "line 1, field 'label'")


@case("predictions-duplicate-id")
def _(i: Inputs) -> Bad:
    return evaluate(i, jsonl([*PREDICTIONS, PREDICTIONS[0]]), "line 4, field 'id'")


@case("predictions-predict-not-a-string")
def _(i: Inputs) -> Bad:
    return evaluate(i, jsonl([{**PREDICTIONS[0], "predict": 3}]), "line 1, field 'predict'", "generation")


@case("predictions-invalid-utf8")
def _(i: Inputs) -> Bad:
    return evaluate(
        i, jsonl(PREDICTIONS).encode().replace(b'"B"}\n{"id": "q1"', b'"\xc3"}\n{"id": "q1"'), "line 1"
    )


def tables(i: Inputs, metrics: Any, field_name: str | None) -> Bad:
    path = write(i.tmp / "metrics.json", metrics)
    out = i.tmp / "out" / "tables"
    spec = json.dumps({"tasks": {"style": "generation"}})
    return Bad(
        ["tables", f"m:style:base={path}", "--spec", spec, "--out-dir", str(out)], path, field_name, (out,)
    )


@case("metrics-missing-metric")
def _(i: Inputs) -> Bad:
    return tables(i, {"bleu-1": 10.0, "bleu-2": 5.0}, "bleu-3")


@case("metrics-not-json")
def _(i: Inputs) -> Bad:
    return tables(i, '{"bleu-1": 10.0,', "line 1")


@case("metrics-value-not-a-number")
def _(i: Inputs) -> Bad:
    metrics = dict.fromkeys(["bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-1", "rouge-2", "rouge-l"], 1.0)
    return tables(i, {**metrics, "rouge-2": "n/a"}, "rouge-2")


# ---- issue 13 items 1-2: non-finite weights and safetensors layouts the library refuses ----------
# The non-finite cases fail mid-cast (the check rides on the cast's one pass), so what must not be
# left is a published output: the marker, the index, and the bad tensor's shard (or its .partial).

CAST_MARKER_NAME = "cast_complete.json"


def cast_unpublished(inputs: Inputs, src: Path, file: Path, field_name: str, output_shard: str) -> Bad:
    out = inputs.tmp / "out" / "bf16"
    outputs = (out / CAST_MARKER_NAME, out / INDEX, out / output_shard)
    return Bad(["cast", str(src), str(out), "--no-progress"], file, field_name, outputs)


def set_first(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], object]:
    return lambda tensors: tensors[name].view(-1).__setitem__(0, value)


@case("checkpoint-nan-in-fp8-scale")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_shard(src / SHARD1, set_first(FP8_WEIGHT + "_scale_inv", float("nan")))
    return cast_unpublished(i, src, src / SHARD1, FP8_WEIGHT + "_scale_inv", SHARD1)


@case("checkpoint-nan-byte-in-fp8-weight")
def _(i: Inputs) -> Bad:
    src = i.copy_release()

    def nan_byte(tensors: dict[str, torch.Tensor]) -> None:
        tensors[FP8_WEIGHT].view(torch.uint8).view(-1)[7] = 0x7F

    edit_shard(src / SHARD1, nan_byte)
    return cast_unpublished(i, src, src / SHARD1, FP8_WEIGHT, SHARD1)


@case("checkpoint-inf-in-copied-bf16-tensor")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    edit_shard(src / SHARD1, set_first("model.embed_tokens.weight", float("inf")))
    return cast_unpublished(i, src, src / SHARD1, "model.embed_tokens.weight", SHARD1)


UP_SCALE = "model.layers.0.mlp.up_proj.weight_scale_inv"
GATE_SCALE = "model.layers.0.mlp.gate_proj.weight_scale_inv"  # same shape, earlier in the header


def alias_up_onto_gate(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return alias_tensor(header, body, UP_SCALE, GATE_SCALE)


@case("checkpoint-overlapping-data-offsets")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    rewrite_layout(src / SHARD1, alias_up_onto_gate)
    return cast(i, src, src / SHARD1, UP_SCALE)


@case("checkpoint-gap-in-data-section")
def _(i: Inputs) -> Bad:
    src = i.copy_release()

    def gap_before_weight(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        start = header[FP8_WEIGHT]["data_offsets"][0]
        for entry in header.values():
            if "data_offsets" in entry and entry["data_offsets"][0] >= start:
                entry["data_offsets"] = [offset + 8 for offset in entry["data_offsets"]]
        return header, body[:start] + bytes(8) + body[start:]

    rewrite_layout(src / SHARD1, gap_before_weight)
    return cast(i, src, src / SHARD1, FP8_WEIGHT)


@case("checkpoint-metadata-not-strings")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    rewrite_layout(src / SHARD1, lambda header, body: (header | {"__metadata__": {"format": 1}}, body))
    return cast(i, src, src / SHARD1, "__metadata__")


@case("checkpoint-fetch-overlapping-data-offsets")
def _(i: Inputs) -> Bad:
    src = i.copy_release()
    rewrite_layout(src / SHARD1, alias_up_onto_gate)
    out = i.tmp / "out" / "release"
    return Bad(["fetch", str(out), "--source", "local", "--path", str(src)], src / SHARD1, UP_SCALE, (out,))


# ---- outputs under a regular file: one line naming the path (issue 13 item 8) ----------------------


@case("output-under-a-regular-file")
def _(i: Inputs) -> Bad:
    out = write(i.tmp / "taken", "a file, not a directory") / "style"
    return Bad(["tiny-tasks", "style", str(out)], out, None, (out,))


@case("train-work-dir-under-a-regular-file")
def _(i: Inputs) -> Bad:
    data = write(i.tmp / "train.json", ALPACA)
    work = write(i.tmp / "taken", "a file") / "work"
    argv = ["train", str(i.bf16), str(data), str(i.tmp / "adapter"), "--work-dir", str(work)]
    return Bad([*argv, "--spec", json.dumps(SFT)], work, None, (i.tmp / "adapter",))


@pytest.fixture
def inputs(tmp_path: Path, tiny_release: Path, tiny_bf16: Path) -> Inputs:
    return Inputs(tmp_path, tiny_release, tiny_bf16)


def leftovers(paths: tuple[Path, ...]) -> list[Path]:
    """The outputs that exist, and any hidden temp sibling one of them left."""
    found = [p for p in paths if p.exists()]
    for path in paths:
        if path.parent.is_dir():
            found += [s for s in path.parent.iterdir() if s.name.startswith(f".{path.name}.")]
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_message_naming_file_and_field(name: str, inputs: Inputs) -> None:
    bad = CASES[name](inputs)
    result = run_ktflow(*bad.argv, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [
        line for line in result.stderr.splitlines() if line.startswith(f"ktflow {bad.argv[0]}: error: ")
    ]
    assert len(errors) == 1, result.stderr[-3000:]
    where = f"{bad.file}: {bad.key}: " if bad.key else f"{bad.file}: "
    assert where in errors[0], errors[0]
    assert not leftovers(bad.outputs), leftovers(bad.outputs)


# ---- config: `snakemake -n` must stop with one line naming the config file and key -----------------


def unsupported_local_model(workdir: Path) -> dict[str, Any]:
    declared = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    return {"source": "local", "path": str(write(workdir / "llama" / "config.json", declared).parent)}


def file_task(workdir: Path) -> dict[str, Any]:
    write(workdir / "train.json", ALPACA)
    return {"kind": "generation", "source": "file", "train_file": "train.json", "test_file": "no/test.json"}


def dpo_file_task(workdir: Path) -> dict[str, Any]:
    """DPO needs pairwise rows; a task whose own file holds alpaca rows and names no other data has none."""
    write(workdir / "train.json", ALPACA)
    return {
        **file_task(workdir),
        "test_file": "train.json",
        "training": {"stage": "dpo", "format": "pairwise"},
    }


@dataclass(frozen=True)
class ConfigCase:
    """Settings (dotted key -> value, None deletes, a callable builds it in the workdir) and the key named."""

    edits: dict[str, Any]
    key: str
    schema_level: bool = False

    def apply(self, config: dict[str, Any], workdir: Path) -> None:
        for dotted, value in self.edits.items():
            *parents, last = dotted.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(last)
            else:
                node[last] = value(workdir) if callable(value) else copy.deepcopy(value)


CONFIG_CASES = {
    "config-unknown-key": ConfigCase({"training.lora.ranks": 8}, "training.lora.ranks", schema_level=True),
    "config-wrong-type": ConfigCase({"training.epochs": "six"}, "training.epochs", schema_level=True),
    "config-bad-enum": ConfigCase({"inference.backend": "vllm"}, "inference.backend", schema_level=True),
    "config-missing-required": ConfigCase(
        {"models.tiny-v3.source": None}, "models.tiny-v3.source", schema_level=True
    ),
    "config-kt-backend-unsupported-model": ConfigCase(
        {"models.tiny-v3": unsupported_local_model, "training.backend": "kt"}, "models.tiny-v3"
    ),
    "config-missing-dataset-file": ConfigCase({"tasks.style": file_task}, "tasks.style.test_file"),
    "config-undefined-task": ConfigCase({"experiments.tasks": ["style", "essay"]}, "experiments.tasks"),
    "config-task-listed-twice": ConfigCase({"experiments.tasks": ["style", "style"]}, "experiments.tasks"),
    "config-stage-format-mismatch": ConfigCase(
        {"training.stage": "dpo", "training.format": "alpaca"}, "training.format"
    ),
    "config-task-stage-format-mismatch": ConfigCase(
        {"tasks.choice.training": {"stage": "kto", "format": "sharegpt"}}, "tasks.choice.training.format"
    ),
    "config-stage-data-the-task-cannot-give": ConfigCase(
        {"tasks.style": dpo_file_task}, "tasks.style.training.dataset"
    ),
    "config-local-model-missing": ConfigCase(
        {"models.tiny-v3": {"source": "local", "path": "no/such/model"}}, "models.tiny-v3.path"
    ),
    "config-results-outside-workdir": ConfigCase({"results": "../elsewhere"}, "results"),
    "config-llamafactory-output-dir": ConfigCase(
        {"training.llamafactory_args": {"output_dir": "/tmp/anywhere"}},
        "training.llamafactory_args.output_dir",
    ),
    "config-token-in-config": ConfigCase(
        {"tasks.choice.training": {"llamafactory_args": {"hub_token": "secret"}}},
        "tasks.choice.training.llamafactory_args.hub_token",
    ),
}


def config_params() -> list[Any]:
    return list(CONFIG_CASES)


@pytest.mark.parametrize("name", config_params())
def test_bad_config_stops_planning_with_one_line(name: str, workdir: Path) -> None:
    bad = CONFIG_CASES[name]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    bad.apply(config, workdir)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "-n",
               "--cores", "1"]  # fmt: skip
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, env=ktflow_env(), check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    lines = [line for line in output.splitlines() if f"config.yaml: {bad.key}: " in line]
    assert len(lines) == 1, output[-3000:]
    assert not (workdir / "results").exists()


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) + len(CONFIG_CASES) >= 30


# ---- Hypothesis: the parsers never fail with anything but KtflowInputError -------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
row_values = st.dictionaries(
    st.sampled_from(
        ["id", "prompt", "predict", "label", "instruction", "input", "output", "chosen", "rejected"]
    ),
    json_values,
    max_size=6,
)
lines = st.one_of(
    row_values.map(json.dumps),
    st.text(max_size=30),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)


def scratch(name: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(prefix="ktflow-fuzz-")) / name
    path.write_bytes(data)
    return path


def failure(call: Callable[[], Any]) -> tuple[KtflowInputError | None, Any]:
    """(the input error, None) or (None, the result): any other exception fails the test."""
    try:
        return None, call()
    except KtflowInputError as error:
        return error, None


@FUZZ
@given(st.lists(lines, max_size=5), st.sampled_from(["generation", "mcq"]), st.booleans())
def test_predictions_parser_accepts_or_names_the_file(rows: list[str], task: str, latin1: bool) -> None:
    text = "\n".join(rows)
    path = scratch(
        "p.jsonl", text.encode("latin-1", "replace") if latin1 else text.encode("utf-8", "replace")
    )
    error, parsed = failure(lambda: load_predictions(path, task=task))
    shutil.rmtree(path.parent)
    if error is not None:
        assert error.path == str(path)
    else:
        assert parsed and all({"id", "prompt", "predict", "label"} <= set(row) for row in parsed)


dataset_texts = st.one_of(
    st.lists(row_values, max_size=4).map(json.dumps), st.lists(lines, max_size=4).map("\n".join)
)


@FUZZ
@given(dataset_texts, st.sampled_from(["alpaca", "sharegpt", "pairwise", "kto"]), st.booleans())
def test_dataset_parsers_accept_or_name_the_file(text: str, data_format: str, jsonl_file: bool) -> None:
    path = scratch("train.jsonl" if jsonl_file else "train.json", text.encode("utf-8", "replace"))

    def parse() -> Any:
        rows = load_rows(path)
        check_rows(path, rows, data_format)
        return requests_from_alpaca(path, rows)

    error, _ = failure(parse)
    shutil.rmtree(path.parent)
    assert error is None or error.path == str(path)


header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "Q4", 7]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 64), max_size=3),
    }
)


@FUZZ
@given(
    st.dictionaries(st.text(min_size=1, max_size=6), header_entries, max_size=3),
    st.integers(0, 80),
    st.integers(-2, 2),
)
def test_safetensors_header_parser_accepts_or_names_the_file(
    header: dict[str, Any], body: int, skew: int
) -> None:
    raw = json.dumps(header).encode()
    path = scratch("s.safetensors", struct.pack("<Q", max(len(raw) + skew, 0)) + raw + bytes(body))
    size = path.stat().st_size
    error, slots = failure(lambda: read_header(path))
    if error is None:  # at least as strict as the safetensors library: what ktflow accepts, it opens
        with safe_open(path, "pt") as handle:
            assert set(handle.keys()) == set(slots)
    shutil.rmtree(path.parent)
    if error is not None:
        assert error.path == str(path)
    else:
        assert all(slot.end <= size for slot in slots.values())


CONFIG_KEYS = ["results", "seed", "models", "tasks", "experiments", "training", "inference", "evaluation"]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.text(max_size=6), json_values), max_size=3))
def test_config_check_accepts_or_names_a_key(edits: list[tuple[str, str, Any]]) -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for block, key, value in edits:
        if key and isinstance(config.get(block), dict):
            config[block][key] = value
        else:
            config[block] = value
    error, _ = failure(lambda: check_config(config, "config.yaml", schema=SCHEMA))
    assert error is None or (error.path == "config.yaml" and error.field)


# ---- issue 13.8 (trainer session): config files read strictly, errors blamed on the right layer --


def plan_workflow(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-n", "--cores", "1", *args]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=ktflow_env(), check=False)


def config_error(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("ktflow: invalid config: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_yaml_syntax_error_names_file_and_line(workdir: Path) -> None:
    text = (workdir / "config.yaml").read_text().replace("seed: 42", "seed: [42")
    (workdir / "config" / "config.yaml").parent.mkdir()
    (workdir / "config" / "config.yaml").write_text(text)  # the Snakefile's default config file
    line = config_error(plan_workflow(workdir))
    assert "config/config.yaml: line " in line and "not valid YAML" in line, line
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("block", ["models", "tasks"])
def test_duplicate_key_names_file_line_and_key(block: str, workdir: Path) -> None:
    config = (workdir / "config.yaml").read_text()
    lines = config.splitlines()
    start = lines.index(f"{block}:")
    body = []  # the first entry: its name line, then its indented lines
    for x in lines[start + 2 :]:
        if not x.startswith("    "):
            break
        body.append(x)
    twice = [lines[start + 1], *body]
    edited = [*lines[: start + 1], *twice, *lines[start + 1 :]]
    (workdir / "config.yaml").write_text("\n".join(edited) + "\n")
    name = lines[start + 1].strip().rstrip(":")
    line = config_error(plan_workflow(workdir, "--configfile", "config.yaml"))
    second = start + 2 + len(twice)
    assert f"config.yaml: line {second}: key {name!r} is given twice (first on line {start + 2})" in line, (
        line
    )


def test_error_in_an_added_configfile_is_blamed_on_it(workdir: Path) -> None:
    (workdir / "config").mkdir()
    shutil.copy(workdir / "config.yaml", workdir / "config" / "config.yaml")
    write(workdir / "overlay.yaml", "training:\n  epochs: six\n")
    line = config_error(plan_workflow(workdir, "--configfile", "overlay.yaml"))
    assert "overlay.yaml: training.epochs: " in line, line


def test_nested_config_on_the_command_line_keeps_its_types(workdir: Path) -> None:
    result = plan_workflow(workdir, "--configfile", "config.yaml", "--config", "training={lora: {rank: 4}}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    from ktflow.config_layers import layers, merged

    found = layers(
        workdir / "no-default.yaml", [workdir / "config.yaml"], {"training": {"lora": {"rank": "4"}}}
    )
    lora = merged(found)["training"]["lora"]
    assert lora["rank"] == 4 and lora["alpha"] == 32, lora  # typed, and merged into the file's block


def test_strict_loader_keeps_yaml_merge_keys(tmp_path: Path) -> None:
    from ktflow.config_layers import load_yaml

    path = write(tmp_path / "c.yaml", "base: &b {rank: 8, alpha: 16}\nrun:\n  <<: *b\n  alpha: 32\n")
    assert load_yaml(path)["run"] == {"rank": 8, "alpha": 32}  # an override of a merged key is no duplicate

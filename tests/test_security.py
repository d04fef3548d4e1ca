"""Security: the hub token never reaches a file, remote code and pickles stay off, writes stay in results/.

- A real run with a sentinel ``HF_TOKEN`` in its environment leaves it in no file of the
  working directory (results, logs, benchmarks, ``.snakemake`` metadata), not even base64-coded.
- ``trust_remote_code`` is off unless a model turns it on, and the run says so on stderr.
- Weights load only from safetensors: pickled weights built to run a command when unpickled
  are refused with a message by every step that loads weights, and the command never runs.
- Config paths and pass-through keys cannot make a step write outside the results directory.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BIN, REPO, ktflow_env, run_ktflow
from test_determinism import SENTINEL_TOKEN, clean_run, snakemake, write_reduced_config

from ktflow.config import REFUSED_LLAMAFACTORY_KEYS, check_config
from ktflow.errors import KtflowInputError

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


# ---- the hub token --------------------------------------------------------------------------------


def token_forms(token: str) -> list[bytes]:
    """The token as bytes, and base64-coded at each of the three byte alignments (as in metadata)."""
    raw = token.encode()
    forms = [raw]
    for shift in range(3):
        coded = base64.b64encode(b"\0" * shift + raw)[
            4:-4
        ]  # drop edges whose characters depend on neighbours
        forms.append(coded)
    return forms


@pytest.mark.slow
def test_sentinel_token_appears_in_no_file_of_a_real_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = clean_run(tmp_path_factory, 0)
    scanned, hits = 0, []
    forms = token_forms(SENTINEL_TOKEN)
    for path in workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            scanned += 1
            hits += [str(path) for form in forms if form in data]
    assert scanned > 50 and (workdir / ".snakemake").is_dir() and (workdir / "results" / "logs").is_dir()
    assert hits == []


def test_a_token_in_the_config_is_refused_before_it_reaches_params(workdir: Path) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["models"]["tiny-v3"]["display_name"] = "hf_" + "A1b2" * 9
    with pytest.raises(KtflowInputError, match="HF_TOKEN") as caught:
        check_config(config, "config.yaml", SCHEMA)
    assert caught.value.field == "models.tiny-v3.display_name"


# ---- trust_remote_code ----------------------------------------------------------------------------


def planned_specs(workdir: Path, step: str) -> tuple[list[dict[str, Any]], str]:
    """The --spec of every planned `ktflow <step>`, and Snakemake's stderr."""
    result = snakemake(workdir, "-n", "-p")
    specs = []
    for line in result.stdout.splitlines():
        if line.startswith(f"Shell command: ktflow {step} "):
            words = shlex.split(line.removeprefix("Shell command: "))
            specs.append(json.loads(words[words.index("--spec") + 1]))
    assert specs, result.stdout[-2000:]
    return specs, result.stderr


def test_remote_code_is_off_by_default_and_nothing_is_announced(tmp_path: Path) -> None:
    write_reduced_config(tmp_path)
    for step in ("infer", "train"):
        specs, stderr = planned_specs(tmp_path, step)
        assert all(spec.get("trust_remote_code", False) is False for spec in specs)
        assert "trust_remote_code is ON" not in stderr


def test_turning_remote_code_on_for_a_model_is_announced(tmp_path: Path) -> None:
    write_reduced_config(tmp_path, models={"tiny-v3": {"trust_remote_code": True}})
    specs, stderr = planned_specs(tmp_path, "infer")
    assert all(spec["trust_remote_code"] is True for spec in specs)
    assert [line for line in stderr.splitlines() if "trust_remote_code is ON for model 'tiny-v3'" in line]


def test_turning_remote_code_on_reaches_training(tmp_path: Path) -> None:
    write_reduced_config(tmp_path, models={"tiny-v3": {"trust_remote_code": True}})
    specs, _ = planned_specs(tmp_path, "train")
    assert all(spec.get("trust_remote_code") is True for spec in specs)


def test_checkpoint_code_does_not_run_when_remote_code_is_off(tmp_path: Path, tiny_bf16: Path) -> None:
    """A checkpoint whose auto_map names its own module: with the switch off none of that code runs."""
    model = Path(shutil.copytree(tiny_bf16, tmp_path / "model"))
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (model / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"id": "a", "instruction": "Say hi.", "input": "", "output": "hi"}]))
    spec = json.dumps({"backend": "hf", "max_new_tokens": 2, "trust_remote_code": False})
    result = run_ktflow(
        "infer", str(model), str(test), str(tmp_path / "out.jsonl"), "--spec", spec, check=False
    )
    assert not marker.exists()
    assert result.returncode in (0, 2), result.stderr[-3000:]


# ---- pickle: refused with a message, never unpickled -----------------------------------------------


class _RunsACommand:
    """Unpickling this runs ``touch <marker>``: what a hostile .bin checkpoint can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_RunsACommand(marker), protocol=2))
    return path


def pickled_model(tmp_path: Path, tiny_bf16: Path) -> tuple[Path, Path, Path]:
    """(model dir whose weights are only a hostile pytorch_model.bin, that file, the marker)."""
    model = tmp_path / "pickled-model"
    shutil.copytree(tiny_bf16, model, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    marker = tmp_path / "unpickled"
    return model, hostile_pickle(model / "pytorch_model.bin", marker), marker


def assert_refused(result: subprocess.CompletedProcess[str], step: str, named: Path, marker: Path) -> None:
    assert not marker.exists(), "the pickle was loaded"
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"ktflow {step}: error: ")]
    assert len(errors) == 1 and str(named) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_fetch_refuses_pickled_weights(tmp_path: Path, tiny_bf16: Path) -> None:
    model, weights, marker = pickled_model(tmp_path, tiny_bf16)
    shutil.copytree(
        tiny_bf16, model, dirs_exist_ok=True
    )  # safetensors present too: the .bin is still refused
    result = run_ktflow(
        "fetch", str(tmp_path / "out"), "--source", "local", "--path", str(model), check=False
    )
    assert_refused(result, "fetch", weights, marker)
    assert not (tmp_path / "out").exists()


def test_convert_lora_refuses_a_pickled_adapter(tmp_path: Path, tiny_bf16: Path) -> None:
    adapter = tmp_path / "adapter"
    marker = tmp_path / "unpickled"
    hostile_pickle(adapter / "adapter_model.bin", marker)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    out = tmp_path / "sglang"
    result = run_ktflow("convert-lora", str(adapter), str(out), "--base-model", str(tiny_bf16), check=False)
    assert_refused(result, "convert-lora", adapter / "adapter_model.safetensors", marker)
    assert not out.exists()


def test_cast_refuses_a_release_without_safetensors(tmp_path: Path, tiny_bf16: Path) -> None:
    model, _, marker = pickled_model(tmp_path, tiny_bf16)
    result = run_ktflow("cast", str(model), str(tmp_path / "bf16"), "--no-progress", check=False)
    assert_refused(result, "cast", model, marker)
    assert not (tmp_path / "bf16").exists()


def test_infer_refuses_a_pickled_model(tmp_path: Path, tiny_bf16: Path) -> None:
    model, weights, marker = pickled_model(tmp_path, tiny_bf16)
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"id": "a", "instruction": "Say hi.", "input": "", "output": "hi"}]))
    result = run_ktflow("infer", str(model), str(test), str(tmp_path / "out.jsonl"), check=False)
    assert_refused(result, "infer", weights, marker)


def test_infer_refuses_a_pickled_adapter(tmp_path: Path, tiny_bf16: Path) -> None:
    adapter = tmp_path / "adapter"
    marker = tmp_path / "unpickled"
    weights = hostile_pickle(adapter / "adapter_model.bin", marker)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["o_proj"]})
    )
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"id": "a", "instruction": "Say hi.", "input": "", "output": "hi"}]))
    out = tmp_path / "out.jsonl"
    result = run_ktflow("infer", str(tiny_bf16), str(test), str(out), "--adapter", str(adapter), check=False)
    assert_refused(result, "infer", weights.with_name("adapter_model.safetensors"), marker)


def test_train_refuses_a_pickled_model_before_llamafactory_starts(tmp_path: Path, tiny_bf16: Path) -> None:
    model, weights, marker = pickled_model(tmp_path, tiny_bf16)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 4))
    spec = json.dumps({"stage": "sft", "format": "alpaca", "backend": "hf", "epochs": 1})
    out, work = tmp_path / "adapter", tmp_path / "work"
    result = run_ktflow(
        "train", str(model), str(data), str(out), "--work-dir", str(work), "--spec", spec, check=False
    )
    assert_refused(result, "train", weights, marker)
    assert not out.exists()


# ---- writes stay under the results directory -------------------------------------------------------


def test_every_planned_output_and_log_lies_under_results(tmp_path: Path) -> None:
    write_reduced_config(tmp_path, results="out/run-1")
    summary = snakemake(tmp_path, "--detailed-summary").stdout.splitlines()
    header, rows = summary[0].split("\t"), [line.split("\t") for line in summary[1:] if line.strip()]
    assert len(rows) > 20
    for row in rows:
        record = dict(zip(header, row, strict=True))
        for path in [record["output_file"], *record["log-file(s)"].split(",")]:
            assert path == "-" or path.startswith("out/run-1/"), record
    plan = snakemake(tmp_path, "-n", "-p").stdout
    work_dirs = [shlex.split(line)[shlex.split(line).index("--work-dir") + 1] for line in plan.splitlines()
                 if line.startswith("Shell command: ktflow train ")]  # fmt: skip
    assert work_dirs and all(path.startswith("out/run-1/") for path in work_dirs)


@pytest.mark.parametrize("results", ["/tmp/elsewhere", "../elsewhere", "out/../../elsewhere"])
def test_results_directory_must_stay_inside_the_working_directory(workdir: Path, results: str) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["results"] = results
    with pytest.raises(KtflowInputError) as caught:
        check_config(config, "config.yaml", SCHEMA)
    assert caught.value.field == "results"


@pytest.mark.parametrize("key", sorted(REFUSED_LLAMAFACTORY_KEYS))
def test_llamafactory_passthrough_cannot_redirect_writes_or_publish(workdir: Path, key: str) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["tasks"]["style"]["training"] = {
        "llamafactory_args": {key: "/tmp/elsewhere" if key != "push_to_hub" else True}
    }
    if key == "save_safetensors":
        config["tasks"]["style"]["training"]["llamafactory_args"][key] = False
    with pytest.raises(KtflowInputError) as caught:
        check_config(config, "config.yaml", SCHEMA)
    assert caught.value.field == f"tasks.style.training.llamafactory_args.{key}"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_model_and_task_names_cannot_be_paths(workdir: Path, name: str) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["tasks"][name] = config["tasks"].pop("style")
    config["experiments"]["tasks"] = [name, "choice"]
    with pytest.raises(KtflowInputError) as caught:
        check_config(config, "config.yaml", SCHEMA)
    assert caught.value.field == "tasks"


def test_trust_remote_code_cannot_be_smuggled_through_llamafactory_args(workdir: Path) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["training"]["llamafactory_args"] = {"trust_remote_code": True}
    with pytest.raises(KtflowInputError, match="trust_remote_code") as caught:
        check_config(config, "config.yaml", SCHEMA)
    assert caught.value.field == "training.llamafactory_args.trust_remote_code"


def test_planning_writes_nothing(tmp_path: Path) -> None:
    write_reduced_config(tmp_path)
    command = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml", "-n"]
    subprocess.run(command, cwd=tmp_path, env=ktflow_env(), check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["config.yaml"], [".snakemake", "config.yaml"])

"""Training: YAML rendering per backend and KT generation (checked against the upstream parsers'
accepted keys), training-data checks, the training environment, and the metrics gathering."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run_ktflow
from support.upstream import SourceSet, frozenset_literal, read_members, train_keys

from ktflow.errors import KtflowInputError
from ktflow.host.packages import PACKAGES
from ktflow.host.python_env import EnvReport, inspect_env, resolve_python
from ktflow.host.report import collect_host
from ktflow.readers.rows import load_rows
from ktflow.train.backends import BACKENDS, backend_for
from ktflow.train.backends.kt import CONFIG_KEYS, accelerate_config, resolve_generation
from ktflow.train.datasets import check_rows, dataset_entry
from ktflow.train.interpreter import python_for
from ktflow.train.launch import gpu_peak_record
from ktflow.train.preflight import check_backend
from ktflow.train.spec import TrainSpec
from ktflow.train.stages import STAGE_FORMATS
from ktflow.train.train_metrics import gpu_metrics

SPEC = {
    "stage": "sft",
    "backend": "hf",
    "lora": {"rank": 8, "alpha": 16, "target": "all"},
    "learning_rate": 5e-3,
    "epochs": 2,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "cutoff_len": 128,
    "warmup_ratio": 0.0,
    "logging_steps": 2,
    "save_steps": 4,
}
# Every ktflow KT key, for both generations at once: one block must map to either.
KT_BLOCK = {
    "num_threads": 96, "backend": "AMXBF16", "expert_weight_format": "bf16", "tp_enabled": True,
    "threadpool_count": 2, "max_cache_depth": 2, "share_backward_bb": True, "cpu_activation": "retain",
    "non_expert_weight_path": "/w/ne", "use_lora_experts": True, "lora_expert_num": 2,
    "lora_expert_intermediate_size": 64, "optimize_rule": "DeepSeek-V3-Chat-sft-amx.yaml", "chunk_size": 4096,
}  # fmt: skip
HERE = inspect_env(None, PACKAGES)
CPU_ONLY = dataclasses.replace(HERE, gpus=[])
TWO_GPUS = dataclasses.replace(HERE, gpus=[("H100", 80 << 30), ("H100", 80 << 30)])


def spec_for(tmp: Path, **overrides: Any) -> TrainSpec:
    return TrainSpec.from_config(
        {**SPEC, **overrides}, model_dir=tmp / "m", dataset_dir=tmp / "d", dataset="x", output_dir=tmp / "o"
    )


def with_lf(env: EnvReport, version: str) -> EnvReport:
    return dataclasses.replace(
        env, packages={**env.packages, "llamafactory": version, "llamafactory-kt": None}
    )


def test_hf_render_maps_config_and_passes_unknown_keys_through(tmp_path: Path) -> None:
    rendered = backend_for("hf").render(
        spec_for(tmp_path, llamafactory_args={"neftune_noise_alpha": 5, "seed": 7}), CPU_ONLY
    )
    assert rendered["lora_rank"] == 8 and rendered["lora_alpha"] == 16
    assert rendered["stage"] == "sft" and rendered["finetuning_type"] == "lora"
    assert rendered["neftune_noise_alpha"] == 5
    assert rendered["seed"] == 7  # passthrough wins
    assert rendered["use_cpu"] is True  # no CUDA in this environment
    assert "use_cpu" not in backend_for("hf").render(spec_for(tmp_path), TWO_GPUS)


@pytest.mark.parametrize(
    ("stage", "fmt", "error"),
    [
        ("dpo", None, None),
        ("kto", None, None),
        ("dpo", "alpaca", "stage dpo needs data in"),
        ("rm", None, "stage"),
    ],
)
def test_stage_picks_its_format(tmp_path: Path, stage: str, fmt: str | None, error: str | None) -> None:
    overrides = {"stage": stage, **({"format": fmt} if fmt else {})}
    if error:
        with pytest.raises(KtflowInputError, match=error):
            spec_for(tmp_path, **overrides)
        return
    spec = spec_for(tmp_path, **overrides)
    assert spec.data_format == {"dpo": "pairwise", "kto": "kto"}[stage]
    assert backend_for("hf").render(spec, CPU_ONLY)["pref_beta"] == 0.1


def test_unknown_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(KtflowInputError) as caught:
        spec_for(tmp_path, lora_rnak=8)
    assert caught.value.field == "training.lora_rnak"
    with pytest.raises(KtflowInputError) as caught:
        backend_for("kt").render(spec_for(tmp_path, backend="kt", kt={"num_thread": 8}), HERE)
    assert caught.value.field == "training.kt.num_thread"


def lf_parser_keys() -> set[str]:
    from ktflow.lf_launch import import_llamafactory

    import_llamafactory()
    from llamafactory.hparams.parser import _TRAIN_ARGS

    return {f.name for cls in _TRAIN_ARGS for f in dataclasses.fields(cls) if f.init}


def test_hf_yaml_parses_with_llamafactory_on_this_host(tmp_path: Path) -> None:
    lf_parser_keys()
    from llamafactory.hparams.parser import _parse_train_args

    _, _, training_args, finetuning_args, _ = _parse_train_args(
        backend_for("hf").render(spec_for(tmp_path), HERE)
    )
    assert finetuning_args.lora_rank == 8 and training_args.use_cpu


@pytest.mark.parametrize("backend", ["hf", "unsloth", "kt"])
def test_rendered_keys_are_accepted_by_the_installed_llamafactory(tmp_path: Path, backend: str) -> None:
    # LLaMA-Factory's parser rejects unknown keys ("Some keys are not used"); check the set.
    # (kt with no settings renders only LLaMA-Factory 0.9.5's own KT keys: use_kt, kt_*_path.)
    rendered = backend_for(backend).render(spec_for(tmp_path, backend=backend), with_lf(HERE, "0.9.5"))
    assert set(rendered) - lf_parser_keys() == set()


def test_ast_reader_agrees_with_the_installed_parser() -> None:
    """The wheel reader, pointed at this site-packages, finds exactly the parser's real key set."""
    import llamafactory

    site = Path(llamafactory.__file__).parents[1]
    assert train_keys(site, site) == lf_parser_keys()


# ---------------------------------------------------------------- upstream wheels (not installed)
WHEELS = {
    "lf094": "llamafactory==0.9.4",
    "tf457": "transformers==4.57.1",  # the newest LLaMA-Factory 0.9.4 allows
    "lfkt": "llamafactory-kt==0.9.6.dev0",  # what ktransformers[sft]==0.7.2 pins
    "tfkt": "transformers-kt==5.6.0.post6",
    "ktk": "kt-kernel==0.7.2",
}


@pytest.fixture(scope="module")
def wheels(pytestconfig: pytest.Config) -> dict[str, Path]:
    """The upstream wheels, downloaded once into pytest's cache (they are read, never installed)."""
    root = Path(pytestconfig.cache.mkdir("upstream-wheels"))
    found = {}
    for key, requirement in WHEELS.items():
        folder = root / key
        if not any(folder.glob("*.whl")):
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(folder)],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.skip(f"cannot download {requirement} from the package index: {done.stderr[-300:]}")
        found[key] = next(folder.glob("*.whl"))
    return found


def kt_config_fields(wheels: dict[str, Path]) -> set[str]:
    """kt-kernel's KTConfig fields that LLaMA-Factory-KT leaves to the user (not derived)."""
    sources = read_members(wheels["ktk"], ["kt_kernel/sft/config.py"])
    fields = SourceSet(sources).class_fields("kt_kernel", "KTConfig")
    model_args = read_members(wheels["lfkt"], ["llamafactory/hparams/model_args.py"])
    derived = frozenset_literal(next(iter(model_args.values())), "KTransformersArguments", "_KT_DERIVED_KEYS")
    return fields - derived


def test_current_kt_yaml_is_accepted_by_llamafactory_kt(tmp_path: Path, wheels: dict[str, Path]) -> None:
    accepted = train_keys(wheels["lfkt"], wheels["tfkt"])
    env = dataclasses.replace(HERE, packages={**HERE.packages, "llamafactory-kt": "0.9.6.dev0"})
    spec = spec_for(tmp_path, backend="kt", kt=KT_BLOCK)
    rendered = backend_for("kt").render(spec, env)
    assert rendered["use_kt"] is True and "kt_optimize_rule" not in rendered
    assert set(rendered) - accepted == set()
    assert set(rendered["kt_config"]) <= kt_config_fields(wheels)
    assert {f"kt_{key}" for key in CONFIG_KEYS} <= kt_config_fields(wheels)
    assert rendered["kt_config"]["kt_num_threads"] == 96 and rendered["kt_cpu_activation"] == "retain"
    # Upstream LLaMA-Factory 0.9.5 with transformers-kt takes the same YAML minus the fork's two keys.
    import llamafactory

    upstream = train_keys(Path(llamafactory.__file__).parents[1], wheels["tfkt"])
    assert set(rendered) - upstream == {"kt_cpu_activation", "kt_non_expert_weight_path"}
    assert "kt_config" in upstream


def test_legacy_kt_yaml_is_accepted_by_llamafactory_094_only(tmp_path: Path, wheels: dict[str, Path]) -> None:
    legacy_keys = train_keys(wheels["lf094"], wheels["tf457"])
    spec = spec_for(tmp_path, backend="kt", kt={**KT_BLOCK, "generation": "auto"})
    rendered = backend_for("kt").render(spec, with_lf(HERE, "0.9.4"))  # auto: the installed LF decides
    assert rendered["kt_optimize_rule"] == "DeepSeek-V3-Chat-sft-amx.yaml"
    assert (rendered["cpu_infer"], rendered["chunk_size"]) == (96, 4096)  # num_threads is cpu_infer here
    assert "kt_config" not in rendered
    assert set(rendered) - legacy_keys == set()
    # The current parsers reject the legacy keys, and 0.9.4 rejects the current ones: hence two generations.
    assert {"kt_optimize_rule", "cpu_infer", "chunk_size"} - train_keys(wheels["lfkt"], wheels["tfkt"]) == {
        "kt_optimize_rule", "cpu_infer", "chunk_size"
    }  # fmt: skip
    assert "kt_config" not in legacy_keys and "kt_expert_checkpoint_path" not in legacy_keys


@pytest.mark.parametrize(
    ("requested", "packages", "expected"),
    [
        (None, {"llamafactory": "0.9.4"}, "legacy"),
        ("auto", {"llamafactory": "0.9.5"}, "current"),
        (None, {"llamafactory-kt": "0.9.6.dev0"}, "current"),
        (None, {}, "current"),  # nothing installed: render the current YAML, doctor says what is missing
        ("legacy", {"llamafactory": "0.9.5"}, "legacy"),
        ("current", {"llamafactory": "0.9.4"}, "current"),
    ],
)
def test_generation_follows_the_installed_llamafactory_or_the_key(
    requested: str | None, packages: dict[str, str | None], expected: str
) -> None:
    assert resolve_generation(requested, packages) == expected


def test_generations_launch_differently(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, backend="kt", kt=KT_BLOCK)
    kt = backend_for("kt")
    yaml_path = tmp_path / "llamafactory.yaml"
    current = kt.command(spec, TWO_GPUS, yaml_path)
    assert current[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tmp_path / "accelerate_kt.yaml"),
    ]
    assert current[-4:] == ["-m", "ktflow.train.launch", "train", str(yaml_path)]
    assert kt.environment(spec, TWO_GPUS)["ACCELERATE_USE_KT"] == "true"
    legacy_env = with_lf(TWO_GPUS, "0.9.4")
    assert kt.command(spec, legacy_env, yaml_path)[1:] == [
        "-m",
        "ktflow.train.launch",
        "train",
        str(yaml_path),
    ]
    assert kt.environment(spec, legacy_env)["USE_KT"] == "1" and kt.label(spec, legacy_env) == "kt-legacy"
    assert kt.extra_files(spec, legacy_env) == {}
    with pytest.raises(KtflowInputError, match="optimize rule"):
        kt.render(spec_for(tmp_path, backend="kt-legacy"), HERE)


def test_kt_accelerate_config_loads_in_accelerate(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    files = backend_for("kt").extra_files(spec_for(tmp_path, backend="kt"), TWO_GPUS)
    path = tmp_path / "accelerate_kt.yaml"
    path.write_text(yaml.safe_dump(files["accelerate_kt.yaml"]))
    loaded = ClusterConfig.from_yaml_file(path)  # raises on keys accelerate does not know
    assert loaded.distributed_type == "FSDP" and loaded.num_processes == 2
    assert loaded.fsdp_config["fsdp_version"] == 2
    assert accelerate_config(1)["num_processes"] == 1
    own = spec_for(tmp_path, backend="kt", kt={"accelerate_config": "/site/fsdp2_kt.yaml"})
    assert backend_for("kt").extra_files(own, TWO_GPUS) == {}
    assert "/site/fsdp2_kt.yaml" in backend_for("kt").command(own, TWO_GPUS, path)


def test_hf_uses_torchrun_over_several_gpus_and_unsloth_one(tmp_path: Path) -> None:
    hf = backend_for("hf").command(spec_for(tmp_path), TWO_GPUS, tmp_path / "x.yaml")
    assert hf[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    unsloth = spec_for(tmp_path, backend="unsloth")
    assert backend_for("unsloth").render(unsloth, TWO_GPUS)["use_unsloth"] is True
    assert backend_for("unsloth").environment(unsloth, TWO_GPUS) == {"CUDA_VISIBLE_DEVICES": "0"}


# ---------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("rows", "fmt", "field"),
    [
        ([{"instruction": "a"}], "alpaca", "row 1.output"),
        ([{"instruction": "a", "output": ""}], "alpaca", "row 1.output"),
        ([{"instruction": "a", "chosen": "x"}], "pairwise", "row 1.rejected"),
        ([{"instruction": "a", "output": "b", "kto_tag": "yes"}], "kto", "row 1.kto_tag"),
        ([{"conversations": []}], "sharegpt", "row 1.conversations"),
        (["not an object"], "alpaca", "row 1"),
    ],
)
def test_bad_rows_name_the_row_and_field(rows: list[Any], fmt: str, field: str) -> None:
    with pytest.raises(KtflowInputError) as error:
        check_rows(Path("train.json"), rows, fmt)
    assert error.value.field == field and error.value.path == "train.json"


def test_load_rows_rejects_invalid_utf8_and_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(KtflowInputError, match="UTF-8"):
        load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KtflowInputError, match="empty"):
        load_rows(empty)


def test_dataset_entries_for_files_hub_sets_and_own_columns(tmp_path: Path) -> None:
    assert dataset_entry(str(tmp_path / "p.json"), "pairwise")["ranking"] is True
    kto_mix = {"formatting": "sharegpt", "columns": {"messages": "completion", "kto_tag": "label"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant"}, "split": "train"}  # fmt: skip
    entry = dataset_entry("hf:argilla/kto-mix-15k", "kto", kto_mix)
    assert entry["hf_hub_url"] == "argilla/kto-mix-15k" and "file_name" not in entry
    assert entry["columns"] == kto_mix["columns"] and entry["tags"]["role_tag"] == "role"
    rows = [
        {
            "completion": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": True,
        }
    ]
    check_rows(Path("mix.jsonl"), rows, "kto", entry)
    with pytest.raises(KtflowInputError) as caught:
        check_rows(Path("mix.jsonl"), [{"completion": rows[0]["completion"], "label": 1}], "kto", entry)
    assert caught.value.field == "row 1.label"
    with pytest.raises(KtflowInputError, match="needs a column for 'kto_tag'"):
        check_rows(
            Path("x"),
            rows,
            "kto",
            dataset_entry("x.json", "kto", {"columns": {"prompt": "q", "response": "a"}}),
        )
    with pytest.raises(KtflowInputError) as caught:
        dataset_entry("x.json", "alpaca", {"revision": "main"})
    assert caught.value.field == "training.dataset.revision"


def test_stage_format_mismatch_fails_before_training(
    tiny_bf16: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    train = str(tiny_tasks / "style" / "train.json")
    for spec, message in (
        ({**SPEC, "stage": "dpo", "format": "alpaca"}, "stage dpo needs data in"),
        ({**SPEC, "stage": "dpo"}, "row 1.chosen: missing (format pairwise)"),
        ({**SPEC, "dataset": {"file": "other.json"}}, "training.dataset: names 'other.json'"),
    ):
        result = run_ktflow(
            "train", str(tiny_bf16), train, str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
            "--spec", json.dumps(spec), check=False,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_render_only_writes_the_yaml_and_dataset_info(tiny_bf16: Path, tmp_path: Path) -> None:
    spec = {**SPEC, "stage": "kto", "backend": "kt", "kt": {"num_threads": 4}}
    run_ktflow(
        "train", str(tiny_bf16), "hf:argilla/kto-mix-15k", str(tmp_path / "out"),
        "--work-dir", str(tmp_path / "w"), "--dataset-name", "mix", "--spec", json.dumps(spec),
        "--render-only",
    )  # fmt: skip
    rendered = yaml.safe_load((tmp_path / "w" / "llamafactory.yaml").read_text())
    assert (
        rendered["stage"] == "kto" and rendered["use_kt"] and rendered["kt_config"] == {"kt_num_threads": 4}
    )
    assert rendered["kt_expert_checkpoint_path"] == str(tiny_bf16.resolve())
    info = json.loads((tmp_path / "w" / "data" / "dataset_info.json").read_text())
    assert info["mix"]["hf_hub_url"] == "argilla/kto-mix-15k"
    assert yaml.safe_load((tmp_path / "w" / "accelerate_kt.yaml").read_text())["distributed_type"] == "FSDP"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- environment and metrics
def test_a_backend_venv_is_inspected_with_its_own_interpreter(tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert resolve_python(venv) == (venv / "bin" / "python").absolute()
    assert python_for({"kt": str(venv)}, "kt-legacy") == (venv / "bin" / "python").absolute()
    assert python_for({"kt": str(venv)}, "hf") is None
    env = inspect_env(resolve_python(venv), PACKAGES)
    assert env.executable.startswith(str(venv)) and env.torch is None and not env.ktflow
    assert env.packages["llamafactory"] is None
    problems = [p.message for p in check_backend(collect_host(tmp_path, env), "hf", None)]
    assert f"llamafactory is not installed in {env.executable}" in problems
    assert any("ktflow is not importable" in message for message in problems)
    with pytest.raises(KtflowInputError) as caught:
        python_for({"unsloth": str(tmp_path / "missing")}, "unsloth")
    assert caught.value.field == "training.python.unsloth"


def test_gpu_peaks_are_gathered_over_ranks(tmp_path: Path) -> None:
    record = gpu_peak_record()  # this process: no CUDA here, so no figures
    assert record["rank"] == 0
    assert record["max_allocated_bytes"] is None or record["max_allocated_bytes"] >= 0
    assert gpu_metrics(tmp_path)["gpu_peak_allocated_mb"] is None
    for rank, peak in ((0, 3 << 30), (1, 5 << 30)):
        (tmp_path / f"ktflow_gpu_peak.rank{rank}.json").write_text(
            json.dumps({"rank": rank, "max_allocated_bytes": peak, "max_reserved_bytes": peak + (1 << 20)})
        )
    metrics = gpu_metrics(tmp_path)
    assert metrics["gpu_peak_allocated_mb"] == 5 * 1024 and metrics["gpu_peak_reserved_mb"] == 5 * 1024 + 1
    assert [r["rank"] for r in metrics["gpu_ranks"]] == [0, 1]


# ---------------------------------------------------------------- the schema names what the code has
def _training_schema() -> dict[str, Any]:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    training: dict[str, Any] = schema["$defs"]["training"]["properties"]
    return training


def test_schema_training_backends_are_the_registrys() -> None:
    assert _training_schema()["backend"]["enum"] == list(BACKENDS)


def test_schema_stages_and_formats_are_the_codes() -> None:
    training = _training_schema()
    assert training["stage"]["enum"] == list(STAGE_FORMATS)
    assert set(training["format"]["enum"]) == {f for formats in STAGE_FORMATS.values() for f in formats}

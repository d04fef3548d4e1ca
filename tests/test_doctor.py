"""ktflow doctor: parameter counts against transformers, published model sizes, this host, the CLI,
and the training environment it checks (another interpreter, the KT YAML generation)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version

from ktflow import cli
from ktflow.errors import KtflowInputError
from ktflow.estimate import GiB, estimate_requirements
from ktflow.host.cpu import cpu_flags
from ktflow.host.kt_kernel import kt_variant
from ktflow.host.packages import PACKAGES
from ktflow.host.python_env import inspect_env
from ktflow.host.report import GpuInfo, HostReport, collect_host
from ktflow.train.preflight import check_backend, verdict

# Published config.json values (DeepSeek-V3, DeepSeek-V2-Lite, Kimi-K2-Instruct).
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}  # fmt: skip
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "greedy", "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "tie_word_embeddings": False,
}  # fmt: skip
KIMI_K2: dict[str, Any] = {
    **DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_routed_experts": 384, "num_nextn_predict_layers": 0,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}  # fmt: skip

_TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip
_MLA = {"moe_intermediate_size": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
        "v_head_dim": 8, "first_k_dense_replace": 1, "num_key_value_heads": 4}  # fmt: skip
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "DeepseekV3": {**_TINY, **_MLA, "num_hidden_layers": 4, "n_routed_experts": 4, "n_shared_experts": 1,
                   "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "q_lora_rank": 24},
    "DeepseekV2": {**_TINY, **_MLA, "num_hidden_layers": 3, "n_routed_experts": 4, "n_shared_experts": 2,
                   "q_lora_rank": None},
    "Qwen2Moe": {**_TINY, "num_hidden_layers": 3, "moe_intermediate_size": 16, "num_experts": 4,
                 "shared_expert_intermediate_size": 40, "num_experts_per_tok": 2, "mlp_only_layers": [0]},
    "Qwen3Moe": {**_TINY, "num_hidden_layers": 3, "moe_intermediate_size": 16, "num_experts": 4,
                 "head_dim": 12, "num_experts_per_tok": 2, "decoder_sparse_step": 2},
    "Mixtral": {**_TINY, "num_hidden_layers": 2, "num_local_experts": 4},
    "Glm4Moe": {**_TINY, "num_hidden_layers": 3, "moe_intermediate_size": 16, "n_routed_experts": 4,
                "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 12, "use_qk_norm": True,
                "attention_bias": True},
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_counts_equal_what_transformers_builds(arch: str) -> None:
    config = getattr(transformers, f"{arch}Config")(**TINY_CONFIGS[arch])
    with torch.device("meta"):
        model = getattr(transformers, f"{arch}ForCausalLM")(config)
    state = model.state_dict()  # persistent buffers (e_score_correction_bias) are checkpoint tensors too
    estimate = estimate_requirements(config.to_dict())
    assert estimate.params_total == sum(t.numel() for t in state.values())
    assert estimate.params_routed == sum(t.numel() for k, t in state.items() if ".experts." in k)
    assert estimate.params_routed > 0


def test_deepseek_v3_is_671b_plus_14b_mtp() -> None:
    r = estimate_requirements(DEEPSEEK_V3)
    assert r.params_total == pytest.approx(671e9, rel=0.02)
    assert r.params_total + r.params_mtp == pytest.approx(685e9, rel=0.02)  # the released checkpoint
    assert r.params_active == pytest.approx(37e9, rel=0.03)
    assert r.params_routed / r.params_total > 0.97
    # The paper: ~1.2-1.3 TB host RAM for KT LoRA on V3 (experts in BF16).
    assert 1.1e12 < r.kt_train_host_bytes < 1.45e12
    assert r.bf16_disk_bytes == pytest.approx(2 * 685e9, rel=0.02)


def test_deepseek_v2_lite_against_the_paper() -> None:
    r = estimate_requirements(DEEPSEEK_V2_LITE)
    assert r.params_total == pytest.approx(15.7e9, rel=0.02)
    assert r.params_mtp == 0
    # Paper, V2-Lite LoRA r=8 qlen 512: HF 32.12 GB GPU (the model on one GPU); KT 6.08 GB GPU.
    assert r.hf_train_bytes == pytest.approx(32.12e9, rel=0.15)
    assert r.kt_train_gpu_bytes < 6.08e9  # a floor: KT's own buffers come on top
    assert r.kt_train_gpu_bytes < r.hf_train_bytes / 5


def test_kimi_k2_is_a_trillion_and_text_config_nesting_is_read() -> None:
    flat = estimate_requirements(KIMI_K2)
    assert 1.0e12 < flat.params_total < 1.06e12
    assert flat.params_active == pytest.approx(32e9, rel=0.05)
    nested = {"model_type": "kimi_k25", "vision_config": {"hidden_size": 1152}, "text_config": KIMI_K2}
    assert estimate_requirements(nested) == flat


def test_lora_rank_scales_adapter_params_only() -> None:
    r8 = estimate_requirements(DEEPSEEK_V2_LITE, lora_rank=8)
    r16 = estimate_requirements(DEEPSEEK_V2_LITE, lora_rank=16)
    assert r16.lora_params_gpu == 2 * r8.lora_params_gpu
    assert r16.lora_params_experts == 2 * r8.lora_params_experts
    assert r16.params_total == r8.params_total


def test_bad_configs_name_the_field() -> None:
    broken = {k: v for k, v in DEEPSEEK_V3.items() if k != "kv_lora_rank"}
    with pytest.raises(KtflowInputError) as caught:
        estimate_requirements(broken, source="m/config.json")
    assert (caught.value.path, caught.value.field) == ("m/config.json", "kv_lora_rank")
    with pytest.raises(KtflowInputError) as caught:
        estimate_requirements({**DEEPSEEK_V3, "hidden_size": "7168"})
    assert caught.value.field == "hidden_size"
    with pytest.raises(KtflowInputError, match="llama") as caught:
        estimate_requirements({"model_type": "llama"})
    assert caught.value.field == "model_type"


SAPPHIRE_RAPIDS = ("fpu avx2 avx512f avx512bw avx512_vnni avx512vbmi avx512_bf16 amx_bf16 amx_tile amx_int8 "
                   "avx512_fp16")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "variant"),
    [
        (SAPPHIRE_RAPIDS, "amx"),
        (SAPPHIRE_RAPIDS.replace("amx_tile ", ""), "avx512_bf16"),
        ("avx2 avx512f avx512bw avx512_vnni", "avx512_vnni"),
        ("sse4_2 avx avx2 fma", "avx2"),
        ("sse4_2", None),
    ],
)
def test_kt_variant_follows_kt_kernels_build_ladder(flags: str, variant: str | None) -> None:
    text = f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert kt_variant(cpu_flags(text)) == variant


@pytest.fixture(scope="module")
def host() -> HostReport:
    return collect_host(Path("results-that-do-not-exist-yet") / "sub")


def test_collect_host_reports_this_machine(host: HostReport) -> None:
    flags = cpu_flags()
    assert host.flags["avx2"] == ("avx2" in flags)
    assert host.flags["amx_tile"] == ("amx_tile" in flags)
    assert host.kt_variant == kt_variant(flags)
    assert host.logical_cpus >= 1
    assert host.numa_nodes >= 1
    assert 0 < host.ram_available <= host.ram_total
    assert host.disk_free > 0
    assert Path(host.disk_path).exists()
    assert len(host.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert host.torch == torch.__version__
    assert host.packages["transformers"] == transformers.__version__
    kt_pin = next(p for p in host.pins if p.owner == "kt-kernel" and "torch" in p.requirement)
    assert kt_pin.ok == (Version(torch.__version__).base_version == "2.9.1")


def test_kt_verdict_here_names_what_is_missing(host: HostReport) -> None:
    problems = check_backend(host, "kt", None)
    line = verdict("kt", problems)
    has_kt = importlib.util.find_spec("kt_kernel") is not None
    if host.gpus and has_kt and host.kt_variant in ("amx", "avx512_bf16"):
        pytest.skip("this host can run the KT backend")
    assert line.startswith("KT backend: cannot run here: ")
    assert ("no CUDA GPU" in line) == (not host.gpus)
    assert ("kt-kernel is not installed" in line) == (not has_kt)
    assert ("CPU lacks AMX/AVX512-BF16" in line) == (host.kt_variant not in ("amx", "avx512_bf16"))
    assert any(p.severity == "warning" and "no AMX" in p.message for p in problems) == (
        host.kt_variant == "avx512_bf16"
    )


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None, reason="LLaMA-Factory not installed")
def test_hf_verdict_here_passes(host: HostReport) -> None:
    assert verdict("hf", check_backend(host, "hf", None)).startswith("HF backend: can run here")


def _amx_gpu_host(host: HostReport, ram: int) -> HostReport:
    return dataclasses.replace(
        host,
        flags=dict.fromkeys(host.flags, True), kt_variant="amx", gpus=[GpuInfo("NVIDIA H100", 80 * GiB)],
        ram_total=ram, ram_available=ram, disk_free=4000 * GiB, kt_probe={"variant": "amx", "sft": True},
        packages={**host.packages, **dict.fromkeys(("transformers", "peft", "trl"), "x"),
                  "llamafactory": "0.9.5", "kt-kernel": "0.7.2", "transformers-kt": "5.6.0.post6",
                  "accelerate-kt": "1.14.0.post4", "torch": "2.9.1"},
        pins=[],
    )  # fmt: skip


def test_memory_checks_against_the_model() -> None:
    base = collect_host()
    v3 = estimate_requirements(DEEPSEEK_V3)
    small = _amx_gpu_host(base, 125 * GiB)
    problems = check_backend(small, "kt", v3)
    assert [p.message for p in problems if p.severity == "error"] == [
        f"deepseek_v3: host RAM (routed experts, BF16): {v3.kt_train_host_bytes / GiB:,.1f} GiB needed, "
        "125.0 GiB here"
    ]
    assert not [p for p in check_backend(_amx_gpu_host(base, 2048 * GiB), "kt", v3) if p.severity == "error"]
    hf = verdict("hf", check_backend(_amx_gpu_host(base, 2048 * GiB), "hf", v3))
    assert hf.startswith("HF backend: cannot run here: deepseek_v3: GPU memory (per GPU): 1,2")
    avx2 = dataclasses.replace(small, kt_variant="avx2", flags={**small.flags, "avx512f": False})
    assert "CPU lacks AMX/AVX512-BF16 (avx512f missing" in verdict("kt", check_backend(avx2, "kt", None))
    with pytest.raises(KtflowInputError):
        check_backend(small, "vllm", None)


def test_legacy_kt_needs_amx_and_an_older_llamafactory() -> None:
    amx = _amx_gpu_host(collect_host(), 2048 * GiB)
    amx = dataclasses.replace(
        amx, packages={**amx.packages, "ktransformers": "0.4.1", "llamafactory": "0.9.4"}
    )
    assert verdict("kt-legacy", check_backend(amx, "kt-legacy", None)) == "KT (legacy) backend: can run here"
    newer = dataclasses.replace(amx, packages={**amx.packages, "llamafactory": "0.9.5"})
    assert "rejects the legacy KT keys" in verdict("kt-legacy", check_backend(newer, "kt-legacy", None))
    no_amx = dataclasses.replace(amx, flags={**amx.flags, "amx_tile": False})
    assert "CPU lacks AMX" in verdict("kt-legacy", check_backend(no_amx, "kt-legacy", None))


def _doctor(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: HostReport
) -> None:
    config = tmp_path / "v2lite" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(DEEPSEEK_V2_LITE))
    kt_errors = [p for p in check_backend(host, "kt", None) if p.severity == "error"]
    code, out, err = _doctor(["--backend", "kt", "--results-dir", str(tmp_path)], capsys)
    assert code == (3 if kt_errors else 0)
    if kt_errors:
        assert "ktflow doctor: hardware: KT backend: cannot run here" in err
    for label in ("HF", "KT", "Unsloth"):
        assert f"\n{label} backend: " in out

    report_path = tmp_path / "doctor.json"
    args = ["--backend", "hf", "--model-config", str(config.parent), "--json", str(report_path)]
    code, out, _ = _doctor([*args, "--results-dir", str(tmp_path)], capsys)
    report = json.loads(report_path.read_text())
    assert code == (0 if report["backends"]["hf"]["ok"] else 3)
    assert (
        report["models"][str(config.parent)]["params_total"]
        == estimate_requirements(DEEPSEEK_V2_LITE).params_total
    )
    assert report["backends"]["kt"]["ok"] == (not kt_errors)
    assert report["host"]["kt_variant"] == host.kt_variant
    assert "deepseek_v2" in out
    assert json.loads((tmp_path / "doctor.json.provenance.json").read_text())["step"] == "doctor"


def test_cli_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    code, _, err = _doctor(["--model-config", str(bad)], capsys)
    assert code == 2
    assert str(bad) in err
    workflow = tmp_path / "config.yaml"
    workflow.write_text("training: {backend: vllm}\n")
    code, _, err = _doctor(["--config", str(workflow)], capsys)
    assert code == 2
    assert "training.backend" in err


def test_cli_reads_the_workflow_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "models" / "v3"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    fetched = tmp_path / "results" / "models" / "tiny-v3" / "release"  # where `ktflow fetch` puts it
    fetched.mkdir(parents=True)
    (fetched / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", **TINY_CONFIGS["DeepseekV3"]})
    )
    workflow = tmp_path / "config.yaml"
    workflow.write_text(
        f"results: {tmp_path / 'results'}\n"
        f"models:\n  big: {{source: local, path: {model}}}\n  tiny-v3: {{source: tiny}}\n"
        "training: {backend: hf, lora: {rank: 16}, cutoff_len: 256, batch_size: 2}\n"
    )
    code, out, err = _doctor(["--config", str(workflow)], capsys)
    # The HF backend holds all of V3 on one device: no machine that runs these tests has 1.3 TB there.
    assert code == 3
    assert "HF backend: cannot run here: " in err
    assert "deepseek_v3: " in err
    assert "Model     big (deepseek_v3)" in out
    assert "Model     tiny-v3 (deepseek_v3): 0.05M params" in out
    assert "LoRA r=16" in out
    assert "seq 256 x batch 2" in out


@pytest.mark.skipif(importlib.util.find_spec("kt_kernel") is None, reason="kt-kernel not installed")
def test_installed_kt_kernel_agrees_with_our_flag_reading(host: HostReport) -> None:
    # kt_kernel picks its CPU build itself; doctor's reading of /proc/cpuinfo must name the same one.
    assert host.kt_probe is not None
    assert "error" not in host.kt_probe
    assert host.kt_probe["variant"] == host.kt_variant
    assert host.kt_probe["sft"] == (host.kt_variant in ("amx", "avx512_bf16"))


def test_counts_equal_the_tiny_release_on_disk(tiny_release: Path) -> None:
    """Every tensor of the FP8 release except the FP8 scales is a model parameter (or an MTP one)."""
    from safetensors import safe_open

    config = json.loads((tiny_release / "config.json").read_text())
    layers = config["num_hidden_layers"]
    model, mtp = 0, 0
    for shard in tiny_release.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if key.endswith("_scale_inv"):
                    continue
                numel = math.prod(handle.get_slice(key).get_shape())
                parts = key.split(".")
                if parts[:2] == ["model", "layers"] and int(parts[2]) >= layers:
                    mtp += numel
                else:
                    model += numel
    estimate = estimate_requirements(config)
    assert estimate.params_total == model
    # Newer transformers (5.17 on the device host) write num_nextn_predict_layers=1 but no MTP weights.
    assert mtp in (0, estimate.params_mtp)


def test_current_kt_needs_the_kt_forks_and_a_new_enough_llamafactory() -> None:
    amx = _amx_gpu_host(collect_host(), 2048 * GiB)
    assert verdict("kt", check_backend(amx, "kt", None)) == "KT backend: can run here"
    forked = dataclasses.replace(
        amx, packages={**amx.packages, "llamafactory": None, "llamafactory-kt": "0.9.6.dev0"}
    )
    assert verdict("kt", check_backend(forked, "kt", None)) == "KT backend: can run here"
    bare = dataclasses.replace(amx, packages={**amx.packages, "transformers-kt": None})
    assert "transformers-kt is not installed" in verdict("kt", check_backend(bare, "kt", None))
    old = dataclasses.replace(amx, packages={**amx.packages, "llamafactory": "0.9.4"})
    assert "set training.kt.generation: legacy" in verdict("kt", check_backend(old, "kt", None))


def test_cli_checks_another_interpreter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--python: packages and GPUs are those of the training environment, not of ktflow's."""
    import subprocess
    import sys

    venv = tmp_path / "kt-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    report_path = tmp_path / "doctor.json"
    code, _, err = _doctor(
        ["--python", str(venv), "--training", '{"backend": "kt", "kt": {"generation": "legacy"}}',
         "--results-dir", str(tmp_path), "--json", str(report_path)], capsys,
    )  # fmt: skip
    assert code == 3
    report = json.loads(report_path.read_text())
    assert report["requested"] == "kt-legacy"  # the training block's generation picks the checks
    assert report["host"]["executable"].startswith(str(venv)) and report["host"]["torch"] is None
    assert "KT (legacy) backend: cannot run here: torch is not installed in " in err
    assert "ktflow is not importable by" in err and "ktransformers is not installed" in err
    code, _, err = _doctor(["--python", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "--python" in err


def test_doctor_sees_the_same_environment_in_process_and_from_outside(host: HostReport) -> None:
    import sys

    outside = inspect_env(
        Path(sys.executable + "-does-not-exist").parent / Path(sys.executable).name, PACKAGES
    )
    assert outside.packages == host.packages and outside.torch == host.torch
    assert [g.name for g in host.gpus] == [name for name, _ in outside.gpus]

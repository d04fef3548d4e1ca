"""convert-int8: hardware gate, input checks, the driver contract, and (on an AMX host) the real thing."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import ktflow
from ktflow import cli
from ktflow.convert_int8 import RECORD_NAME
from ktflow.convert_int8.checkpoint import expected_keys
from ktflow.convert_int8.convert import check_hardware, convert_int8
from ktflow.errors import HardwareError, KtflowInputError
from ktflow.host.cpu import AMX_FLAGS, AVX512_FLAGS, cpu_flags, has_amx, has_avx512, missing_flags

ALL_FLAGS = frozenset((*AVX512_FLAGS, *AMX_FLAGS, "sse4_2"))
CPUINFO = """processor\t: 0
model name\t: Test CPU
flags\t\t: fpu sse4_2 avx2 avx512f avx512bw amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Test CPU
flags\t\t: fpu sse4_2 avx2 avx512f avx512bw amx_tile amx_bf16
"""


def kt_kernel_importable() -> bool:
    try:
        importlib.import_module("kt_kernel")
    except Exception:
        return False
    return True


def write_checkpoint(
    path: Path, hidden: int = 64, inter: int = 32, experts: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A tiny DeepSeek-layout BF16 checkpoint: dense layer 0, MoE layers 1 and 2 in two shards."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) / cols**0.5).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": weight(256, hidden)}, {}]
    for proj, shape in {
        "gate": (inter * 2, hidden),
        "up": (inter * 2, hidden),
        "down": (hidden, inter * 2),
    }.items():
        shards[0][f"model.layers.0.mlp.{proj}_proj.weight"] = weight(*shape)
    for layer in (1, 2):
        shard = shards[layer - 1]
        shard[f"model.layers.{layer}.mlp.gate.weight"] = weight(experts, hidden)
        for proj, shape in {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}.items():
            shard[f"model.layers.{layer}.mlp.shared_experts.{proj}_proj.weight"] = weight(*shape)
            for expert in range(experts):
                shard[f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"] = weight(*shape)
    for index, shard in enumerate(shards):
        save_file(shard, str(path / f"model-{index + 1:05d}-of-00002.safetensors"))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
        "intermediate_size": inter * 2, "moe_intermediate_size": inter, "n_routed_experts": experts,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "vocab_size": 256, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return {key: value for shard in shards for key, value in shard.items()}


def test_cpu_flags_are_common_to_all_cores() -> None:
    flags = cpu_flags(CPUINFO)
    assert "amx_int8" not in flags  # core 1 lacks it
    assert {"avx512f", "amx_tile", "amx_bf16"} <= flags
    assert has_avx512(flags)
    assert not has_amx(flags)
    assert missing_flags(AMX_FLAGS, flags) == ["amx_int8"]
    assert cpu_flags("") == frozenset()


def test_hardware_check_names_missing_flags() -> None:
    check_hardware(ALL_FLAGS)
    with pytest.raises(HardwareError, match=r"amx_tile, amx_int8, amx_bf16") as caught:
        check_hardware(frozenset(AVX512_FLAGS))
    assert "this host" in str(caught.value)
    with pytest.raises(HardwareError, match="avx512bw"):
        check_hardware(ALL_FLAGS - {"avx512bw"})


@pytest.mark.skipif(has_amx() and has_avx512(), reason="this host has AMX: the refusal cannot be observed")
def test_refuses_before_any_work_on_this_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_checkpoint(tmp_path / "bf16")
    with pytest.raises(HardwareError, match="lacks"):
        convert_int8(tmp_path / "bf16", tmp_path / "int8")
    assert cli.main(["convert-int8", str(tmp_path / "bf16"), str(tmp_path / "int8")]) == 3
    assert "amx" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


@pytest.mark.skipif(kt_kernel_importable(), reason="kt_kernel imports here, so it would be used")
def test_without_kt_kernel_or_checkout_says_so(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "bf16")
    with pytest.raises(KtflowInputError, match="kt_kernel is not importable") as caught:
        convert_int8(tmp_path / "bf16", tmp_path / "int8", flags=ALL_FLAGS)
    assert caught.value.field == "--kt-checkout"
    with pytest.raises(KtflowInputError, match=r"convert_cpu_weights\.py"):
        convert_int8(tmp_path / "bf16", tmp_path / "int8", kt_checkout=tmp_path, flags=ALL_FLAGS)
    assert not (tmp_path / "int8").exists()


def _set_config(field: str, value: object) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        config[field] = value
        (path / "config.json").write_text(json.dumps(config))

    return apply


def _rewrite_shard(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        shard = path / "model-00002-of-00002.safetensors"
        tensors = load_file(str(shard))
        edit(tensors)
        save_file(tensors, str(shard))

    return apply


@pytest.mark.parametrize(
    ("mutate", "bad_field"),
    [
        pytest.param(
            _set_config("quantization_config", {"quant_method": "fp8"}), "quantization_config", id="fp8"
        ),
        pytest.param(_set_config("n_routed_experts", None), "n_routed_experts", id="no-experts"),
        pytest.param(
            _set_config("moe_intermediate_size", 48),
            "model.layers.1.mlp.experts.0.down_proj.weight",
            id="shape-vs-config",
        ),
        pytest.param(
            _rewrite_shard(lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight")),
            "model.layers.2.mlp.experts.3.up_proj.weight",
            id="missing-expert",
        ),
        pytest.param(
            _rewrite_shard(
                lambda t: t.update(
                    {
                        "model.layers.2.mlp.experts.0.gate_proj.weight": t[
                            "model.layers.2.mlp.experts.0.gate_proj.weight"
                        ].float()
                    }
                )
            ),
            "model.layers.2.mlp.experts.0.gate_proj.weight",
            id="not-bf16",
        ),
    ],
)
def test_bad_checkpoint_names_file_and_key(
    tmp_path: Path, mutate: Callable[[Path], None], bad_field: str
) -> None:
    write_checkpoint(tmp_path / "bf16")
    mutate(tmp_path / "bf16")
    with pytest.raises(KtflowInputError) as caught:
        convert_int8(tmp_path / "bf16", tmp_path / "int8", flags=ALL_FLAGS)
    assert caught.value.field == bad_field
    assert not (tmp_path / "int8").exists()


# Stands in for kt-kernel/scripts/convert_cpu_weights.py (which needs kt_kernel + AMX) to check
# ktflow's side of the contract: the arguments it passes and the layout check on what comes back.
STAND_IN = textwrap.dedent(
    """
    import argparse, itertools, json, os, torch
    from safetensors.torch import save_file
    p = argparse.ArgumentParser()
    for flag in "input-path input-type output quant-method cpuinfer-threads threadpool-count".split():
        p.add_argument("--" + flag, required=True)
    a = p.parse_args()
    assert (a.input_type, a.quant_method) == ("bf16", "int8"), a
    experts = json.load(open(os.path.join(a.input_path, "config.json")))["n_routed_experts"]
    grid = itertools.product((1, 2), ("gate", "up", "down"), range(experts), range(int(a.threadpool_count)))
    keys = [f"blk.{l}.ffn_{p}_exps.{e}.numa.{n}.{w}" for l, p, e, n in grid for w in ("weight", "scale")]
    keys = keys[: len(keys) - int(os.environ.get("DROP_KEYS", "0"))]
    tensors = {k: torch.zeros(4, dtype=torch.int8 if k.endswith("weight") else torch.float32) for k in keys}
    save_file(tensors, os.path.join(a.output, "model.safetensors"))
    """
)


@pytest.mark.skipif(
    kt_kernel_importable(), reason="kt_kernel imports here, so the checkout would not be used"
)
def test_checkout_script_driven_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path / "bf16")
    scripts = tmp_path / "ktransformers" / "kt-kernel" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "convert_cpu_weights.py").write_text(STAND_IN)
    report = convert_int8(
        tmp_path / "bf16",
        tmp_path / "int8",
        tmp_path / "ktransformers",
        threads=2,
        threadpool_count=2,
        flags=ALL_FLAGS,
    )
    assert (report.implementation, report.layers, report.threadpool_count) == ("kt_checkout", (1, 2), 2)
    record = json.loads((tmp_path / "int8" / RECORD_NAME).read_text())
    assert record["kt_method"] == "AMXINT8"
    assert record["sglang_args"][-4:] == ["--kt-method", "AMXINT8", "--kt-threadpool-count", "2"]
    assert (tmp_path / "int8" / "provenance.json").is_file()

    monkeypatch.setenv("DROP_KEYS", "1")
    with pytest.raises(RuntimeError, match="incomplete"):
        convert_int8(tmp_path / "bf16", tmp_path / "int8b", tmp_path / "ktransformers", flags=ALL_FLAGS)
    assert not (tmp_path / "int8b").exists()


def moe_reference(
    x: torch.Tensor, weights: dict[str, torch.Tensor], layer: int, ids: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            prefix = f"model.layers.{layer}.mlp.experts.{int(ids[token, slot])}"
            w = {p: weights[f"{prefix}.{p}_proj.weight"].float() for p in ("gate", "up", "down")}
            h = F.silu(x[token] @ w["gate"].T) * (x[token] @ w["up"].T)
            out[token] += gates[token, slot] * (h @ w["down"].T)
    return out


@pytest.mark.amx
@pytest.mark.skipif(
    not (has_amx() and has_avx512()), reason="needs an AMX CPU (amx_tile/int8/bf16 + AVX512F/BW)"
)
def test_amx_int8_layout_and_values(tmp_path: Path) -> None:
    if not kt_kernel_importable():
        pytest.skip("kt_kernel is not importable")
    if not torch.cuda.is_available():
        pytest.skip("kt_kernel's wrapper pins memory: needs CUDA torch and a GPU")
    kt_kernel = importlib.import_module("kt_kernel")
    hidden, inter, experts = 512, 256, 4
    weights = write_checkpoint(tmp_path / "bf16", hidden, inter, experts)
    report = convert_int8(tmp_path / "bf16", tmp_path / "int8", threads=8, threadpool_count=1)
    out = tmp_path / "int8"
    assert report.implementation == "kt_kernel"
    assert json.loads((out / RECORD_NAME).read_text())["kt_method"] == "AMXINT8"
    rows_cols = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for layer in (1, 2):
        shard = load_file(str(out / f"int8-experts-layer{layer:03d}.safetensors"))
        assert sorted(shard) == sorted(expected_keys([layer], experts, 1))
        for proj, (rows, cols) in rows_cols.items():
            for expert in range(experts):
                base = f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.0"
                q, scale = shard[f"{base}.weight"], shard[f"{base}.scale"]
                w = weights[f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"].float()
                assert (q.dtype, q.numel(), scale.dtype, scale.numel()) == (
                    torch.int8,
                    rows * cols,
                    torch.float32,
                    rows,
                )
                # symmetric per-row int8; the packed order is the kernel's, so compare order-free
                want_scale = w.abs().amax(dim=1) / 127
                torch.testing.assert_close(
                    scale.sort().values, want_scale.sort().values, rtol=1e-2, atol=1e-7
                )
                want_q = torch.round(w / want_scale[:, None]).clamp(-127, 127).long()
                hist = torch.bincount(q.long() + 128, minlength=256) - torch.bincount(
                    want_q.flatten() + 128, minlength=256
                )
                assert hist.abs().sum() / q.numel() < 0.02

    # the kernel reading these files back gives the bf16 MoE's output (dequantized ~= bf16)
    torch.manual_seed(0)
    tokens = 8
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)]).cuda()
    gates = torch.softmax(torch.randn(tokens, 2), dim=-1).float().cuda()
    for layer in (1, 2):
        wrapper = kt_kernel.KTMoEWrapper(
            layer_idx=layer, num_experts=experts, num_experts_per_tok=2, hidden_size=hidden,
            moe_intermediate_size=inter, gpu_experts_mask=None, cpuinfer_threads=8, threadpool_count=1,
            weight_path=str(out), chunked_prefill_size=64, method="AMXINT8",
        )  # fmt: skip
        wrapper.load_weights(torch.arange(experts, dtype=torch.int64))
        got = wrapper.forward(x, ids, gates, torch.cuda.current_stream().cuda_stream).float().cpu()
        want = moe_reference(x.float().cpu(), weights, layer, ids.cpu(), gates.cpu())
        error = ((got - want).norm() / want.norm()).item()
        print(f"layer {layer}: AMXINT8 MoE output vs BF16 reference, relative L2 error {error:.4f}")
        assert error < 0.05

    # the CLI in a fresh process (kt_kernel's thread pool is per process) with two NUMA sub-pools
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(ktflow.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    command = [
        sys.executable,
        "-m",
        "ktflow",
        "convert-int8",
        str(tmp_path / "bf16"),
        str(tmp_path / "int8x2"),
    ]
    command += ["--threadpool-count", "2", "--threads", "8"]
    subprocess.run(command, check=True, env=env)
    shard = load_file(str(tmp_path / "int8x2" / "int8-experts-layer001.safetensors"))
    assert sorted(shard) == sorted(expected_keys([1], experts, 2))
    for proj, (rows, cols) in rows_cols.items():
        total = sum(shard[f"blk.1.ffn_{proj}_exps.0.numa.{n}.weight"].numel() for n in range(2))
        assert total == rows * cols


def test_int8_backends_registry() -> None:
    from ktflow.convert_int8.backends import INT8_BACKENDS

    assert list(INT8_BACKENDS) == ["kt_kernel", "kt_checkout"]
    assert all(name == backend.name for name, backend in INT8_BACKENDS.items())

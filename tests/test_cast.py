"""ktflow cast: bit-exactness against an independent numpy reference, resume after a real kill,
verification, bad input and full disks.

The reference decodes float8 and int4 from their bit fields with numpy and rounds float32 to
bf16 with integer arithmetic; it shares no code with ktflow's kernels. Sources are written by
the safetensors library, outputs are read back with it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from support.synthetic_checkpoints import (
    Dims,
    int4_quantization_config,
    write_fp8_release,
    write_int4_release,
    write_int4_weight,
)

from ktflow.cast import CAST_MARKER, cast_checkpoint, detect_format, verify_checkpoint
from ktflow.cast.formats import FORMATS, UNQUANTIZED
from ktflow.cast.formats.base import Sink, Workspace
from ktflow.cast.formats.fp8_block import Fp8Block
from ktflow.cast.formats.int4_pack import Int4Pack
from ktflow.cast.shards import Reader, file_checksum
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import read_header

ROOT = Path(__file__).resolve().parents[1]
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


# ---------------------------------------------------------------- independent reference


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (NaN payloads are not compared)."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def fp8_values(raw: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float32, from the sign / exponent / mantissa fields."""
    raw = raw.astype(np.int64)
    exponent, mantissa = (raw >> 3) & 0xF, raw & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude = np.where((raw & 0x7F) == 0x7F, np.nan, magnitude)
    return np.where(raw & 0x80, -magnitude, magnitude).astype(np.float32)


def ref_fp8(raw: np.ndarray, scale: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    rows, cols = raw.shape
    wide = np.repeat(np.repeat(scale.astype(np.float32), block[0], 0), block[1], 1)[:rows, :cols]
    return bf16_bits(fp8_values(raw) * wide)


def ref_int4(packed: np.ndarray, scale_bits: np.ndarray, shape: tuple[int, int], group: int) -> np.ndarray:
    rows, cols = shape
    words = packed.view(np.uint32)
    q = np.empty((rows, words.shape[1] * 8), np.float32)
    for k in range(8):
        q[:, k::8] = ((words >> (4 * k)) & 0xF).astype(np.float32) - 8
    scale = (scale_bits.astype(np.uint32) << 16).view(np.float32)
    return bf16_bits(q[:, :cols] * np.repeat(scale, group, 1)[:, :cols])


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    nan_got = (got & 0x7F80) == 0x7F80
    nan_got &= (got & 0x7F) != 0
    nan_want = (want & 0x7F80) == 0x7F80
    nan_want &= (want & 0x7F) != 0
    return bool(np.array_equal(nan_got, nan_want) and np.array_equal(got[~nan_got], want[~nan_want]))


def tensors(root: Path) -> dict[str, torch.Tensor]:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    found: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(root / file, "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return found


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16).numpy().view(np.uint16)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_release(tmp_path_factory.mktemp("fp8") / "src")


@pytest.fixture(scope="module")
def fp8_dst(fp8_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("fp8-out") / "dst"
    cast_checkpoint(fp8_src, dst, workers=2, progress=False)
    return dst


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"quantization_config": FP8_QUANT}, "fp8-block"),
        ({"quantization_config": int4_quantization_config()}, "int4-pack"),
        ({"text_config": {"quantization_config": int4_quantization_config()}}, "int4-pack"),
        ({"torch_dtype": "bfloat16"}, "bf16"),
        ({}, "bf16"),
    ],
)
def test_detect_format(config: dict[str, Any], expected: str) -> None:
    assert detect_format(config) == expected


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
        (
            {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}},
            "quantization_config.weight_block_size",
        ),
        ({"quantization_config": FP8_QUANT | {"fmt": "e5m2"}}, "quantization_config.fmt"),
        (
            {"quantization_config": int4_quantization_config() | {"format": "float-quantized"}},
            "quantization_config.format",
        ),
        (
            {"text_config": {"quantization_config": {"quant_method": "gptq"}}},
            "text_config.quantization_config.quant_method",
        ),
        ({"torch_dtype": "float16"}, "torch_dtype"),
    ],
)
def test_detect_format_rejects(config: dict[str, Any], field: str) -> None:
    with pytest.raises(KtflowInputError) as error:
        detect_format(config)
    assert error.value.field == field


def test_formats_registry_is_keyed_by_quant_method() -> None:
    """The registry the driver looks up holds each quantized format under its own quant_method."""
    assert set(FORMATS) == {"fp8", "compressed-tensors"}
    assert all(fmt.quant_method == method for method, fmt in FORMATS.items())
    assert UNQUANTIZED.quant_method is None
    assert {fmt.name for fmt in (*FORMATS.values(), UNQUANTIZED)} == {"fp8-block", "int4-pack", "bf16"}
    with pytest.raises(KtflowInputError, match="supported are fp8 \\(block\\) and compressed-tensors pack"):
        detect_format({"quantization_config": {"quant_method": "awq"}})


def test_detect_format_rejects_asymmetric_int4() -> None:
    config = int4_quantization_config()
    config["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(KtflowInputError, match="symmetric"):
        detect_format({"quantization_config": config})


# ---------------------------------------------------------------- bit exactness


def test_fp8_cast_is_bit_exact(fp8_src: Path, fp8_dst: Path) -> None:
    source, output = tensors(fp8_src), tensors(fp8_dst)
    index = json.loads((fp8_src / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = [name for name, t in source.items() if t.dtype == torch.float8_e4m3fn]
    # The fixture must exercise what real releases do: odd shapes, scales in another shard.
    assert any(dim % 128 for name in quantized for dim in source[name].shape)
    assert any(index[name] != index[f"{name}_scale_inv"] for name in quantized)
    assert set(output) == {name for name in source if not name.endswith("_scale_inv")}
    for name in quantized:
        raw = source[name].view(torch.uint8).numpy()
        want = ref_fp8(raw, source[f"{name}_scale_inv"].numpy())
        assert output[name].dtype == torch.bfloat16
        assert same_bits(bits(output[name]), want), name
    for name in output.keys() - set(quantized):
        assert raw_bytes(output[name]) == raw_bytes(source[name]), name
        assert output[name].dtype == source[name].dtype


@pytest.mark.parametrize("k25", [False, True])
def test_int4_cast_is_bit_exact(tmp_path: Path, k25: bool) -> None:
    # 70 input columns: neither a multiple of the 8 nibbles per int32 nor of the 32-wide groups.
    src = write_int4_release(tmp_path / "src", Dims(moe_inter=70), k25=k25)
    dst = tmp_path / "dst"
    report = cast_checkpoint(src, dst, progress=False)
    source, output = tensors(src), tensors(dst)
    packed = [name.removesuffix("_packed") for name in source if name.endswith(".weight_packed")]
    assert packed
    assert any(source[f"{n}_shape"][1] % 8 for n in packed)
    for name in packed:
        rows, cols = (int(v) for v in source[f"{name}_shape"])
        shape = (rows, cols)
        scale = source[f"{name}_scale"].view(torch.int16).numpy().view(np.uint16)
        want = ref_int4(source[f"{name}_packed"].numpy(), scale, shape, 32)
        assert output[name].shape == shape
        assert np.array_equal(bits(output[name]), want), name
    parts = (".weight_packed", ".weight_scale", ".weight_shape")
    assert set(output) == {n for n in source if not n.endswith(parts)} | set(packed)
    for name in output.keys() - set(packed):
        assert raw_bytes(output[name]) == raw_bytes(source[name]), name
    assert all(name.startswith(("language_model.", "vision_tower.")) for name in output) == k25
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config
    assert "quantization_config" not in config.get("text_config", {})
    assert report.format == "int4-pack"
    assert report.verify.ok


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 0.5, 3.0, 200.0, 1e30, 1e-40, 0.0, -2.0]),
    nan=st.booleans(),
)
def test_fp8_kernel_special_values(
    tmp_path_factory: pytest.TempPathFactory, rows: int, cols: int, seed: int, scale: float, nan: bool
) -> None:
    """Every float8 code (subnormals, ±0, NaN or not), huge / subnormal / zero / negative scales."""
    generator = np.random.default_rng(seed)
    raw = generator.integers(0, 256, (rows, cols), dtype=np.uint8)
    if not nan:  # without NaN codes the fast bit-level widening runs
        raw[(raw & 0x7F) == 0x7F] ^= 1
    scales = (generator.random((math.ceil(rows / 128), math.ceil(cols / 128))) + 0.5) * scale
    path = tmp_path_factory.mktemp("k") / "w.safetensors"
    save_file(
        {
            "w": torch.from_numpy(raw).view(torch.float8_e4m3fn),
            "w_scale_inv": torch.from_numpy(scales.astype(np.float32)),
        },
        path,
    )
    nan_codes = int(((raw & 0x7F) == 0x7F).sum())
    if nan_codes:  # a NaN byte in an FP8 weight is refused, counted over the whole tensor
        with pytest.raises(KtflowInputError, match=f"^.*: w: {nan_codes} of {rows * cols} F8_E4M3 values"):
            run_kernel(Fp8Block((128, 128)), path)
        return
    got = run_kernel(Fp8Block((128, 128)), path)
    assert same_bits(got["w"], ref_fp8(raw, scales.astype(np.float32)))


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    group=st.sampled_from([32, 64, 128]),
)
def test_int4_kernel_any_shape(
    tmp_path_factory: pytest.TempPathFactory, rows: int, cols: int, seed: int, group: int
) -> None:
    generator = np.random.default_rng(seed)
    packed = generator.integers(0, 2**32, (rows, math.ceil(cols / 8)), dtype=np.uint32).view(np.int32)
    scale = torch.from_numpy(generator.random((rows, math.ceil(cols / group)), dtype=np.float32)).to(
        torch.bfloat16
    )
    path = write_int4_weight(
        tmp_path_factory.mktemp("k") / "w.safetensors", torch.from_numpy(packed), scale, cols
    )
    got = run_kernel(Int4Pack(group), path)
    assert np.array_equal(got["m.weight"], ref_int4(packed, bits(scale), (rows, cols), group))


def run_kernel(fmt: Fp8Block | Int4Pack, path: Path) -> dict[str, np.ndarray]:
    reader, work = Reader(), Workspace()
    result = {}
    for out in fmt.plan(read_header(path), reader):
        chunks: list[bytes] = []

        def sink(data: memoryview, into: list[bytes] = chunks) -> None:
            into.append(bytes(data))

        fmt.produce(out, reader, work, Sink(sink))
        if out.kind != "copy":
            result[out.entry.name] = np.frombuffer(b"".join(chunks), np.uint16).reshape(out.entry.shape)
    reader.close()
    return result


# ---------------------------------------------------------------- the model directory


def test_output_is_a_complete_model_dir(fp8_src: Path, fp8_dst: Path) -> None:
    config = json.loads((fp8_dst / "config.json").read_text())
    source_config = json.loads((fp8_src / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {k: v for k, v in source_config.items() if k != "quantization_config"}
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (fp8_dst / name).read_bytes() == (fp8_src / name).read_bytes()
    index = json.loads((fp8_dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors(fp8_dst).values())
    marker = json.loads((fp8_dst / CAST_MARKER).read_text())
    assert marker["format"] == "fp8-block"
    assert marker["shards_written"] == len(set(index["weight_map"].values()))
    report = verify_checkpoint(fp8_dst, fp8_src)
    assert report.ok, report.problems
    assert report.tensors == len(index["weight_map"])


def test_transformers_loads_the_cast_model(fp8_dst: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(fp8_dst, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(model.get_parameter(name), tensors(fp8_dst)[name])


def test_bf16_checkpoint_is_linked_not_reencoded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    weights = {"a.weight": torch.randn(64, 48).to(torch.bfloat16), "b.bias": torch.randn(7)}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "bfloat16"}))
    (src / "tokenizer.json").write_text("{}")
    report = cast_checkpoint(src, tmp_path / "dst", progress=False)
    assert report.format == "bf16"
    assert (tmp_path / "dst" / "model.safetensors").samefile(src / "model.safetensors")
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == "{}"
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in weights.values())


# ---------------------------------------------------------------- resume


def run_cli(*args: str | Path, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, "-m", "ktflow", "cast", *map(str, args)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 MB of FP8 in ~40 shards: long enough to be killed mid-way."""
    dims = Dims(hidden=1024, inter=1536, moe_inter=512, experts=28, q_lora=256, kv_lora=128, layers=3)
    return write_fp8_release(tmp_path_factory.mktemp("big") / "src", dims, shard_bytes=3 << 20)


def test_resume_after_sigkill(big_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    process = run_cli(big_src, dst, "--workers", "1", "--no-progress")
    done_dir = dst / ".ktflow-cast" / "done"
    deadline = time.monotonic() + 120
    while not (done_dir.is_dir() and any(done_dir.glob("*.safetensors.json"))):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = {path.name.removesuffix(".json") for path in done_dir.glob("*.safetensors.json")}
    shards = set(json.loads((big_src / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert finished
    assert len(finished) < len(shards), "the kill must land mid-way"
    # Half-written: not complete, not loadable, and verify says so.
    assert not (dst / CAST_MARKER).exists()
    assert not (dst / "model.safetensors.index.json").exists()
    assert not verify_checkpoint(dst).ok
    check = run_cli("--verify", dst)
    assert check.wait() == 2
    assert "model.safetensors.index.json" in check.communicate()[1]
    inodes = {name: (dst / name).stat().st_ino for name in finished}

    rerun = run_cli(big_src, dst, "--workers", "2", "--no-progress")
    assert rerun.wait() == 0, rerun.communicate()
    marker = json.loads((dst / CAST_MARKER).read_text())
    assert marker["shards_skipped"] == len(finished)
    assert marker["shards_written"] == len(shards) - len(finished)
    assert {name: (dst / name).stat().st_ino for name in finished} == inodes  # kept, not rewritten
    fresh = cast_checkpoint(big_src, tmp_path / "fresh", progress=False)
    for name in shards:
        assert file_checksum(dst / name) == file_checksum(tmp_path / "fresh" / name), name
    assert fresh.peak_rss_bytes > 0


def test_rerun_rewrites_only_a_damaged_shard(fp8_src: Path, fp8_dst: Path, tmp_path: Path) -> None:
    dst = copy_tree(fp8_dst, tmp_path / "dst")
    again = cast_checkpoint(fp8_src, dst, progress=False)
    assert again.shards_written == 0  # complete and unchanged: nothing to do
    (dst / CAST_MARKER).unlink()  # what Snakemake does to a rule's output before rerunning it
    victim = sorted(dst.glob("*.safetensors"))[1]
    expected = file_checksum(victim)
    with open(victim, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\xff\xfe\xfd")
    report = cast_checkpoint(fp8_src, dst, progress=False)
    assert (report.shards_written, report.shards_skipped) == (1, len(list(dst.glob("*.safetensors"))) - 1)
    assert file_checksum(victim) == expected


def test_peak_rss_does_not_grow_with_shard_size(tmp_path: Path) -> None:
    """One 160 MB input shard (320 MB of output): a cast holding a shard or a tensor would show it."""
    dims = Dims(hidden=4096, inter=8192, moe_inter=1024, experts=8, q_lora=512, kv_lora=256, layers=2)
    src = write_fp8_release(tmp_path / "src", dims, shard_bytes=1 << 40, scales_apart=False)
    largest = max(path.stat().st_size for path in src.glob("*.safetensors"))
    assert largest > 150e6
    baseline = subprocess.run(
        [sys.executable, "-c", "import ktflow.cast.run as r, torch; print(r.peak_rss())"],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        capture_output=True,
        text=True,
        check=True,
    )
    assert run_cli(src, tmp_path / "dst", "--no-progress").wait() == 0
    peak = json.loads((tmp_path / "dst" / CAST_MARKER).read_text())["peak_rss_bytes"]
    assert peak - int(baseline.stdout) < 96 << 20, (peak, int(baseline.stdout), largest)


# ---------------------------------------------------------------- bad input


def rewrite_shard(src: Path, change: Any) -> None:
    """Rewrite every shard through ``change(name, tensors) -> tensors`` and fix the index."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(src / file, "pt") as handle:
            found = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        found = change(file, found)
        save_file(found, src / file, metadata={"format": "pt"})
        for name in [n for n, f in index["weight_map"].items() if f == file and n not in found]:
            del index["weight_map"][name]
    index_path.write_text(json.dumps(index))


def first_fp8(src: Path) -> tuple[str, str, str]:
    """(weight, its shard, its scale's shard) for a weight whose scale lives in another shard."""
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(
        n
        for n in sorted(weight_map)
        if f"{n}_scale_inv" in weight_map and weight_map[n] != weight_map[f"{n}_scale_inv"]
    )
    return name, weight_map[name], weight_map[f"{name}_scale_inv"]


def drop_scale(src: Path) -> tuple[str, str]:
    name, shard, _ = first_fp8(src)
    rewrite_shard(src, lambda f, t: {k: v for k, v in t.items() if k != f"{name}_scale_inv"})
    return shard, name


def bad_scale_shape(src: Path) -> tuple[str, str]:
    name, _, scale_shard = first_fp8(src)
    rewrite_shard(src, lambda f, t: t | {f"{name}_scale_inv": torch.ones(5, 5)} if f == scale_shard else t)
    return scale_shard, f"{name}_scale_inv"


def truncate(src: Path) -> tuple[str, str]:
    shard = "model-00003-of-00009.safetensors"
    slots = read_header(src / shard)
    last = max(slots.values(), key=lambda slot: slot.end)
    os.truncate(src / shard, last.end - 5)
    return shard, last.name


def garble_header(src: Path) -> tuple[str, str | None]:
    shard = "model-00002-of-00009.safetensors"
    with open(src / shard, "r+b") as handle:
        handle.seek(8)
        handle.write(b"\x00garbage{")
    return shard, None


def missing_shard(src: Path) -> tuple[str, str]:
    shard = "model-00004-of-00009.safetensors"
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    (src / shard).unlink()
    return "model.safetensors.index.json", next(n for n, f in weight_map.items() if f == shard)


def unknown_method(src: Path) -> tuple[str, str]:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (src / "config.json").write_text(json.dumps(config))
    return "config.json", "quantization_config.quant_method"


def huge_header(src: Path) -> tuple[str, str | None]:
    shard = "model-00005-of-00009.safetensors"
    with open(src / shard, "r+b") as handle:
        handle.write(struct.pack("<Q", 1 << 40))
    return shard, None


@pytest.mark.parametrize(
    "damage",
    [drop_scale, bad_scale_shape, truncate, garble_header, missing_shard, unknown_method, huge_header],
)
def test_bad_fp8_input_names_file_and_tensor(fp8_src: Path, tmp_path: Path, damage: Any) -> None:
    src = copy_tree(fp8_src, tmp_path / "src")
    file, field = damage(src)
    dst = tmp_path / "dst"
    with pytest.raises(KtflowInputError) as error:
        cast_checkpoint(src, dst, progress=False)
    assert Path(error.value.path or "").name == file, error.value
    assert error.value.field == field, error.value
    assert not dst.exists()  # refused before any work


def test_bad_int4_input(tmp_path: Path) -> None:
    src = write_int4_release(tmp_path / "src")
    module = "model.layers.1.mlp.experts.2.down_proj"
    rewrite_shard(src, lambda f, t: {k: v for k, v in t.items() if k != f"{module}.weight_shape"})
    with pytest.raises(KtflowInputError, match=r"missing .*weight_shape") as error:
        cast_checkpoint(src, tmp_path / "dst", progress=False)
    assert error.value.field == f"{module}.weight_packed"
    rewrite_shard(
        src,
        lambda f, t: (
            t | {f"{module}.weight_shape": torch.tensor([200, 100])}
            if any(k.startswith(module) for k in t)
            else t
        ),
    )
    with pytest.raises(KtflowInputError, match="weight_shape"):
        cast_checkpoint(src, tmp_path / "dst", progress=False)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"quantization_config": FP8_QUANT}, "int4 tensor"),
        ({"torch_dtype": "bfloat16"}, "declares no quantization"),
    ],
)
def test_config_must_match_the_tensors(tmp_path: Path, declared: dict[str, Any], message: str) -> None:
    src = write_int4_release(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config | declared))
    with pytest.raises(KtflowInputError, match=message) as error:
        cast_checkpoint(src, tmp_path / "dst", progress=False)
    assert (error.value.field or "").startswith("model.layers.1.mlp.experts.")


def test_cli_reports_one_line(fp8_src: Path, tmp_path: Path) -> None:
    src = copy_tree(fp8_src, tmp_path / "src")
    shard, name = drop_scale(src)
    process = run_cli(src, tmp_path / "dst")
    assert process.wait() == 2
    lines = process.communicate()[1].strip().splitlines()
    assert len(lines) == 1
    for part in (shard, name, "missing scale"):
        assert part in lines[0]


def test_refuses_a_foreign_destination(fp8_src: Path, tmp_path: Path) -> None:
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(KtflowInputError, match="not empty"):
        cast_checkpoint(fp8_src, tmp_path / "dst", progress=False)


def test_verify_finds_damage(fp8_src: Path, fp8_dst: Path, tmp_path: Path) -> None:
    dst = copy_tree(fp8_dst, tmp_path / "dst")
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text()) | {"quantization_config": FP8_QUANT}
    (dst / "config.json").write_text(json.dumps(config))
    problems = {(Path(p.path).name, p.field) for p in verify_checkpoint(dst, fp8_src).problems}
    assert ("config.json", "quantization_config") in problems
    assert ("model.safetensors.index.json", "metadata.total_size") in problems
    assert (dst.name, dropped) in problems  # missing from the output
    other = write_int4_release(tmp_path / "int4", Dims(moe_inter=64))
    assert any(
        "expected BF16" in p.message or "missing" in p.message
        for p in verify_checkpoint(fp8_dst, other).problems
    )
    ok = run_cli("--verify", fp8_dst, "--source", fp8_src)
    assert ok.wait() == 0, ok.communicate()


# ---------------------------------------------------------------- full disks (real tmpfs mounts)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount], check=False).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", mount], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", mount], check=True)


def test_not_enough_space_is_refused_up_front(fp8_src: Path, tmpfs: Path) -> None:
    with pytest.raises(KtflowInputError, match="not enough disk space"):
        cast_checkpoint(fp8_src, tmpfs / "dst", progress=False)
    assert not list((tmpfs / "dst").glob("*.safetensors"))


def test_disk_full_mid_cast_keeps_finished_shards(fp8_src: Path, fp8_dst: Path, tmpfs: Path) -> None:
    # Bytes suffice, inodes run out after a few shards: the writes themselves hit ENOSPC.
    remount(tmpfs, "size=64m,nr_inodes=20")
    dst = tmpfs / "dst"
    with pytest.raises(KtflowInputError, match="no space left on device") as error:
        cast_checkpoint(fp8_src, dst, progress=False)
    assert Path(error.value.path or "").parent == dst
    finished = sorted(dst.glob("*.safetensors"))
    assert finished
    assert not list(dst.glob(".*.partial"))
    for shard in finished:
        assert file_checksum(shard) == file_checksum(fp8_dst / shard.name)
    remount(tmpfs, "nr_inodes=1000")
    report = cast_checkpoint(fp8_src, dst, progress=False)
    assert report.shards_skipped == len(finished)
    assert report.verify.ok

"""Non-finite values stop a cast (issue 13, item 1), and ktflow's safetensors header reader refuses
every layout the safetensors library refuses (item 2)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import alias_tensor, rewrite_layout
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.synthetic_checkpoints import write_fp8_release, write_int4_release

from ktflow.cast import CAST_MARKER, cast_checkpoint, verify_checkpoint
from ktflow.cast.formats.base import Sink, Workspace
from ktflow.cast.formats.fp8_block import Fp8Block
from ktflow.cast.shards import Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import read_header

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_release(tmp_path_factory.mktemp("fp8") / "src")


def weight_map(src: Path) -> dict[str, str]:
    return dict(json.loads((src / INDEX).read_text())["weight_map"])


def poke(src: Path, name: str, change: Callable[[torch.Tensor], object]) -> Path:
    """Change tensor ``name`` in place in its shard (same dtype and shape); returns the shard."""
    shard = src / weight_map(src)[name]
    tensors = load_file(shard)
    change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def assert_nothing_published(dst: Path, shard: str) -> None:
    assert not (dst / CAST_MARKER).exists()
    assert not (dst / INDEX).exists()
    assert not (dst / shard).exists()
    assert not list(dst.glob(".*.partial"))


def refused(src: Path, tmp_path: Path, workers: int = 2) -> KtflowInputError:
    with pytest.raises(KtflowInputError) as caught:
        cast_checkpoint(src, tmp_path / "dst", workers=workers, progress=False)
    return caught.value


def test_nan_in_an_fp8_scale_is_refused_with_shard_tensor_and_count(fp8_src: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_src, tmp_path / "src"))
    scale = sorted(n for n in weight_map(src) if n.endswith("_scale_inv"))[0]

    def two_bad(t: torch.Tensor) -> None:
        t.view(-1)[0] = math.nan
        t.view(-1)[-1] = math.inf

    shard = poke(src, scale, two_bad)
    error = refused(src, tmp_path)
    numel = math.prod(load_file(shard)[scale].shape)
    assert (error.path, error.field) == (str(shard), scale)
    assert f"2 of {numel} scale values are NaN or Inf" in error.message
    assert_nothing_published(tmp_path / "dst", weight_map(src)[scale.removesuffix("_scale_inv")])


def test_nan_byte_in_an_fp8_weight_is_counted_over_the_whole_tensor(fp8_src: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_src, tmp_path / "src"))
    weight = next(n for n in sorted(weight_map(src)) if f"{n}_scale_inv" in weight_map(src))

    def nan_bytes(t: torch.Tensor) -> None:
        flat = t.view(torch.uint8).view(-1)
        flat[0], flat[flat.numel() // 2], flat[-1] = 0x7F, 0xFF, 0x7F

    shard = poke(src, weight, nan_bytes)
    error = refused(src, tmp_path, workers=1)
    assert (error.path, error.field) == (str(shard), weight)
    assert error.message.startswith("3 of ")
    assert_nothing_published(tmp_path / "dst", shard.name)


def test_inf_in_a_copied_tensor_is_refused(fp8_src: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(fp8_src, tmp_path / "src"))
    norm = next(n for n in sorted(weight_map(src)) if n.endswith("layernorm.weight"))
    shard = poke(src, norm, lambda t: t.view(-1).__setitem__(0, -math.inf))
    error = refused(src, tmp_path)
    assert (error.path, error.field) == (str(shard), norm)
    assert "1 of" in error.message and "BF16 values are NaN or Inf" in error.message


def test_nan_in_an_int4_scale_is_refused(tmp_path: Path) -> None:
    src = write_int4_release(tmp_path / "src")
    scale = sorted(n for n in weight_map(src) if n.endswith(".weight_scale"))[0]
    shard = poke(src, scale, lambda t: t.view(-1).__setitem__(3, math.nan))
    error = refused(src, tmp_path)
    assert (error.path, error.field) == (str(shard), scale)
    assert error.message.startswith("1 of ")


def test_a_scale_whose_products_overflow_bf16_is_refused(tmp_path: Path) -> None:
    weight = torch.full((4, 4), 448.0).to(torch.float8_e4m3fn)
    path = tmp_path / "w.safetensors"
    save_file({"w": weight, "w_scale_inv": torch.tensor([[1e37]])}, path)  # 448e37 > bf16 max
    fmt, reader = Fp8Block((128, 128)), Reader()
    (out,) = fmt.plan(read_header(path), reader)
    with pytest.raises(KtflowInputError, match="16 of 16 bf16 output") as caught:
        fmt.produce(out, reader, Workspace(), Sink(lambda data: None))
    assert caught.value.field == "w"


def test_verify_reads_values_and_finds_nan_in_an_output(fp8_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    cast_checkpoint(fp8_src, dst, progress=False)
    target = sorted(n for n in weight_map(dst) if not n.endswith("_scale_inv"))[0]
    poke(dst, target, lambda t: t.view(-1).__setitem__(1, math.nan))
    assert verify_checkpoint(dst).ok  # headers alone cannot see it
    (problem,) = verify_checkpoint(dst, values=True).problems
    assert problem.field == target and problem.message.startswith("1 of ")
    command = [sys.executable, "-m", "ktflow", "cast", "--verify", str(dst)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and target in done.stderr, done.stderr


# ---------------------------------------------------------------- headers: as strict as the library


def small_shard(path: Path) -> Path:
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(2, 3), "c": torch.arange(4.0)}, path)
    return path


def overlap(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return alias_tensor(header, body, "b", "a")


def gap(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    for entry in header.values():
        if "data_offsets" in entry:
            entry["data_offsets"] = [offset + 8 for offset in entry["data_offsets"]]
    return header, bytes(8) + body


def trailing(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return header, body + bytes(8)


def metadata_not_strings(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    return header | {"__metadata__": {"format": 1}}, body


def wrong_size(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    header["c"]["dtype"] = "F16"
    return header, body


@pytest.mark.parametrize("damage", [overlap, gap, trailing, metadata_not_strings, wrong_size])
def test_header_reader_refuses_what_the_library_refuses(tmp_path: Path, damage: Any) -> None:
    path = small_shard(tmp_path / "s.safetensors")
    rewrite_layout(path, damage)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the library's own error types vary by version
        safe_open(path, "pt")
    with pytest.raises(KtflowInputError) as caught:
        read_header(path)
    assert caught.value.path == str(path)


def test_header_reader_refuses_duplicate_keys(tmp_path: Path) -> None:
    path = small_shard(tmp_path / "s.safetensors")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + length].decode()
    entry = json.dumps({"dtype": "F32", "shape": [4], "data_offsets": json.loads(raw)["c"]["data_offsets"]})
    raw = raw.rstrip()[:-1] + f',"c":{entry}}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + data[8 + length :])
    with pytest.raises(KtflowInputError, match="appears twice"):
        read_header(path)


def test_header_reader_accepts_real_files_in_any_key_order(tmp_path: Path) -> None:
    path = small_shard(tmp_path / "s.safetensors")
    rewrite_layout(path, lambda header, body: (dict(reversed(header.items())), body))
    slots = read_header(path)
    assert [slots[n].nbytes for n in "abc"] == [24, 24, 16]
    with safe_open(path, "pt") as handle:
        assert torch.equal(handle.get_tensor("b"), torch.zeros(2, 3))

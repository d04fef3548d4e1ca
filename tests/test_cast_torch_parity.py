"""The numpy kernels of ``ktflow cast`` against the torch kernels they replaced (issue 16): the same
bf16 bits for every float8 code, every int4 nibble, any shape and block, and scales that are
subnormal, zero, negative, F32 / BF16 / F16, or large enough to overflow bf16. NaN payloads are not
compared (torch itself writes 0x7FC0 or 0xFFFF depending on its code path); a NaN or Inf output is
refused by both, and the refusal is checked too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from support import torch_kernels
from support.synthetic_checkpoints import write_int4_weight

from ktflow.cast.formats.base import Sink, Workspace
from ktflow.cast.formats.fp8_block import FP8_VALUES, Fp8Block
from ktflow.cast.formats.int4_pack import Int4Pack
from ktflow.cast.shards import Reader
from ktflow.errors import KtflowInputError
from ktflow.readers.safetensors_header import read_header

SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SCALES = st.sampled_from([1e-3, 0.5, 3.0, 200.0, 1e30, 1e38, 1e-40, 0.0, -2.0, 6e4])


def cast_bits(fmt: Fp8Block | Int4Pack, path: Path) -> tuple[np.ndarray, str | None]:
    """The bf16 bits of the one quantized tensor in ``path``, and the refusal message if any (the
    kernel streams every chunk before it refuses, so the bits are complete either way)."""
    reader, data = Reader(), bytearray()
    (out,) = [out for out in fmt.plan(read_header(path), reader) if out.kind != "copy"]
    try:
        fmt.produce(out, reader, Workspace(), Sink(data.extend))
        error = None
    except KtflowInputError as refused:
        error = refused.message
    finally:
        reader.close()
    return np.frombuffer(bytes(data), np.uint16).reshape(out.entry.shape), error


def assert_same_bits(got: np.ndarray, want: np.ndarray, error: str | None) -> None:
    nan_got = ((got & 0x7F80) == 0x7F80) & ((got & 0x7F) != 0)
    nan_want = ((want & 0x7F80) == 0x7F80) & ((want & 0x7F) != 0)
    assert np.array_equal(nan_got, nan_want)
    assert np.array_equal(got[~nan_got], want[~nan_want])
    assert (error is not None) == bool(((want & 0x7F80) == 0x7F80).any())


def test_fp8_code_table_is_torch_decoding() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(FP8_VALUES, codes)  # NaN codes compare equal to NaN


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    block=st.sampled_from([(128, 128), (64, 32), (1, 7), (100, 128)]),
    seed=st.integers(0, 2**31),
    scale=SCALES,
    nan=st.booleans(),
)
def test_fp8_kernel_matches_torch(
    tmp_path_factory: pytest.TempPathFactory,
    rows: int,
    cols: int,
    block: tuple[int, int],
    seed: int,
    scale: float,
    nan: bool,
) -> None:
    generator = np.random.default_rng(seed)
    raw = generator.integers(0, 256, (rows, cols), dtype=np.uint8)
    if not nan:
        raw[(raw & 0x7F) == 0x7F] ^= 1
    shape = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scales = torch.from_numpy(((generator.random(shape) + 0.5) * scale).astype(np.float32))
    path = tmp_path_factory.mktemp("fp8") / "w.safetensors"
    save_file({"w": torch.from_numpy(raw).view(torch.float8_e4m3fn), "w_scale_inv": scales}, path)
    got, error = cast_bits(Fp8Block(block), path)
    assert_same_bits(got, torch_kernels.fp8_block(raw, scales, block), error)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    group=st.sampled_from([8, 32, 64, 128]),
    seed=st.integers(0, 2**31),
    scale=SCALES,
    dtype=st.sampled_from(sorted(SCALE_DTYPES)),
)
def test_int4_kernel_matches_torch(
    tmp_path_factory: pytest.TempPathFactory,
    rows: int,
    cols: int,
    group: int,
    seed: int,
    scale: float,
    dtype: str,
) -> None:
    generator = np.random.default_rng(seed)
    packed = generator.integers(0, 2**32, (rows, math.ceil(cols / 8)), dtype=np.uint32).view(np.int32)
    values = (generator.random((rows, math.ceil(cols / group))) + 0.5) * scale
    scales = torch.from_numpy(values.astype(np.float32)).to(SCALE_DTYPES[dtype])
    if not bool(torch.isfinite(scales).all()):  # F16 / BF16 cannot hold this scale: refused elsewhere
        return
    path = write_int4_weight(
        tmp_path_factory.mktemp("int4") / "w.safetensors", torch.from_numpy(packed), scales, cols
    )
    got, error = cast_bits(Int4Pack(group), path)
    assert_same_bits(got, torch_kernels.int4_pack(packed, scales, cols, group), error)

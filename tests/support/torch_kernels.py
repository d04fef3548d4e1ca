"""The torch kernels ktflow cast used before it dropped torch (issue 16), kept as a test reference.

Same arithmetic as those kernels, without the chunking and buffers (every output element is one
float32 multiply, so chunking does not change a bit): FP8 widens float8 bits into float32 with the
2**-120 bias folded into the scale, INT4 unpacks nibbles with the int16 trick; both multiply in
float32 and let torch round to bf16.
"""

from __future__ import annotations

import numpy as np
import torch

FP8_BIAS = 2.0**120
FP8_SAFE_SCALE = 2.0**7


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def fp8_block(raw: np.ndarray, scale: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """bf16 bits of a float8_e4m3fn weight (uint8 codes) times its block scales."""
    rows, cols = raw.shape
    codes = torch.from_numpy(np.ascontiguousarray(raw))
    scale = scale.to(torch.float32)
    safe = scale.numel() == 0 or bool(scale.abs().max() < FP8_SAFE_SCALE)
    bias = FP8_BIAS if safe else 1.0
    has_nan = bool(((codes & 0x7F) == 0x7F).any())
    if bias == 1.0 or has_nan:
        values = codes.view(torch.float8_e4m3fn).to(torch.float32)
        if bias != 1.0:
            values.mul_(1.0 / bias)
    else:
        widened = codes.view(torch.int8).to(torch.int32)
        widened.bitwise_left_shift_(20)
        widened.bitwise_and_(0x87F00000 - (1 << 32))
        values = widened.view(torch.float32)
    per_block = (scale * bias).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    result = torch.empty(rows, cols, dtype=torch.bfloat16)
    torch.mul(values, per_block[:rows, :cols], out=result)
    return bits(result)


def int4_pack(packed: np.ndarray, scale: torch.Tensor, cols: int, group: int) -> np.ndarray:
    """bf16 bits of a pack-quantized int4 weight (int32 words, low nibble first) times its scales."""
    rows = packed.shape[0]
    raw = torch.from_numpy(np.ascontiguousarray(packed)).view(torch.uint8).reshape(-1)
    pairs = raw.to(torch.int32)
    pairs.add_(torch.bitwise_right_shift(pairs, 4), alpha=0xFFF0)
    values = pairs.view(torch.int16).sub_(8).to(torch.float32).view(rows, -1)
    wide = scale.to(torch.float32).repeat_interleave(group, dim=1)
    result = torch.empty(rows, cols, dtype=torch.bfloat16)
    torch.mul(values[:, :cols], wide[:, :cols], out=result)
    return bits(result)

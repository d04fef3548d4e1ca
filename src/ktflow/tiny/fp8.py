"""FP8 block quantization in DeepSeek-V3's release format (the inverse of the cast step).

Each weight W (M x N) becomes float8_e4m3fn Q plus a float32 ``weight_scale_inv`` S of
shape (ceil(M/128), ceil(N/128)) such that W ~= Q * S blockwise.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def block_amax(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.abs().float()
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    return tiles.amax(dim=(1, 3))


def quantize_fp8_block(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (float8 weight, float32 scale_inv) for a 2-D weight."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    scale = (block_amax(weight, block) / FP8_MAX).clamp(min=1e-12)
    rows, cols = weight.shape
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    quantized = (weight.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale.contiguous()


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """Which tensors DeepSeek-V3 ships in FP8: projection matrices, not norms, embeddings or routers."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    excluded = ("embed_tokens", "lm_head", "norm", ".mlp.gate.weight")
    return not any(part in name for part in excluded)

"""RoPE cos/sin tables (docs/numerics.md §3.2): fp32 ``[max_pos, rope_dim]`` rows ``[cos θ_0..θ_{r/2-1} | sin ...]``.

Plain θ (SWA-only layers) and YaRN (compressed layers; mscale 1, so only frequencies change).
Angles are computed in float64 and rounded once to the table dtype, which is at least as accurate
as vLLM's fp32 ``outer(t, inv_freq)`` (whose angle error grows with the position).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import DSv4AttentionConfig, YarnConfig


def yarn_correction_range(rope_dim: int, base: float, yarn: YarnConfig) -> tuple[int, int]:
    """(low, high) pair indices of the YaRN ramp: 15 and 25 for rope_dim 64, base 160000."""

    def dim_for(num_rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(base)
        )

    low = max(math.floor(dim_for(yarn.beta_fast)), 0)
    high = min(math.ceil(dim_for(yarn.beta_slow)), rope_dim - 1)
    return low, high


def inv_freq(rope_dim: int, base: float, yarn: Optional[YarnConfig] = None) -> torch.Tensor:
    """float64 ``[rope_dim // 2]`` inverse frequencies ``base^(-2i/rope_dim)``, YaRN-blended if given."""
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    i = torch.arange(rope_dim // 2, dtype=torch.float64)
    freq = base ** (-2.0 * i / rope_dim)
    if yarn is not None:
        low, high = yarn_correction_range(rope_dim, base, yarn)
        span = (high - low) if high > low else 0.001
        ramp = ((i - low) / span).clamp(0.0, 1.0)
        freq = freq / yarn.factor * ramp + freq * (1.0 - ramp)
    return freq


def cos_sin_cache(
    rope_dim: int,
    max_pos: int,
    base: float,
    yarn: Optional[YarnConfig] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``[max_pos, rope_dim]`` table, row p = ``[cos(p·f_0) .. cos(p·f_{r/2-1}) | sin(...)]``."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"cos/sin tables are fp32 or bf16, got {dtype}")
    if max_pos <= 0:
        raise ValueError(f"max_pos must be positive, got {max_pos}")
    freq = inv_freq(rope_dim, base, yarn)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), freq)
    table = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return table.to(dtype=dtype, device=device)


def layer_cos_sin_cache(
    config: DSv4AttentionConfig,
    layer: int,
    max_pos: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The table a layer uses for q, kv, compressor, indexer and the output inverse RoPE."""
    base, yarn = config.layer_rope(layer)
    return cos_sin_cache(
        config.qk_rope_head_dim, max_pos or config.max_position_embeddings, base, yarn, dtype, device
    )

"""The lightning indexer's query path (docs/numerics.md §7.1): RoPE → [Hadamard] → quant → weights."""

from __future__ import annotations

import torch

from .. import layouts
from .quant import fp8_block_quant, mxfp4_quant
from .rope import hadamard as _hadamard
from .rope import rope


def _rotated(q, positions, cos_sin_cache, hadamard: bool):
    y = rope(q, positions, cos_sin_cache)  # fp32 math, rounded to q.dtype before any amax
    if hadamard:
        y = _hadamard(y, q.shape[-1] ** -0.5)  # reference-faithful mode: rounded to q.dtype again
    return y


def indexer_q_rope_fp8(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False):
    """``(q_fp8 e4m3 [T,H,D], weights_out fp32 [T,H])``; one UE8M0 block per (token, head).

    ``weights_out = weights.float() · weight_scale · q_scale``: the per-(token, head) q scale is not
    returned, it is folded into the weights (legal because ReLU is positively homogeneous).
    """
    y = _rotated(q, positions, cos_sin_cache, hadamard)
    q_fp8, q_scale = fp8_block_quant(y, q.shape[-1], layouts.FP8_AMAX_FLOOR)
    w = weights.to(torch.float32) * weight_scale * q_scale[..., 0]
    return q_fp8, w.contiguous()


def indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False):
    """``(packed uint8 [T,H,D/2], scale uint8 [T,H,D/32], weights_out fp32 [T,H])``.

    ``weights_out = weights.float() · weight_scale`` (the per-block q scales stay in ``scale``).
    """
    y = _rotated(q, positions, cos_sin_cache, hadamard)
    packed, scale = mxfp4_quant(y)
    w = weights.to(torch.float32) * weight_scale
    return packed, scale, w.contiguous()

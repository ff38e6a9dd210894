"""Output-path kernel: inverse RoPE → bf16 → FP8 e4m3 UE8M0 quant in 128-element blocks (docs/numerics.md §8.3).

One program handles ``BT`` tokens × ``BLOCK_H`` heads: every head row (512 bf16) is read once as
8 rows of 64, the last row is rotated by −θ in fp32 and rounded to bf16 (``ROUND_BF16``; without it
the fp32 rotation is quantized, vLLM's bytes), the 4 blocks of 128 are quantized, and the e4m3
bytes and fp32 scales are written once, straight into the DeepGEMM layout (``o_fp8`` storage
``[G, T, D]``, scale storage ``[G, D/128, T_al]``). The grid covers ``T_al`` tokens: programs past
``T`` write the zero padding rows of the scale and nothing else. Bit-exact with
``reference.inv_rope_fp8_quant``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from ...reference import output as _ref_output
from ._common import FP8_MAX, FP8_MAX_EXP, FP8_MAX_MANT, LAUNCH_OPTS, cdiv, ceil_log2_ratio, next_pow2, pdl_enter, pow2
from ._launch import prebound
from .cache import load_cos_sin, rope_last_row

AMAX_FLOOR = tl.constexpr(layouts.INV_ROPE_AMAX_FLOOR)
HEAD_DIM = tl.constexpr(layouts.KV_HEAD_DIM)  # 512
ROPE_DIM = tl.constexpr(layouts.ROPE_DIM)  # 64: the rotated tail, one row of the [8, 64] head view
QBLOCK = tl.constexpr(layouts.O_PROJ_QUANT_BLOCK)  # 128


@prebound
@triton.jit
def _inv_rope_fp8_quant_kernel(
    o_ptr, pos_ptr, cs_ptr, q_ptr, s_ptr,
    T, T_AL, H, max_pos, cs_stride, o_stride_t, o_stride_h,
    HPG: tl.constexpr, BT: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # rows = (token, head) pairs of this program; each row is one 512-d head as [8, 64]
    pdl_enter(PDL)
    ROWS: tl.constexpr = BT * BLOCK_H
    NR: tl.constexpr = HEAD_DIM // ROPE_DIM  # 8 rows of 64, the last one rotated
    NQ: tl.constexpr = HEAD_DIM // QBLOCK  # 4 quant blocks per head
    D: tl.constexpr = HPG * HEAD_DIM  # elements per (token, group)
    NB: tl.constexpr = HPG * NQ  # quant blocks per (token, group)
    i = tl.arange(0, ROWS)
    t = tl.program_id(0) * BT + i // BLOCK_H
    h = tl.program_id(1) * BLOCK_H + i % BLOCK_H
    h_ok = h < H
    ok = (t < T) & h_ok
    pos = tl.load(pos_ptr + t, mask=ok, other=0)
    cos, sin = load_cos_sin(cs_ptr, pos, ok, max_pos, cs_stride)  # [ROWS, 32]
    rr = tl.arange(0, NR)
    cr = tl.arange(0, ROPE_DIM)
    src = t.to(tl.int64) * o_stride_t + h.to(tl.int64) * o_stride_h
    x = tl.load(o_ptr + src[:, None, None] + (rr * ROPE_DIM)[None, :, None] + cr[None, None, :],
                mask=ok[:, None, None], other=0.0)
    # inverse rotation (sin → −sin) of the last 64 dims, rounded to bf16 before any amax
    # (docs/numerics.md §3.3), or left in fp32 (vLLM's bytes)
    y = rope_last_row(x.to(tl.float32), cos, -sin, NR, ROWS)
    if ROUND_BF16:
        y = y.to(o_ptr.dtype.element_ty).to(tl.float32)
    y = tl.reshape(y, [ROWS, NQ, QBLOCK])
    amax = tl.maximum(tl.max(tl.abs(y), axis=2), AMAX_FLOOR)  # [ROWS, 4]
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
    v = tl.clamp(y * pow2(-e)[:, :, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)

    g = (h // HPG).to(tl.int64)
    hl = h % HPG  # head within its group
    rq = tl.arange(0, NQ)
    cq = tl.arange(0, QBLOCK)
    dst = (g * T + t) * D + hl * HEAD_DIM
    tl.store(q_ptr + dst[:, None, None] + (rq * QBLOCK)[None, :, None] + cq[None, None, :], v,
             mask=ok[:, None, None])
    # scale[g, t, hl·4 + r] at g·NB·T_al + (hl·4 + r)·T_al + t; padding tokens get 0
    s_off = g[:, None] * (NB * T_AL) + (hl * NQ)[:, None] * T_AL + (rq * T_AL)[None, :] + t[:, None]
    s = tl.where(ok[:, None], pow2(e), 0.0)
    tl.store(s_ptr + s_off, s, mask=((t < T_AL) & h_ok)[:, None])


def _launch_shape(n_tokens: int, n_heads: int) -> tuple[int, int]:
    """(tokens per program, heads per program): 8 head rows (8 KiB of bf16) per program; several
    tokens per program only for large batches (fewer, fuller scale stores)."""
    bt = 4 if n_tokens >= 1024 else 1
    return bt, max(1, min(next_pow2(n_heads), 8 // bt))


def inv_rope_fp8_quant(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, n_groups: int,
                       round_rope_bf16: bool = True, bt=None, block_h=None, num_warps=None):
    t, h, d = o.shape
    o_fp8, scale = _ref_output.empty_outputs(t, h, d, n_groups, o.device, zero_scale_padding=False)
    t_al = _ref_output.scale_rows(t)
    if t_al == 0 or h == 0:
        return o_fp8, scale
    if o.stride(-1) != 1:
        o = o.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    d_bt, d_bh = _launch_shape(t, h)
    bt, block_h = bt or d_bt, block_h or d_bh
    grid = (cdiv(t_al, bt), cdiv(h, block_h))
    _inv_rope_fp8_quant_kernel[grid](
        o, positions, cs, o_fp8, scale,
        t, t_al, h, cs.shape[0], cs.stride(0), o.stride(0), o.stride(1),
        HPG=h // n_groups, BT=bt, BLOCK_H=block_h, ROUND_BF16=bool(round_rope_bf16), num_warps=num_warps or 4,
        **LAUNCH_OPTS,
    )
    return o_fp8, scale

"""Fused lightning-indexer query kernel: RoPE → round → [Hadamard → round] → FP8 or MXFP4 → weights.

One program handles ``BLOCK_H`` heads of one token: the ``[BLOCK_H, D]`` tile is read once with
vector loads, rotated as (even, odd) pairs in registers, quantized, and written once; the weights
row is scaled in the same program. Bit-exact with ``reference.indexer_q_rope_{fp8,mxfp4}``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from ._common import (FP8_MAX, FP8_MAX_EXP, FP8_MAX_MANT, LAUNCH_OPTS, cdiv, ceil_log2_ratio, fwht, next_pow2,
                      pdl_enter, pow2, rope_pairs, use_hw_e2m1)
from ._launch import prebound
from .primitives import mxfp4_block

FP8_AMAX_FLOOR = tl.constexpr(layouts.FP8_AMAX_FLOOR)


@prebound
@triton.jit
def _indexer_q_kernel(
    q_ptr, pos_ptr, cs_ptr, w_ptr,
    out_ptr, scale_ptr, w_out_ptr,
    H, max_pos, cs_stride, q_stride_t, q_stride_h, w_stride_t, w_stride_h,
    weight_scale, hadamard_scale,
    D: tl.constexpr, ROT: tl.constexpr, BLOCK_H: tl.constexpr,
    HADAMARD: tl.constexpr, LOG2_D: tl.constexpr, MXFP4: tl.constexpr, HW_E2M1: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    cols = tl.arange(0, D)
    q_off = t.to(tl.int64) * q_stride_t + heads.to(tl.int64)[:, None] * q_stride_h + cols[None, :]
    x_raw = tl.load(q_ptr + q_off, mask=h_ok[:, None], other=0.0)
    x = x_raw.to(tl.float32)

    # RoPE on the trailing ROT dims, as (even, odd) pairs; other pairs pass through untouched.
    pos = tl.load(pos_ptr + t).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < max_pos)
    NOPE_PAIRS: tl.constexpr = (D - ROT) // 2
    HALF: tl.constexpr = ROT // 2
    pairs = tl.arange(0, D // 2)
    is_rot = pairs >= NOPE_PAIRS
    i = tl.where(is_rot, pairs - NOPE_PAIRS, 0)
    # Out-of-range positions never read outside the table.
    cs_row = cs_ptr + tl.where(pos_ok, pos, 0) * cs_stride
    # an out-of-range position (host checks bypassed) rotates by NaN: never a plausible value
    c = tl.where(pos_ok, tl.load(cs_row + i, mask=is_rot, other=0.0).to(tl.float32), float("nan"))
    s = tl.where(pos_ok, tl.load(cs_row + HALF + i, mask=is_rot, other=0.0).to(tl.float32), float("nan"))
    xe, xo = tl.split(tl.reshape(x, [BLOCK_H, D // 2, 2]))
    oe, oo = rope_pairs(xe, xo, c[None, :], s[None, :])
    # Round the rotated values to the input dtype before any amax (docs/numerics.md §3.3).
    oe = tl.where(is_rot[None, :], oe.to(q_ptr.dtype.element_ty).to(tl.float32), xe)
    oo = tl.where(is_rot[None, :], oo.to(q_ptr.dtype.element_ty).to(tl.float32), xo)
    y = tl.reshape(tl.join(oe, oo), [BLOCK_H, D])
    if HADAMARD:
        y = fwht(y, BLOCK_H, D, LOG2_D) * hadamard_scale
        y = y.to(q_ptr.dtype.element_ty).to(tl.float32)

    w = tl.load(w_ptr + t.to(tl.int64) * w_stride_t + heads * w_stride_h, mask=h_ok, other=0.0).to(tl.float32)
    w = w * weight_scale
    row = t.to(tl.int64) * H + heads.to(tl.int64)
    if MXFP4:
        NB: tl.constexpr = D // 32
        packed, sbyte = mxfp4_block(tl.reshape(y, [BLOCK_H * NB, 32]), BLOCK_H * NB, HW_E2M1)
        packed = tl.reshape(packed, [BLOCK_H, D // 2])
        sbyte = tl.reshape(sbyte, [BLOCK_H, NB])
        pc = tl.arange(0, D // 2)
        tl.store(out_ptr + row[:, None] * (D // 2) + pc[None, :], packed, mask=h_ok[:, None])
        sc = tl.arange(0, NB)
        tl.store(scale_ptr + row[:, None] * NB + sc[None, :], sbyte, mask=h_ok[:, None])
        tl.store(w_out_ptr + row, w, mask=h_ok)
    else:
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), FP8_AMAX_FLOOR)
        e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
        v = tl.clamp(y * pow2(-e)[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + row[:, None] * D + cols[None, :], v.to(tl.float8e4nv), mask=h_ok[:, None])
        tl.store(w_out_ptr + row, w * pow2(e), mask=h_ok)


def _block_h(n_tokens: int, n_heads: int, head_dim: int) -> int:
    # Measured on an H100 (benchmarks/indexer_q.py --sweep, D=128): 4 heads per program for a few
    # tokens (more programs in flight), 8 up to ~1k tokens, 32 (8 KiB of q) for large batches.
    elems = 512 if n_tokens < 64 else (1024 if n_tokens < 1024 else 4096)
    return min(next_pow2(n_heads), max(1, elems // head_dim))


def _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, mxfp4, out, scale, w_out, block_h=None,
            num_warps=None):
    t, h, d = q.shape
    if t == 0 or h == 0:
        return
    if q.stride(-1) != 1:
        q = q.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    block_h = block_h or _block_h(t, h, d)
    grid = (t, cdiv(h, block_h))
    _indexer_q_kernel[grid](
        q, positions, cs, weights, out, scale, w_out,
        h, cs.shape[0], cs.stride(0), q.stride(0), q.stride(1), weights.stride(0), weights.stride(1),
        weight_scale, d**-0.5,
        D=d, ROT=cs.shape[-1], BLOCK_H=block_h, HADAMARD=hadamard, LOG2_D=d.bit_length() - 1,
        MXFP4=mxfp4, HW_E2M1=mxfp4 and use_hw_e2m1(q.device),
        num_warps=num_warps or 4, **LAUNCH_OPTS,
    )


def indexer_q_rope_fp8(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False, block_h=None,
                       num_warps=None):
    t, h, d = q.shape
    q_fp8 = torch.empty((t, h, d), dtype=torch.float8_e4m3fn, device=q.device)
    w_out = torch.empty((t, h), dtype=torch.float32, device=q.device)
    _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, False, q_fp8, w_out, w_out, block_h, num_warps)
    return q_fp8, w_out


def indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False,
                         block_h=None, num_warps=None):
    t, h, d = q.shape
    packed = torch.empty((t, h, d // 2), dtype=torch.uint8, device=q.device)
    scale = torch.empty((t, h, d // layouts.MXFP4_BLOCK), dtype=torch.uint8, device=q.device)
    w_out = torch.empty((t, h), dtype=torch.float32, device=q.device)
    _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, True, packed, scale, w_out, block_h, num_warps)
    return packed, scale, w_out

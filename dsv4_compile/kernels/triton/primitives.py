"""Triton kernels for the primitive ops: rope, hadamard, fp8_block_quant, mxfp4_quant.

Launchers take validated inputs (the ops validate) and return fresh contiguous outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from .. import _device
from ._common import (E2M1_MAX_EXP, E2M1_MAX_MANT, LAUNCH_OPTS, cdiv, ceil_log2_ratio, e2m1_code_sw, e2m1x2_hw,
                      fp8_quant_rows, fwht, next_pow2, pdl_enter, pow2, rope_pairs, use_hw_e2m1)
from ._launch import prebound

E2M1_MAX = tl.constexpr(layouts.E2M1_MAX)
MXFP4_AMAX_FLOOR = tl.constexpr(layouts.MXFP4_AMAX_FLOOR)
MXFP4_EXP_MIN = tl.constexpr(layouts.MXFP4_EXP_MIN)
MXFP4_EXP_MAX = tl.constexpr(layouts.MXFP4_EXP_MAX)


# ---------------------------------------------------------------------------------------------
# rope
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, cs_ptr,
    n_rows, rows_per_token, max_pos, cs_stride,
    D: tl.constexpr, ROT: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # rows of x viewed [T * M, D]; each row's token is row // M. Pairs j cover all D/2 pairs.
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    row_ok = rows < n_rows
    pos = tl.load(pos_ptr + rows // rows_per_token, mask=row_ok, other=0).to(tl.int64)
    pos_ok = row_ok & (pos >= 0) & (pos < max_pos)
    NOPE_PAIRS: tl.constexpr = (D - ROT) // 2
    HALF: tl.constexpr = ROT // 2
    is_rot = (pairs >= NOPE_PAIRS) & (pairs < D // 2)
    i = tl.where(is_rot, pairs - NOPE_PAIRS, 0)
    cs_off = pos[:, None] * cs_stride + i[None, :]
    cs_mask = pos_ok[:, None] & is_rot[None, :]
    # an out-of-range position (host checks bypassed) reads nothing and rotates by NaN: never a
    # plausible value (its rotated dims come out NaN)
    c = tl.where(pos_ok[:, None], tl.load(cs_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32), float("nan"))
    s = tl.where(pos_ok[:, None], tl.load(cs_ptr + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32),
                 float("nan"))
    if INVERSE:
        s = -s
    # contiguous [BLOCK_R, 2 * BLOCK_P] loads and stores, split into (even, odd) pairs in registers
    cols = tl.arange(0, 2 * BLOCK_P)
    base = rows.to(tl.int64)[:, None] * D + cols[None, :]
    m = row_ok[:, None] & (cols < D)[None, :]
    x_raw = tl.load(x_ptr + base, mask=m, other=0.0)
    xe_raw, xo_raw = tl.split(tl.reshape(x_raw, (BLOCK_R, BLOCK_P, 2)))
    oe, oo = rope_pairs(xe_raw.to(tl.float32), xo_raw.to(tl.float32), c, s)
    rot2 = is_rot[None, :]
    oe = tl.where(rot2, oe.to(out_ptr.dtype.element_ty), xe_raw)
    oo = tl.where(rot2, oo.to(out_ptr.dtype.element_ty), xo_raw)
    tl.store(out_ptr + base, tl.reshape(tl.join(oe, oo), (BLOCK_R, 2 * BLOCK_P)), mask=m)


def _target_programs(device: torch.device) -> int:
    return 4 * _device.sm_count(_device.index(device)) if device.type == "cuda" else 64


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    x = x.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    if n_rows == 0:
        return out
    rows_per_token = n_rows // x.shape[0]
    block_p = next_pow2(d // 2)
    # enough programs to spread a small batch over the SMs (64 heads of one token: 64 programs)
    block_r = max(1, min(64, 4096 // block_p, next_pow2(cdiv(n_rows, _target_programs(x.device)))))
    grid = (cdiv(n_rows, block_r),)
    _rope_kernel[grid](
        x, out, positions, cs, n_rows, rows_per_token, cs.shape[0], cs.stride(0),
        D=d, ROT=cs.shape[-1], INVERSE=inverse, BLOCK_R=block_r, BLOCK_P=block_p, **LAUNCH_OPTS,
    )
    return out


# ---------------------------------------------------------------------------------------------
# hadamard
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, n_rows, scale, D: tl.constexpr, LOG2_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D)
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    m = (rows < n_rows)[:, None]
    y = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = fwht(y, BLOCK_R, D, LOG2_D) * scale
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


def hadamard(x: torch.Tensor, scale: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    if n_rows == 0:
        return out
    block_r = max(1, min(16, 2048 // d))
    _hadamard_kernel[(cdiv(n_rows, block_r),)](
        x, out, n_rows, scale, D=d, LOG2_D=d.bit_length() - 1, BLOCK_R=block_r, **LAUNCH_OPTS
    )
    return out


# ---------------------------------------------------------------------------------------------
# fp8_block_quant: x viewed as [G, block] groups (each block independent)
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _fp8_block_quant_kernel(
    x_ptr, q_ptr, s_ptr, n_groups, amax_floor,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    k = tl.arange(0, BLOCK_B)
    g_ok = g < n_groups
    m = g_ok[:, None] & (k < BLOCK)[None, :]
    off = g.to(tl.int64)[:, None] * BLOCK + k[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    q, scale = fp8_quant_rows(x, amax_floor)
    tl.store(q_ptr + off, q, mask=m)
    tl.store(s_ptr + g, scale, mask=g_ok)


def fp8_block_quant(x: torch.Tensor, block: int, scale_floor: float):
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(x.shape[:-1] + (x.shape[-1] // block,), dtype=torch.float32, device=x.device)
    n_groups = s.numel()
    if n_groups == 0:
        return q, s
    block_b = next_pow2(block)
    block_g = max(1, 4096 // block_b)
    _fp8_block_quant_kernel[(cdiv(n_groups, block_g),)](
        x, q, s, n_groups, scale_floor, BLOCK=block, BLOCK_B=block_b, BLOCK_G=block_g, **LAUNCH_OPTS
    )
    return q, s


# ---------------------------------------------------------------------------------------------
# mxfp4_quant: groups of 32 elements -> 16 packed bytes + 1 scale byte
# ---------------------------------------------------------------------------------------------
@triton.jit
def mxfp4_block(x, ROWS: tl.constexpr, HW_E2M1: tl.constexpr):
    """MXFP4 of fp32 ``x [ROWS, 32]``: (packed uint8 [ROWS, 16], scale byte uint8 [ROWS]); a block
    holding a NaN gets the E8M0 NaN scale byte 0xFF (E2M1 has no NaN)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), MXFP4_AMAX_FLOOR)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    e = ceil_log2_ratio(amax, E2M1_MAX_EXP, E2M1_MAX_MANT)
    e = tl.minimum(tl.maximum(e, MXFP4_EXP_MIN), MXFP4_EXP_MAX)
    v = tl.clamp(x * pow2(-e)[:, None], -E2M1_MAX, E2M1_MAX)
    lo, hi = tl.split(tl.reshape(v, [ROWS, 16, 2]))
    if HW_E2M1:
        packed = e2m1x2_hw(lo, hi).to(tl.uint8)
    else:
        packed = (e2m1_code_sw(lo) | (e2m1_code_sw(hi) << 4)).to(tl.uint8)
    return packed, tl.where(has_nan, 255, e + 127).to(tl.uint8)


@prebound
@triton.jit
def _mxfp4_quant_kernel(x_ptr, p_ptr, s_ptr, n_groups, BLOCK_G: tl.constexpr, HW_E2M1: tl.constexpr,
                        PDL: tl.constexpr = False):
    pdl_enter(PDL)
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < n_groups
    k = tl.arange(0, 32)
    x = tl.load(x_ptr + g.to(tl.int64)[:, None] * 32 + k[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    packed, sbyte = mxfp4_block(x, BLOCK_G, HW_E2M1)
    j = tl.arange(0, 16)
    tl.store(p_ptr + g.to(tl.int64)[:, None] * 16 + j[None, :], packed, mask=g_ok[:, None])
    tl.store(s_ptr + g, sbyte, mask=g_ok)


def mxfp4_quant(x: torch.Tensor):
    x = x.contiguous()
    d = x.shape[-1]
    packed = torch.empty(x.shape[:-1] + (d // 2,), dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[:-1] + (d // layouts.MXFP4_BLOCK,), dtype=torch.uint8, device=x.device)
    n_groups = scale.numel()
    if n_groups == 0:
        return packed, scale
    block_g = 64
    _mxfp4_quant_kernel[(cdiv(n_groups, block_g),)](
        x, packed, scale, n_groups, BLOCK_G=block_g, HW_E2M1=use_hw_e2m1(x.device), **LAUNCH_OPTS
    )
    return packed, scale

"""Triton kernels for the paged cache ops: record encoders (``store_*``), inserts and gathers.

Every kernel takes the cache as a ``uint8`` pointer plus its page stride, masks slots that are −1
or past the cache (never a byte outside the cache), and writes exactly the record bytes of
``dsv4_compile.reference.cache``. Launched with ``enable_fp_fusion=False`` (bit-exactness).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from ._common import (FP8_MAX, FP8_MAX_EXP, FP8_MAX_MANT, LAUNCH_OPTS, cdiv, ceil_log2_ratio, pdl_enter, pow2,
                      rope_pairs, use_hw_e2m1)
from ._launch import prebound
from .primitives import mxfp4_block

AMAX_FLOOR = tl.constexpr(layouts.FP8_AMAX_FLOOR)
TOKEN_BYTES = tl.constexpr(layouts.FP8_DS_MLA_TOKEN_BYTES)  # 576
SCALE_BYTES = tl.constexpr(layouts.FP8_DS_MLA_SCALE_BYTES)  # 8
NOPE_BLOCKS = tl.constexpr(layouts.KV_NOPE_BLOCKS)  # 7


# ---------------------------------------------------------------------------------------------
# jit helpers shared with the compressor kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def slot_address(slot_ptr, t, t_ok, capacity, page_stride, BS: tl.constexpr):
    """(ok, page byte offset int64, in-page index) of the slots of tokens ``t``."""
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
    ok = t_ok & (slot >= 0) & (slot < capacity)
    slot = tl.where(ok, slot, 0)
    return ok, (slot // BS) * page_stride, slot % BS


@triton.jit
def rope_last_row(x3, c, s, NR: tl.constexpr, BT: tl.constexpr):
    """Rotate the last of the ``NR`` 64-wide rows of fp32 ``x3 [BT, NR, 64]`` (GPT-J pairs) by
    ``c, s [BT, 32]``; the other rows pass through."""
    xe, xo = tl.split(tl.reshape(x3, [BT, NR, 32, 2]))
    oe, oo = rope_pairs(xe, xo, c[:, None, :], s[:, None, :])
    rot = tl.reshape(tl.join(oe, oo), [BT, NR, 64])
    last = (tl.arange(0, NR) == NR - 1)[None, :, None]
    return tl.where(last, rot, x3)


@triton.jit
def load_cos_sin(cs_ptr, pos, ok, max_pos, cs_stride):
    """``(cos, sin) [BT, 32]`` fp32 rows of the table at ``pos``; NaN where ``pos`` is not a row of the
    table (host checks bypassed): the rotated dims come out NaN, never a plausible value, and nothing
    outside the table is read."""
    pos_ok = ok & (pos >= 0) & (pos < max_pos)
    j = tl.arange(0, 32)
    off = pos.to(tl.int64)[:, None] * cs_stride + j[None, :]
    c = tl.load(cs_ptr + off, mask=pos_ok[:, None], other=float("nan")).to(tl.float32)
    s = tl.load(cs_ptr + off + 32, mask=pos_ok[:, None], other=float("nan")).to(tl.float32)
    return c, s


@triton.jit
def store_bytes_of_u32(ptr, off, v, ok, BT: tl.constexpr):
    """Store the 4 little-endian bytes of 32-bit ``v [BT]`` at ``ptr + off [BT] + 0..3``."""
    b = tl.arange(0, 4)
    bits = v.to(tl.int32, bitcast=True)
    byte = ((bits[:, None] >> (8 * b[None, :])) & 0xFF).to(tl.uint8)
    tl.store(ptr + off[:, None] + b[None, :], byte, mask=ok[:, None])


@triton.jit
def store_fp8_ds_mla(cache_ptr, page_off, k, ok, nope3, rope, BS: tl.constexpr, BT: tl.constexpr):
    """Write the fp8_ds_mla record: ``nope3 [BT, 8, 64]`` (rows 0-6 = the 448 nope dims, row 7
    ignored) and the bf16 ``rope [BT, 64]``."""
    r = tl.arange(0, 8)
    c = tl.arange(0, 64)
    xf = nope3.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xf), axis=2), AMAX_FLOOR)
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)  # [BT, 8]
    q = tl.clamp(xf * pow2(-e)[:, :, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    base = page_off + k * TOKEN_BYTES  # [BT]
    nope = ok[:, None, None] & (r < NOPE_BLOCKS)[None, :, None]
    tl.store(cache_ptr + base[:, None, None] + (r * 64)[None, :, None] + c[None, None, :], q, mask=nope)
    # rope: 64 bf16 values through a bf16 view of the record (the ops keep pages 2-byte aligned)
    rope_ptr = (cache_ptr + base + NOPE_BLOCKS * 64).to(tl.pointer_type(tl.bfloat16))
    tl.store(rope_ptr[:, None] + c[None, :], rope.to(tl.bfloat16), mask=ok[:, None])
    # scale record: 7 exponent bytes + one 0 pad byte
    ebyte = tl.where((r < NOPE_BLOCKS)[None, :], e + 127, 0).to(tl.uint8)
    soff = page_off + BS * TOKEN_BYTES + k * SCALE_BYTES
    tl.store(cache_ptr + soff[:, None] + r[None, :], ebyte, mask=ok[:, None])


@triton.jit
def store_indexer_fp8(cache_ptr, page_off, k, ok, x, BS: tl.constexpr, BT: tl.constexpr):
    """128 e4m3 bytes at ``k·128`` + the fp32 scale at ``BS·128 + k·4`` for fp32 ``x [BT, 128]``."""
    d = tl.arange(0, 128)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
    q = tl.clamp(x * pow2(-e)[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(cache_ptr + (page_off + k * 128)[:, None] + d[None, :], q, mask=ok[:, None])
    store_bytes_of_u32(cache_ptr, page_off + BS * 128 + k * 4, pow2(e), ok, BT)


@triton.jit
def store_indexer_mxfp4(cache_ptr, page_off, k, ok, x, BS: tl.constexpr, BT: tl.constexpr, HW_E2M1: tl.constexpr):
    """64 packed E2M1 bytes at ``k·64`` + 4 UE8M0 bytes at ``BS·64 + k·4`` for fp32 ``x [BT, 128]``."""
    packed, sbyte = mxfp4_block(tl.reshape(x, [BT * 4, 32]), BT * 4, HW_E2M1)
    packed = tl.reshape(packed, [BT, 64])
    sbyte = tl.reshape(sbyte, [BT, 4])
    j = tl.arange(0, 64)
    tl.store(cache_ptr + (page_off + k * 64)[:, None] + j[None, :], packed, mask=ok[:, None])
    b = tl.arange(0, 4)
    tl.store(cache_ptr + (page_off + BS * 64 + k * 4)[:, None] + b[None, :], sbyte, mask=ok[:, None])


# ---------------------------------------------------------------------------------------------
# kv_insert / kv_rope_insert
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _kv_insert_kernel(
    kv_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr,
    T, kv_stride, max_pos, cs_stride, page_stride, capacity,
    BS: tl.constexpr, ROPE: tl.constexpr, BT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ok, page_off, k = slot_address(slot_ptr, t, t < T, capacity, page_stride, BS)
    r = tl.arange(0, 8)
    c = tl.arange(0, 64)
    row = t.to(tl.int64) * kv_stride
    nope3 = tl.load(kv_ptr + row[:, None, None] + (r * 64)[None, :, None] + c[None, None, :],
                    mask=ok[:, None, None] & (r < NOPE_BLOCKS)[None, :, None], other=0.0)
    rope = tl.load(kv_ptr + row[:, None] + NOPE_BLOCKS * 64 + c[None, :], mask=ok[:, None], other=0.0)
    if ROPE:
        pos = tl.load(pos_ptr + t, mask=ok, other=0)
        cos, sin = load_cos_sin(cs_ptr, pos, ok, max_pos, cs_stride)
        xe, xo = tl.split(tl.reshape(rope.to(tl.float32), [BT, 32, 2]))
        oe, oo = rope_pairs(xe, xo, cos, sin)
        rope = tl.reshape(tl.join(oe, oo), [BT, 64]).to(kv_ptr.dtype.element_ty)
    store_fp8_ds_mla(cache_ptr, page_off, k, ok, nope3, rope, BS, BT)


def _launch_shape(t: int) -> tuple[int, int]:
    """(tokens per program, warps), from the H100 sweep (``benchmarks/caches.py --sweep``)."""
    return (1, 2) if t < 2048 else (2, 2)


def kv_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size: int,
              tokens_per_program: int | None = None, num_warps: int | None = None) -> None:
    """``kv_insert`` (``positions is None``) or ``kv_rope_insert``; the launch shape comes from
    ``_launch_shape`` unless overridden (``benchmarks/caches.py --sweep``)."""
    t = kv.shape[0]
    if t == 0 or kv_cache.shape[0] == 0:
        return
    if kv.stride(1) != 1:
        kv = kv.contiguous()
    rope = positions is not None
    cs = cos_sin_cache if rope else kv
    if rope and cs.stride(-1) != 1:
        cs = cs.contiguous()
    bt, warps = _launch_shape(t)
    bt, warps = tokens_per_program or bt, num_warps or warps
    _kv_insert_kernel[(cdiv(t, bt),)](
        kv, positions if rope else slot_mapping, cs, kv_cache, slot_mapping,
        t, kv.stride(0), cs.shape[0] if rope else 0, cs.stride(0) if rope else 0, kv_cache.stride(0),
        kv_cache.shape[0] * block_size,
        BS=block_size, ROPE=rope, BT=bt, num_warps=warps, **LAUNCH_OPTS,
    )


# ---------------------------------------------------------------------------------------------
# indexer_k_insert
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _indexer_k_insert_kernel(
    k_ptr, cache_ptr, slot_ptr, T, k_stride, page_stride, capacity,
    BS: tl.constexpr, MXFP4: tl.constexpr, HW_E2M1: tl.constexpr, BT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ok, page_off, k = slot_address(slot_ptr, t, t < T, capacity, page_stride, BS)
    d = tl.arange(0, 128)
    x = tl.load(k_ptr + t.to(tl.int64)[:, None] * k_stride + d[None, :], mask=ok[:, None], other=0.0)
    x = x.to(tl.float32)
    if MXFP4:
        store_indexer_mxfp4(cache_ptr, page_off, k, ok, x, BS, BT, HW_E2M1)
    else:
        store_indexer_fp8(cache_ptr, page_off, k, ok, x, BS, BT)


def indexer_k_insert(k, cache, slot_mapping, block_size: int, fmt: str) -> None:
    t = k.shape[0]
    if t == 0 or cache.shape[0] == 0:
        return
    if k.stride(1) != 1:
        k = k.contiguous()
    bt = 4
    _indexer_k_insert_kernel[(cdiv(t, bt),)](
        k, cache, slot_mapping, t, k.stride(0), cache.stride(0), cache.shape[0] * block_size,
        BS=block_size, MXFP4=fmt == "mxfp4", HW_E2M1=use_hw_e2m1(k.device), BT=bt, num_warps=4, **LAUNCH_OPTS,
    )


# ---------------------------------------------------------------------------------------------
# gathers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_value(code):
    """fp32 value of E2M1 nibbles ``code`` (sign bit 3; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6)."""
    m = code & 7
    e = (m >> 1).to(tl.int32)
    frac = 1.0 + (m & 1).to(tl.float32) * 0.5
    mag = tl.where(m < 2, m.to(tl.float32) * 0.5, frac * pow2(e - 1))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def load_fp8_ds_mla_rows(cache_ptr, page_off, k, ok, r0, BS: tl.constexpr, NR: tl.constexpr):
    """bf16 ``[BT, NR, 64]``: rows ``r0 .. r0+NR−1`` of the eight 64-wide rows of the fp8_ds_mla records
    of in-page slots ``k`` (rows 0-6: the 448 nope dims, e4m3 · 2^(byte−127); row 7: the stored bf16
    rope dims); zeros where not ``ok``."""
    r = r0 + tl.arange(0, NR)
    c = tl.arange(0, 64)
    base = page_off + k * TOKEN_BYTES
    nope_m = ok[:, None, None] & (r < NOPE_BLOCKS)[None, :, None]
    v = tl.load(cache_ptr + base[:, None, None] + (r * 64)[None, :, None] + c[None, None, :], mask=nope_m, other=0)
    sb = tl.load(cache_ptr + (page_off + BS * TOKEN_BYTES + k * SCALE_BYTES)[:, None] + r[None, :],
                 mask=ok[:, None] & (r < NOPE_BLOCKS)[None, :], other=0)
    scale = pow2(sb.to(tl.int32) - 127)
    nope = (v.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]).to(tl.bfloat16)
    # rope row through a bf16 view of the record (the ops keep pages 2-byte aligned)
    rope_ptr = (cache_ptr + base + NOPE_BLOCKS * 64).to(tl.pointer_type(tl.bfloat16))
    has_rope = (c * 0 + r0 + NR) > NOPE_BLOCKS  # a vector: the interpreter rejects scalar masks
    rope = tl.load(rope_ptr[:, None] + c[None, :], mask=ok[:, None] & has_rope[None, :], other=0.0)
    row = tl.where((r == NOPE_BLOCKS)[None, :, None], rope[:, None, :], nope)
    return tl.where(ok[:, None, None], row, 0.0)


@triton.jit
def load_fp8_ds_mla(cache_ptr, page_off, k, ok, BS: tl.constexpr):
    """bf16 ``[BT, 8, 64]``: the whole records (``load_fp8_ds_mla_rows`` of rows 0-7)."""
    return load_fp8_ds_mla_rows(cache_ptr, page_off, k, ok, 0, BS, 8)


@triton.jit
def load_indexer_k_fp8(cache_ptr, page_off, k, ok, BS: tl.constexpr, BT: tl.constexpr):
    """e4m3 ``[BT, 128]`` indexer keys of in-page slots ``k`` (zeros where not ``ok``) and their fp32
    power-of-two scales ``[BT]`` (0 where not ``ok``), undequantized (for a tensor-core FP8 dot)."""
    d = tl.arange(0, 128)
    v = tl.load(cache_ptr + (page_off + k * 128)[:, None] + d[None, :], mask=ok[:, None], other=0)
    b = tl.arange(0, 4)  # the fp32 scale from its 4 bytes (pages need not be 4-byte aligned)
    sb = tl.load(cache_ptr + (page_off + BS * 128 + k * 4)[:, None] + b[None, :], mask=ok[:, None], other=0)
    scale = tl.sum(sb.to(tl.int32) << (8 * b[None, :]), axis=1).to(tl.float32, bitcast=True)
    return v.to(tl.float8e4nv, bitcast=True), tl.where(ok, scale, 0.0)


@triton.jit
def load_indexer_k(cache_ptr, page_off, k, ok, BS: tl.constexpr, BT: tl.constexpr, MXFP4: tl.constexpr):
    """fp32 ``[BT, 128]`` dequantized indexer keys of in-page slots ``k``; zeros where not ``ok``."""
    b = tl.arange(0, 4)
    if MXFP4:
        j = tl.arange(0, 64)
        p = tl.load(cache_ptr + (page_off + k * 64)[:, None] + j[None, :], mask=ok[:, None], other=0)
        vals = tl.reshape(tl.join(_e2m1_value(p & 0xF), _e2m1_value(p >> 4)), [BT * 4, 32])
        sb = tl.load(cache_ptr + (page_off + BS * 64 + k * 4)[:, None] + b[None, :], mask=ok[:, None], other=0)
        val = tl.reshape(vals * pow2(tl.reshape(sb, [BT * 4]).to(tl.int32) - 127)[:, None], [BT, 128])
    else:
        v, scale = load_indexer_k_fp8(cache_ptr, page_off, k, ok, BS, BT)
        val = v.to(tl.float32) * scale[:, None]
    return tl.where(ok[:, None], val, 0.0)


@prebound
@triton.jit
def _gather_kernel(
    cache_ptr, slot_ptr, out_ptr, N, page_stride, capacity,
    BS: tl.constexpr, FMT: tl.constexpr, BT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # FMT 0 = fp8_ds_mla -> bf16 [N, 512]; 1 = indexer fp8 -> fp32 [N, 128]; 2 = indexer mxfp4
    pdl_enter(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = t < N
    ok, page_off, k = slot_address(slot_ptr, t, t_ok, capacity, page_stride, BS)
    if FMT == 0:
        r = tl.arange(0, 8)
        c = tl.arange(0, 64)
        row = load_fp8_ds_mla(cache_ptr, page_off, k, ok, BS)
        out_off = t.to(tl.int64)[:, None, None] * 512 + (r * 64)[None, :, None] + c[None, None, :]
        tl.store(out_ptr + out_off, row, mask=t_ok[:, None, None])
    else:
        d = tl.arange(0, 128)
        val = load_indexer_k(cache_ptr, page_off, k, ok, BS, BT, FMT == 2)
        tl.store(out_ptr + t.to(tl.int64)[:, None] * 128 + d[None, :], val, mask=t_ok[:, None])


_GATHER = {"fp8_ds_mla": (0, torch.bfloat16, layouts.KV_HEAD_DIM), "fp8": (1, torch.float32, 128),
           "mxfp4": (2, torch.float32, 128)}


def gather(cache, slots, block_size: int, fmt: str) -> torch.Tensor:
    code, dtype, dim = _GATHER[fmt]
    n = slots.shape[0]
    out = torch.empty((n, dim), dtype=dtype, device=slots.device)
    if n == 0:
        return out
    if cache.shape[0] == 0:  # nothing is valid and there is no row 0 to point masked loads at
        return out.zero_()
    bt = 4
    _gather_kernel[(cdiv(n, bt),)](
        cache, slots, out, n, cache.stride(0), cache.shape[0] * block_size,
        BS=block_size, FMT=code, BT=bt, num_warps=4, **LAUNCH_OPTS,
    )
    return out

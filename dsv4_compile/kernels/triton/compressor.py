"""Triton kernels for the compressor ops and ``rms_norm``, bit-exact with
``dsv4_compile.reference.compressor``: the same pairwise trees, the same polynomial ``exp``,
correctly rounded division and square root, no FMA (``enable_fp_fusion=False``).

``compressor_insert`` runs three kernels: state save (every token), window pooling (tokens that
close a window and have a slot) into an fp32 scratch, then RMSNorm → RoPE → bf16 → [Hadamard] →
quantize → insert (tokens with a slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from ...reference import compressor as ref
from ._common import LAUNCH_OPTS, cdiv, fp8_quant_rows, fwht, next_pow2, pdl_enter, pow2, use_hw_e2m1
from ._launch import prebound
from .cache import load_cos_sin, rope_last_row, slot_address, store_fp8_ds_mla, store_indexer_fp8, store_indexer_mxfp4

LOG2E = tl.constexpr(ref.LOG2E)
LN2_HI = tl.constexpr(ref.LN2_HI)
LN2_LO = tl.constexpr(ref.LN2_LO)
P0, P1, P2, P3, P4, P5, P6 = (tl.constexpr(c) for c in ref.EXP_POLY)


@triton.jit
def exp_fp32(x):
    """``reference.compressor.exp_fp32``: Cody-Waite + degree-6 Horner, op for op."""
    xc = tl.maximum(x, -104.0)
    n = tl.floor(xc * LOG2E + 0.5)
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = r * P0 + P1
    p = p * r + P2
    p = p * r + P3
    p = p * r + P4
    p = p * r + P5
    p = p * r + P6
    ni = n.to(tl.int32)
    return tl.where(ni < -126, 0.0, p * pow2(tl.maximum(ni, -126)))


@triton.jit
def tree_sum_last(x, R: tl.constexpr, N: tl.constexpr, LOG2_N: tl.constexpr):
    """Pairwise tree sum over the last dim of ``x [R, N]`` (N a power of two): adjacent pairs first."""
    for s in tl.static_range(LOG2_N):
        a, b = tl.split(tl.reshape(x, [R, N >> (s + 1), 2]))
        x = a + b
    return tl.reshape(x, [R])


@triton.jit
def tree_sum_first(x, N: tl.constexpr, C: tl.constexpr, LOG2_N: tl.constexpr):
    """Pairwise tree sum over the first dim of ``x [N, C]`` (adjacent rows first)."""
    for s in tl.static_range(LOG2_N):
        a, b = tl.split(tl.permute(tl.reshape(x, [N >> (s + 1), 2, C]), [0, 2, 1]))
        x = a + b
    return tl.reshape(x, [C])


@triton.jit
def rms_norm_rows(x, w, eps, R: tl.constexpr, BD: tl.constexpr, LOG2_BD: tl.constexpr, D: tl.constexpr):
    """fp32 ``(x · 1/sqrt(tree_sum(x²)/D + eps)) · w`` of ``x [R, BD]`` (zero padded past D)."""
    ss = tree_sum_last(x * x, R, BD, LOG2_BD)
    inv = tl.div_rn(tl.full([R], 1.0, tl.float32), tl.sqrt_rn(tl.div_rn(ss, tl.full([R], D, tl.float32)) + eps))
    return (x * inv[:, None]) * w[None, :]


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, eps, D: tl.constexpr, BD: tl.constexpr, LOG2_BD: tl.constexpr,
                     BR: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    m = (rows < n_rows)[:, None] & (d < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + d[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    y = rms_norm_rows(x, w, eps, BR, BD, LOG2_BD, D)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    if n_rows == 0:
        return out
    bd = next_pow2(d)
    br = max(1, min(16, 2048 // bd))
    _rms_norm_kernel[(cdiv(n_rows, br),)](
        x, weight.contiguous(), out, n_rows, eps, D=d, BD=bd, LOG2_BD=bd.bit_length() - 1, BR=br, **LAUNCH_OPTS
    )
    return out


# ---------------------------------------------------------------------------------------------
# rms_norm_fp8_quant: the norm of each row, rounded to x's dtype, quantized in blocks; x read once
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _rms_norm_fp8_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, n_rows, x_stride, eps, amax_floor, D: tl.constexpr,
                               BD: tl.constexpr, LOG2_BD: tl.constexpr, BLOCK: tl.constexpr, BR: tl.constexpr,
                               PDL: tl.constexpr = False):
    """Rows ``BR·pid ..``: ``rms_norm_rows`` (the fixed-order norm), rounded to ``x``'s dtype, then
    ``fp8_quant_rows`` over each ``BLOCK`` of it (``BD / BLOCK`` blocks per row, those past ``D``
    masked). ``x`` rows are ``x_stride`` apart (a column slice of a GEMM output reads in place)."""
    pdl_enter(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    r_ok = rows < n_rows
    m = r_ok[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * x_stride + d[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    y = rms_norm_rows(x, w, eps, BR, BD, LOG2_BD, D).to(x_ptr.dtype.element_ty).to(tl.float32)
    NB: tl.constexpr = BD // BLOCK
    q, scale = fp8_quant_rows(tl.reshape(y, [BR * NB, BLOCK]), amax_floor)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], tl.reshape(q, [BR, BD]), mask=m)
    b = tl.arange(0, NB)
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * (D // BLOCK) + b[None, :], tl.reshape(scale, [BR, NB]),
             mask=r_ok[:, None] & (b < D // BLOCK)[None, :])


def rms_norm_fp8_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int, scale_floor: float):
    d = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(x.shape[:-1] + (d // block,), dtype=torch.float32, device=x.device)
    n_rows = q.numel() // d if d else 0
    if n_rows == 0:
        return q, s
    x2 = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(n_rows, d).contiguous()
    bd = next_pow2(d)  # a multiple of block: block is a power of two dividing d
    br = max(1, min(16, 2048 // bd))
    _rms_norm_fp8_quant_kernel[(cdiv(n_rows, br),)](
        x2, weight.contiguous(), q, s, n_rows, x2.stride(0), eps, scale_floor, D=d, BD=bd,
        LOG2_BD=bd.bit_length() - 1, BLOCK=block, BR=br, **LAUNCH_OPTS
    )
    return q, s


# ---------------------------------------------------------------------------------------------
# state save
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _state_save_kernel(ks_ptr, pos_ptr, ape_ptr, state_ptr, slot_ptr, ks_stride, page_stride, capacity,
                       R: tl.constexpr, W: tl.constexpr, SBS: tl.constexpr, PDL: tl.constexpr = False):
    # state_ptr is the state cache as fp32 (page_stride in fp32 elements); one program per token
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if (slot >= 0) & (slot < capacity):
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.arange(0, W)
        kv = tl.load(ks_ptr + t * ks_stride + c).to(tl.float32)
        sc = tl.load(ks_ptr + t * ks_stride + W + c).to(tl.float32)
        a = tl.load(ape_ptr + (((pos % R) + R) % R) * W + c)  # floor mod, as torch (never out of ape)
        row = state_ptr + (slot // SBS) * page_stride + (slot % SBS) * (2 * W)
        tl.store(row + c, kv)
        tl.store(row + W + c, sc + a)


def state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size: int) -> None:
    t = kv_score.shape[0]
    if t == 0 or state_cache.shape[0] == 0:
        return
    if kv_score.stride(1) != 1:
        kv_score = kv_score.contiguous()
    r, w = ape.shape
    _state_save_kernel[(t,)](
        kv_score, positions, ape.contiguous(), state_cache.view(torch.float32), state_slot_mapping,
        kv_score.stride(0), state_cache.stride(0) // 4, state_cache.shape[0] * state_block_size,
        R=r, W=w, SBS=state_block_size, num_warps=4, **LAUNCH_OPTS,
    )


# ---------------------------------------------------------------------------------------------
# window pooling
# ---------------------------------------------------------------------------------------------
@prebound
@triton.jit
def _pool_kernel(
    state_ptr, pos_ptr, bt_ptr, req_ptr, slot_ptr, out_ptr,
    T, page_stride, n_pages, bt_stride, n_bt_cols, n_reqs, slot_capacity,
    R: tl.constexpr, COFF: tl.constexpr, D: tl.constexpr, SBS: tl.constexpr, BC: tl.constexpr,
    FUSED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # grid (T, D / BC): one token, BC channels, all ROWS window rows
    pdl_enter(PDL)
    ROWS: tl.constexpr = COFF * R
    LOG2_ROWS: tl.constexpr = 3 if COFF == 2 else 7
    W: tl.constexpr = COFF * D
    t = tl.program_id(0)
    cb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    req = tl.load(req_ptr + t).to(tl.int64)
    closes = (pos >= 0) & ((pos + 1) % R == 0)
    if FUSED:  # only tokens that write an entry; the others' scratch rows are never read
        slot = tl.load(slot_ptr + t).to(tl.int64)
        run = closes & (slot >= 0) & (slot < slot_capacity)
    else:
        run = True
    ch = cb * BC + tl.arange(0, BC)
    if run:
        j = tl.arange(0, ROWS)
        # per-row copies of the token's scalars (a scalar-and-vector mask is not contiguous in the
        # Triton interpreter, which rejects it)
        pos_r = pos + tl.zeros([ROWS], tl.int64)
        req_r = req + tl.zeros([ROWS], tl.int64)
        q = pos_r - ROWS + 1 + j
        blk_idx = tl.where(q >= 0, q, 0) // SBS
        closes_r = (pos_r >= 0) & ((pos_r + 1) % R == 0)
        ok = closes_r & (q >= 0) & (req_r >= 0) & (req_r < n_reqs) & (blk_idx < n_bt_cols)
        blk = tl.load(bt_ptr + tl.where(req_r >= 0, req_r, 0) * bt_stride + blk_idx, mask=ok, other=-1).to(tl.int64)
        ok = ok & (blk >= 0) & (blk < n_pages)
        if COFF == 2:
            half = tl.where(j >= ROWS - R, D, 0)
        else:
            half = tl.zeros([ROWS], tl.int32)
        row_off = tl.where(ok, blk, 0) * page_stride + (tl.where(q >= 0, q, 0) % SBS) * (2 * W) + half
        off = row_off[:, None] + ch[None, :]
        kv = tl.load(state_ptr + off, mask=ok[:, None], other=0.0)
        s = tl.load(state_ptr + off + W, mask=ok[:, None], other=float("-inf"))
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # no valid row: every weight is 0 anyway
        e = tl.where(ok[:, None], exp_fp32(s - m[None, :]), 0.0)
        num = tree_sum_first(e * kv, ROWS, BC, LOG2_ROWS)
        den = tree_sum_first(e, ROWS, BC, LOG2_ROWS)
        pooled = tl.where(den > 0, tl.div_rn(num, tl.where(den > 0, den, 1.0)), 0.0)
        tl.store(out_ptr + t.to(tl.int64) * D + ch, pooled)


def pool(state_cache, positions, state_block_table, token_to_req, state_block_size: int, compress_ratio: int,
         head_dim: int, slot_mapping=None, out=None, slot_capacity: int = 0) -> torch.Tensor:
    """Pooled windows fp32 ``[T, head_dim]``; with ``slot_mapping`` (fused path) only tokens that
    close a window and have a slot are computed and the other rows of ``out`` are left unwritten."""
    t = positions.shape[0]
    fused = slot_mapping is not None
    if out is None:
        out = torch.empty((t, head_dim), dtype=torch.float32, device=positions.device)
    if t == 0:
        return out
    if state_cache.shape[0] == 0:
        return out.zero_()
    coff = layouts.compress_overlap(compress_ratio)
    bc = min(head_dim, 32 if compress_ratio == 128 else 128)
    bt = state_block_table if state_block_table.stride(1) == 1 else state_block_table.contiguous()
    _pool_kernel[(t, head_dim // bc)](
        state_cache.view(torch.float32), positions, bt, token_to_req, slot_mapping if fused else positions, out,
        t, state_cache.stride(0) // 4, state_cache.shape[0], bt.stride(0), bt.shape[1], bt.shape[0],
        slot_capacity,
        R=compress_ratio, COFF=coff, D=head_dim, SBS=state_block_size, BC=bc, FUSED=fused,
        num_warps=4, **LAUNCH_OPTS,
    )
    return out


# ---------------------------------------------------------------------------------------------
# RMSNorm -> RoPE -> bf16 -> [Hadamard] -> quantize -> insert
# ---------------------------------------------------------------------------------------------
@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@prebound
@triton.jit
def _norm_rope_insert_kernel(
    pooled_ptr, pos_ptr, w_ptr, cs_ptr, cache_ptr, slot_ptr,
    T, eps, max_pos, cs_stride, page_stride, capacity, hadamard_scale,
    R: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, BS: tl.constexpr, FMT: tl.constexpr,
    HADAMARD: tl.constexpr, HW_E2M1: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # FMT 0 = fp8_ds_mla (D = 512), 1 = indexer fp8, 2 = indexer mxfp4 (D = 128); one token per program
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64) + tl.zeros([1], tl.int64)
    ok, page_off, k = slot_address(slot_ptr, t, t < T, capacity, page_stride, BS)
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        closes = (pos >= 0) & ((pos + 1) % R == 0)
        d = tl.arange(0, D)
        x = tl.load(pooled_ptr + t.to(tl.int64)[:, None] * D + d[None, :], mask=closes[:, None], other=0.0)
        w = tl.load(w_ptr + d).to(tl.float32)
        y = rms_norm_rows(x, w, eps, 1, D, LOG2_D, D)
        cos, sin = load_cos_sin(cs_ptr, (pos // R) * R, ok, max_pos, cs_stride)
        y3 = rope_last_row(tl.reshape(y, [1, D // 64, 64]), cos, sin, D // 64, 1).to(tl.bfloat16)
        if FMT == 0:
            # row 7 alone: a max against -inf keeps every value's bits (a sum would turn -0 into +0),
            # NaN included (a NaN rotation must stay NaN, not become -inf: docs/numerics.md §9.4)
            last = (tl.arange(0, D // 64) == D // 64 - 1)[None, :, None]
            rope = tl.reduce(tl.where(last, y3.to(tl.float32), float("-inf")), 1, _max_keep_nan).to(tl.bfloat16)
            store_fp8_ds_mla(cache_ptr, page_off, k, ok, y3, rope, BS, 1)
        else:
            yk = tl.reshape(y3, [1, D]).to(tl.float32)
            if HADAMARD:
                yk = (fwht(yk, 1, D, LOG2_D) * hadamard_scale).to(tl.bfloat16).to(tl.float32)
            if FMT == 1:
                store_indexer_fp8(cache_ptr, page_off, k, ok, yk, BS, 1)
            else:
                store_indexer_mxfp4(cache_ptr, page_off, k, ok, yk, BS, 1, HW_E2M1)


_FMT = {"fp8_ds_mla": 0, "fp8": 1, "mxfp4": 2}


def compressor_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                      state_block_size: int, norm_weight, eps: float, cos_sin_cache, cache, slot_mapping,
                      block_size: int, fmt: str, hadamard: bool = False) -> None:
    t = positions.shape[0]
    if t == 0:
        return
    r = ape.shape[0]
    d = norm_weight.shape[0]
    state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)
    if cache.shape[0] == 0:
        return
    capacity = cache.shape[0] * block_size
    scratch = torch.empty((t, d), dtype=torch.float32, device=positions.device)
    if state_cache.shape[0]:
        pool(state_cache, positions, state_block_table, token_to_req, state_block_size, r, d, slot_mapping, scratch,
             capacity)
    else:
        scratch.zero_()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _norm_rope_insert_kernel[(t,)](
        scratch, positions, norm_weight.contiguous(), cs, cache, slot_mapping,
        t, eps, cs.shape[0], cs.stride(0), cache.stride(0), capacity, d**-0.5,
        R=r, D=d, LOG2_D=d.bit_length() - 1, BS=block_size, FMT=_FMT[fmt], HADAMARD=hadamard,
        HW_E2M1=use_hw_e2m1(positions.device), num_warps=4, **LAUNCH_OPTS,
    )

"""Triton kernels for the attention core: indexer logits (then the radix select of ``topk.py``) and
sparse MQA with the sink (split-K flash decoding).

Both read the paged caches through the record loaders of ``cache.py`` and mask every index that is
−1 or past its cache, so no byte outside a cache is read. Numerics: fp32 accumulation on bf16 tensor
core products (K and V dequantize exactly to bf16); the attention probabilities are rounded to bf16
for the P·V product as in every flash kernel, so outputs match the fp32 reference within bf16
tolerance, not bit for bit (docs/numerics.md §9.1: attention outputs are tolerance-checked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import layouts
from ...reference.attention import select_topk as select_topk_reference
from ...reference.attention import visible_entries
from . import topk as _topk
from ._common import cdiv, interpreting, next_pow2, pdl_enter, pow2, sm_programs
from ._launch import prebound
from .cache import load_fp8_ds_mla, load_fp8_ds_mla_rows, load_indexer_k_fp8

LOG2E = 1.4426950408889634
WIDE_SHARE = 9  # launch_config: 64-head programs from T·cdiv(H, 64)·WIDE_SHARE >= SMs
# the split-K merge loads every split at once up to this many (token, head) rows; a loop over the
# splits above (H200, 64 heads, 64k context: one token 11.1 µs against 14.9 µs with the loop, but
# 4 tokens 21.1 against 20.2, 8 tokens 28.7 against 24.8, 64 tokens 79.1 against 68.9 µs)
COMBINE_ALL_MAX_ROWS = 128
# indexer MXFP4: a row (key or query) whose four block exponents lie within this many binades of its
# largest folds 2^(e_b − e_max) into its e4m3 values exactly (0.5·2^-5 is still an e4m3 normal)
MX_FOLD_SPREAD = tl.constexpr(5)
# the MXFP4 logits kernel's register cap: the folded pass fits in it (121 for sm_90a), the rare exact pass
# spills; uncapped, ptxas gives the exact pass 253 and the whole kernel two CTAs per SM
MX_MAX_REGS = 128
# the FP8 logits kernel's software-pipelining stages (cp.async of the next tiles' keys) from
# FP8_PIPELINE_MIN_T tokens on (logits_config); fewer tokens take the unpipelined loop
FP8_STAGES = 3
FP8_PIPELINE_MIN_T = 32
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "no candidate yet" running max: keeps exp2 free of inf − inf


# ---------------------------------------------------------------------------------------------
# indexer logits
# ---------------------------------------------------------------------------------------------
@triton.jit
def _head_block(q_ptr, w_row, t, heads, H, q_stride_t, q_stride_h, BH: tl.constexpr):
    """(e4m3 queries ``[BH, 128]``, weights ``[BH]``) of ``heads`` of token ``t`` (FP8: the query
    scale is in the weights)."""
    hm = heads < H
    w = tl.load(w_row + heads, mask=hm, other=0.0)
    d = tl.arange(0, 128)
    q = tl.load(q_ptr + t.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
                mask=hm[:, None], other=0).to(tl.float8e4nv, bitcast=True)
    return q, w


@triton.jit
def _e2m1_e4m3(code, c=48):
    """e4m3 bytes (uint8) holding the values of the E2M1 nibbles ``code`` (uint8, low 4 bits) times
    ``2^((c − 48) / 8)``: magnitude m → 0, then ``c`` (0.5·2^..), then ``4m + c`` (1, 1.5, 2, 3, 4,
    6 times 2^..); sign to bit 7. Exact for ``c = 48 − 8d``, ``0 <= d <= 5`` (the e4m3 exponent of
    0.5·2^-d stays normal; ``c = 48``, the values themselves)."""
    m = code & 7
    return (tl.where(m >= 2, m * 4 + c, m * c) | ((code & 8) << 4)).to(tl.uint8)


@triton.jit
def _mx_block(rows, ok, b, R: tl.constexpr):
    """e4m3 ``[R, 32]``: the E2M1 values of 32-block ``b`` of the MXFP4 rows whose 64 packed bytes
    start at the pointers ``rows [R]`` (low nibble first; zeros where not ``ok``)."""
    j = tl.arange(0, 16)
    p = tl.load(rows[:, None] + (16 * b + j)[None, :], mask=ok[:, None], other=0)
    return tl.reshape(tl.join(_e2m1_e4m3(p & 0xF), _e2m1_e4m3(p >> 4)), [R, 32]).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _ue8m0_scales(ptrs, ok):
    """fp32 ``2^(byte−127)`` of the UE8M0 bytes at ``ptrs``, NaN for the NaN byte 0xFF (its block
    dequantizes to NaN, docs/numerics.md §4.3); 0 where not ``ok`` (nothing read there)."""
    b = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
    return tl.where(ok, tl.where(b == 255, float("nan"), pow2(b - 127)), 0.0)


@triton.jit
def _relu(x):
    """``max(x, 0)`` keeping NaN (as ``torch.relu``): a NaN score makes a NaN logit, which the
    selection ranks first, as the reference does (the hardware ``max`` alone would drop it)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _mx_scores_exact(k_rows, ks_rows, ok, q_rows, qs_rows, hm, BN: tl.constexpr, BH: tl.constexpr):
    """fp32 ``[BN, BH]`` ``k̂·q̂`` of MXFP4 keys and queries (packed values at the pointers ``k_rows`` /
    ``q_rows``, UE8M0 block scales at ``ks_rows`` / ``qs_rows``), any scales: per 32-block an e4m3
    tensor-core dot of the E2M1 values (an exact sum), times the key block scale, then the query
    block scale (powers of two: exact short of under/overflow), summed in fp32 in block order. The
    blocks run in a loop, so one block's product is live at a time (unrolled, the four took every
    register and spilled)."""
    sc = tl.zeros([BN, BH], dtype=tl.float32)
    for b in range(4):
        d = tl.dot(_mx_block(k_rows, ok, b, BN), tl.trans(_mx_block(q_rows, hm, b, BH)))
        sc += (d * _ue8m0_scales(ks_rows + b, ok)[:, None]) * _ue8m0_scales(qs_rows + b, hm)[None, :]
    return sc


@triton.jit
def _mx_scale_bytes(ptrs, ok):
    """int32 ``[R, 4]``: the four UE8M0 scale bytes of the MXFP4 rows at ``ptrs [R]`` (0 where not ``ok``)."""
    return tl.load(ptrs[:, None] + tl.arange(0, 4)[None, :], mask=ok[:, None], other=0).to(tl.int32)


@triton.jit
def _mx_fold(sb):
    """The folded form of MXFP4 rows with UE8M0 scale bytes ``sb [R, 4]``: (the rows' largest scale
    byte ``e [R]``, ``c [R, 4]`` that folds each block's ``2^(e_b − e)`` into its e4m3 values
    (``_e2m1_e4m3``), ``fold [R]``: every block within ``MX_FOLD_SPREAD`` binades of the largest, no
    NaN scale 0xFF and no zero scale 0x00)."""
    e = tl.max(sb, axis=1)
    lo = tl.min(sb, axis=1)
    # byte 0 is the scale 0 (pow2 of -127 has no bits; the reference's too), not 2^-127: not folded
    fold = (e - lo <= MX_FOLD_SPREAD) & (e < 255) & (lo > 0)
    return e, 48 - 8 * (e[:, None] - sb), fold


@triton.jit
def _mx_rows(rows, ok, R: tl.constexpr):
    """uint8 ``[R, 4, 16]``: the 64 packed bytes of the MXFP4 rows at ``rows [R]`` by block (0 where not ``ok``)."""
    b = tl.arange(0, 4)
    j = tl.arange(0, 16)
    return tl.load(rows[:, None, None] + (16 * b)[None, :, None] + j[None, None, :], mask=ok[:, None, None], other=0)


@triton.jit
def _mx_q_rows(q_ptr, qs_ptr, t, heads, H, q_stride_t, q_stride_h):
    """(pointers to the packed values, pointers to the four UE8M0 scale bytes) of ``heads`` of token
    ``t``'s MXFP4 queries (scales ``[T, H, 4]`` contiguous)."""
    t64 = t.to(tl.int64)
    return q_ptr + t64 * q_stride_t + heads * q_stride_h, qs_ptr + (t64 * H + heads) * 4


@triton.jit
def _mx_head_block_folded(q_ptr, qs_ptr, w_row, t, heads, H, q_stride_t, q_stride_h, BH: tl.constexpr,
                          PRMT: tl.constexpr):
    """(weights times each head's largest query block scale ``[BH]``, the e4m3 even and odd halves
    ``[BH, 64]`` with ``2^(e_b − e_max)`` folded in (``_mx_fold``, ``_mx_halves``; exact where the
    heads fold)) of ``heads`` of token ``t``'s MXFP4 queries."""
    hm = heads < H
    rows, srows = _mx_q_rows(q_ptr, qs_ptr, t, heads, H, q_stride_t, q_stride_h)
    e, c, _ = _mx_fold(_mx_scale_bytes(srows, hm))
    w = tl.load(w_row + heads, mask=hm, other=0.0) * tl.where(hm, pow2(e - 127), 0.0)
    q_lo, q_hi = _mx_halves(_mx_rows(rows, hm, BH), c, BH, PRMT)
    return w, q_lo, q_hi


@triton.jit
def _mx_queries_fold(qs_ptr, t, H, BH: tl.constexpr):
    """Whether every head of token ``t``'s MXFP4 queries folds (``_mx_fold``), as an int32 scalar."""
    fold = 1
    for h0 in range(0, H, BH):
        heads = h0 + tl.arange(0, BH)
        hm = heads < H
        _, _, f = _mx_fold(_mx_scale_bytes(qs_ptr + (t.to(tl.int64) * H + heads) * 4, hm))
        fold = tl.minimum(fold, tl.min(tl.where(hm, f, True).to(tl.int32)))
    return fold


# One word of 4 packed MXFP4 bytes ($2) to the e4m3 bytes of its 4 low ($0) and 4 high ($1) nibbles:
# the 3-bit magnitudes, gathered into the nibbles of a byte-permute selector, index an 8-byte table
# ($3, $7: _mx_halves), then the sign bit moves to bit 7.
_E2M1_E4M3_PRMT = tl.constexpr("""
{
.reg .b32 m, t, s, g;
and.b32 m, $2, 0x07070707;
shr.u32 t, m, 4;
or.b32 t, t, m;
prmt.b32 s, t, 0, 0x3320;
prmt.b32 $0, $3, $7, s;
and.b32 g, $2, 0x08080808;
shl.b32 g, g, 4;
or.b32 $0, $0, g;
shr.u32 m, $2, 4;
and.b32 m, m, 0x07070707;
shr.u32 t, m, 4;
or.b32 t, t, m;
prmt.b32 s, t, 0, 0x3320;
prmt.b32 $1, $3, $7, s;
and.b32 g, $2, 0x80808080;
or.b32 $1, $1, g;
}
""")


@triton.jit
def _mx_halves(p, c, R: tl.constexpr, PRMT: tl.constexpr):
    """(e4m3 ``[R, 64]`` of the even elements, e4m3 ``[R, 64]`` of the odd elements) of the MXFP4 rows
    of packed bytes ``p [R, 4, 16]`` (``_mx_rows``), block ``b`` times the power
    of two ``c [R, 4]`` encodes (``_e2m1_e4m3``). Even then odd is a permutation of the dot's K axis,
    taken alike by keys and queries; unlike interleaving the two nibbles, it keeps each thread's bytes
    contiguous. PRMT: a byte-permute table lookup per four values (``_E2M1_E4M3_PRMT``; not under
    the interpreter), else the same bytes from ``_e2m1_e4m3``. The lookup uses the table of the first
    of the four bytes it is given, which is every byte's only when the four lie in one block of one
    row: Triton gives each thread a block's 16 bytes as one vector when the rows are 16-byte aligned,
    which ``indexer_logits_into`` checks before it asks for PRMT (compiled for unaligned rows, the
    layout spreads a thread's bytes over rows)."""
    c3 = c[:, :, None]
    if PRMT:
        # table bytes of magnitudes 0..7: 0, c, c + 8, c + 12 | c + 16, c + 20, c + 24, c + 28
        lut_lo = c3 * 0x01010100 + 0x0C080000
        lut_hi = c3 * 0x01010101 + 0x1C181410
        lo, hi = tl.inline_asm_elementwise(_E2M1_E4M3_PRMT, "=r,=r,r,r,r,r,r,r,r,r,r", [p, lut_lo, lut_hi],
                                           dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    else:
        lo = _e2m1_e4m3(p & 0xF, c3)
        hi = _e2m1_e4m3(p >> 4, c3)
    return (tl.reshape(lo, [R, 64]).to(tl.float8e4nv, bitcast=True),
            tl.reshape(hi, [R, 64]).to(tl.float8e4nv, bitcast=True))


@triton.jit
def _mx_scores_folded(p, c, q_lo, q_hi, BN: tl.constexpr, PRMT: tl.constexpr):
    """fp32 ``[BN, BH]`` ``Σ_b 2^(e_b − e_max)·(k_b·q_b)`` of MXFP4 keys (packed bytes ``p``, folded by
    ``c``) and folded queries (``_mx_head_block_folded``): two e4m3 tensor-core dots, the even and the
    odd halves, on one accumulator."""
    k_lo, k_hi = _mx_halves(p, c, BN, PRMT)
    acc = tl.dot(k_lo, tl.trans(q_lo))
    return tl.dot(k_hi, tl.trans(q_hi), acc)


@triton.jit
def _page_offsets(page, vis, num_pages, page_stride):
    """(readable: visible with a page inside the cache, byte offsets of those pages (0 elsewhere)) of
    entries with page indices ``page`` (int64)."""
    ok = vis & (page >= 0) & (page < num_pages)
    return ok, tl.where(ok, page, 0) * page_stride


@triton.jit
def _tile_pages(bt_row, i, n, num_pages, page_stride, BS: tl.constexpr, BN: tl.constexpr):
    """(entries ``s [BN]`` of tile ``i``, visible ``s < n``, readable, byte offsets of their pages)."""
    s = i * BN + tl.arange(0, BN)
    vis = s < n
    ok, page_off = _page_offsets(tl.load(bt_row + s // BS, mask=vis, other=-1).to(tl.int64), vis, num_pages,
                                 page_stride)
    return s, vis, ok, page_off


@prebound
@triton.jit
def _indexer_logits_kernel(
    q_ptr, qs_ptr, w_ptr, cache_ptr, bt_ptr, req_ptr, pos_ptr, out_ptr,
    H, n_req, num_pages, page_stride, L, ratio, q_stride_t, q_stride_h, w_stride_t, bt_stride, out_stride,
    BS: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, MXFP4: tl.constexpr, ONE_HB: tl.constexpr,
    PREFETCH: tl.constexpr = False, PRMT: tl.constexpr = False, STAGES: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    """Token ``t = program_id(0)``: program ``j`` of ``num_programs(1)`` scores tiles ``j, j+P, ..``
    of ``BN`` entries below the token's visible count ``n`` and writes them; nothing at or past ``n``
    is read or written (the cost follows the context, not the row width ``L``).

    FP8: the e4m3 dot product on the tensor cores (exact products, summed by the tensor core in
    fp32), ReLU, times the head weight, summed over heads, times the key's power-of-two scale (exact:
    ``ReLU(a·x) = a·ReLU(x)``, ``a > 0``).

    MXFP4, folded: a row (key or query) whose four block exponents ``e_b`` lie within
    ``MX_FOLD_SPREAD`` binades of their largest ``e`` holds ``2^(e_b − e)·E2M1`` exactly in e4m3, so
    the four blocks chain on one tensor-core accumulator (exact products, summed as the FP8 path's:
    unlike the per-block sums, which need 13 bits, these may round in the tensor core's
    accumulation), times the key's ``2^e`` after the head sum; the query's goes into the head
    weights. On the H200 at B = 64, 64k context: 80.4 against 170.2 µs for per-block dots with four
    accumulators and eight ``[BN, BH]`` scale multiplies per tile (255 registers, spilling;
    ``benchmarks/results/indexer_topk_h200.md``). Rows that do not fold (a wider spread, a NaN scale
    0xFF, a zero scale 0x00) take the exact per-block pass: per 32-block, the E2M1 values as e4m3 in a
    tensor-core dot (an exact block sum), times both block scales, the four summed in fp32
    (``_mx_scores_exact``); a program's tiles that hold such a key are redone there after the folded
    pass, all of them when a query head does not fold. A NaN score stays NaN (``_relu``).

    The token's request and position are read before the grid-dependency wait (``pdl_enter``), so
    under PDL their latency hides under the previous kernel's tail, and a program without tiles exits
    without waiting: the stream's previous kernel must not write them (``dsv4::indexer_topk`` requires it)."""
    t = tl.program_id(0)
    n_prog = tl.num_programs(1)
    req = tl.load(req_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    tok_ok = (req >= 0) & (req < n_req) & (pos >= 0)
    n = tl.where(tok_ok, tl.minimum((pos + 1) // ratio, L), 0)
    n_tiles = tl.cdiv(n, BN)
    if tl.program_id(1) >= n_tiles:
        return
    pdl_enter(PDL)
    bt_row = bt_ptr + tl.where(tok_ok, req, 0) * bt_stride
    out_row = out_ptr + t.to(tl.int64) * out_stride
    w_row = w_ptr + t.to(tl.int64) * w_stride_t
    i0 = tl.program_id(1)
    if MXFP4:
        # Folded pass: keys and queries whose block exponents fold (_mx_fold) take one chained e4m3
        # dot per tile; the first tile that does not fold is remembered, and the exact pass redoes
        # the tiles from there on that do not (every tile when the queries do not fold).
        n_tiles = n_tiles.to(tl.int32)
        q_fold = _mx_queries_fold(qs_ptr, t, H, BH)
        if ONE_HB:
            w0, ql0, qh0 = _mx_head_block_folded(
                q_ptr, qs_ptr, w_row, t, tl.arange(0, BH), H, q_stride_t, q_stride_h, BH, PRMT)
        first_exact = tl.full([BN], n_tiles, tl.int32)
        for i in range(i0, tl.where(q_fold != 0, n_tiles, i0), n_prog):
            s_a, vis_a, ok_a, off_a = _tile_pages(bt_row, i, n, num_pages, page_stride, BS, BN)
            p_a = _mx_rows(cache_ptr + off_a + (s_a % BS) * 64, ok_a, BN)
            e, c, fold = _mx_fold(_mx_scale_bytes(cache_ptr + off_a + BS * 64 + (s_a % BS) * 4, ok_a))
            kscale = tl.where(ok_a, pow2(e - 127), 0.0)
            acc = tl.zeros([BN], dtype=tl.float32)
            for h0 in range(0, H, BH):
                if ONE_HB:
                    w = w0
                    q_lo = ql0
                    q_hi = qh0
                else:
                    w, q_lo, q_hi = _mx_head_block_folded(
                        q_ptr, qs_ptr, w_row, t, h0 + tl.arange(0, BH), H, q_stride_t, q_stride_h, BH, PRMT)
                sc = _mx_scores_folded(p_a, c, q_lo, q_hi, BN, PRMT)
                acc += tl.sum(_relu(sc) * w[None, :], axis=1)
            # the key scale after the head sum: ReLU(a·x) = a·ReLU(x) for a = 2^e > 0, exact
            tl.store(out_row + s_a, acc * kscale, mask=vis_a)
            # per entry, reduced once after the loop (no cross-warp reduction per tile)
            first_exact = tl.minimum(first_exact, tl.where(ok_a & (fold == 0), i, n_tiles))
        first_exact = tl.min(first_exact)
        # exact pass: per-block dots, each times both block scales (_mx_scores_exact); the barrier orders
        # its stores after the folded pass's to the same entries (by other threads, maybe)
        tl.debug_barrier()
        for i in range(tl.where(q_fold != 0, first_exact, i0), n_tiles, n_prog):
            s, vis, ok, page_off = _tile_pages(bt_row, i, n, num_pages, page_stride, BS, BN)
            ks_rows = cache_ptr + page_off + BS * 64 + (s % BS) * 4
            _, _, fold = _mx_fold(_mx_scale_bytes(ks_rows, ok))
            if (q_fold == 0) | (tl.max((ok & (fold == 0)).to(tl.int32)) != 0):
                k_rows = cache_ptr + page_off + (s % BS) * 64
                acc = tl.zeros([BN], dtype=tl.float32)
                for h0 in range(0, H, BH):
                    heads = h0 + tl.arange(0, BH)
                    hm = heads < H
                    q_rows, qs_rows = _mx_q_rows(q_ptr, qs_ptr, t, heads, H, q_stride_t, q_stride_h)
                    sc = _mx_scores_exact(k_rows, ks_rows, ok, q_rows, qs_rows, hm, BN, BH)
                    w = tl.load(w_row + heads, mask=hm, other=0.0)
                    acc += tl.sum(_relu(sc) * w[None, :], axis=1)
                tl.store(out_row + s, acc, mask=vis)
    else:
        if ONE_HB:  # every head in one block: the queries and weights stay in registers across tiles
            q0, w0 = _head_block(q_ptr, w_row, t, tl.arange(0, BH), H, q_stride_t, q_stride_h, BH)
        # PREFETCH: each tile's page indices are loaded one tile ahead (the key load then waits on no
        # dependent load of the block table)
        if PREFETCH:
            s0 = i0 * BN + tl.arange(0, BN)
            page_nx = tl.load(bt_row + s0 // BS, mask=s0 < n, other=-1)
        for i in tl.range(i0, n_tiles, n_prog, num_stages=STAGES):
            s = i * BN + tl.arange(0, BN)
            vis = s < n
            if PREFETCH:
                page = page_nx.to(tl.int64)
                s_nx = s + n_prog * BN
                page_nx = tl.load(bt_row + s_nx // BS, mask=s_nx < n, other=-1)
            else:
                page = tl.load(bt_row + s // BS, mask=vis, other=-1).to(tl.int64)
            ok, page_off = _page_offsets(page, vis, num_pages, page_stride)
            k, kscale = load_indexer_k_fp8(cache_ptr, page_off, s % BS, ok, BS, BN)
            # entries on the MMA's M side: the head sum stays within a warp (heads on M would reduce
            # across warps through shared memory on every tile)
            if ONE_HB and STAGES > 1:  # no head loop: the dot sits in the tile loop Triton pipelines
                acc = tl.sum(_relu(tl.dot(k, tl.trans(q0))) * w0[None, :], axis=1)
            else:  # (unpipelined, the head loop measured faster: 10.6-11.0 against 11.8-12.2 µs at B = 8)
                acc = tl.zeros([BN], dtype=tl.float32)
                for h0 in range(0, H, BH):
                    if ONE_HB:
                        q = q0
                        w = w0
                    else:
                        q, w = _head_block(q_ptr, w_row, t, h0 + tl.arange(0, BH), H, q_stride_t, q_stride_h, BH)
                    sc = tl.dot(k, tl.trans(q))  # [BN, BH] fp32
                    acc += tl.sum(_relu(sc) * w[None, :], axis=1)
            # the key scale after the head sum: ReLU(a·x) = a·ReLU(x) for a = 2^e > 0, exact
            tl.store(out_row + s, acc * kscale, mask=vis)


def logits_config(T: int, L: int, H: int, device: torch.device, block_n: int | None = None,
                  block_h: int | None = None, programs: int | None = None, num_warps: int | None = None,
                  prefetch: bool | None = None, mxfp4: bool = False, prmt: bool | None = None,
                  max_regs: int | None = None, stages: int | None = None):
    """(BN, BH, programs per token, warps, page-index prefetch, MXFP4 decode by byte permutes, register
    cap or None); 64 heads per block (one wgmma row block; 16 under the interpreter).

    FP8 from ``FP8_PIPELINE_MIN_T`` tokens on: 128-entry tiles, the tile loop software pipelined over
    ``FP8_STAGES`` stages (``cp.async`` of the next tiles' keys), at most six programs per SM; below:
    64-entry tiles, no pipelining, programs until every SM has eight; both load each tile's page
    indices one tile ahead. Swept on the H200 (64k context, logits alone; ``.old_tree/fp8_sweep.py``):
    pipelined 51.6 / 29.7 µs at B = 64 / 32 against 61.7 / 33.8 µs unpipelined (the op with the
    selection: 64.2 / 41.2 against 73.5 / 44.3 µs in ``benchmarks/attention.py --indexer``); at B = 8
    the unpipelined form with its head loop measured 10.6-11.0 µs, the pipelined 11.2-11.7 µs
    (and the op 22.5 against 19.6 µs), at B = 1 both 3.2 µs. With 64-entry tiles the pipelined loop
    is slower at B >= 32 (76.0 µs at B = 64), two and four stages are within 5 % of three, eight
    warps slower (76.6 µs at B = 64), and without the page prefetch 59.7 against 54.8 µs at B = 64.
    The unpipelined form's sweep (from 73.1 µs at B = 64 with 128-entry tiles and four programs per
    SM) chose its configuration.

    MXFP4 (the folded kernel, unpipelined: two or three stages measured slower, 83.1 / 87.6 against
    82.9 µs at B = 64): 128-entry tiles, ``MX_MAX_REGS`` registers, the byte-permute decode,
    at most four programs per SM (the register cap's occupancy: one wave). Swept on the H200
    (64k context, logits alone, B = 64 / 32 / 8 / 1; ``.old_tree/mx_sweep2.py``): BN 64 110.7 /
    51.5 / 18.3 / 5.2 against BN 128 93.9 / 46.0 / 17.4 / 5.1 µs; the arithmetic decode
    (``prmt=False``) 137.0 / 67.6 / 23.8 / 7.2 against 92.3 / 44.2 / 16.0 / 4.7 µs; 168 registers
    90.2 / 47.0 / 17.7 / 4.8; eight programs per SM 93.9 / 46.0 / 17.4 against four 88.0 / 46.5 / 15.2
    µs; an L1 prefetch of the next tile's rows did not help (93.9 against 92.2 µs at B = 64) and
    was removed."""
    interp = device.type != "cuda" or interpreting()
    piped = not (mxfp4 or interp) and T >= FP8_PIPELINE_MIN_T
    bn = block_n or (16 if interp else 128 if (mxfp4 or piped) else 64)
    bh = block_h or (16 if interp else 64)
    if programs is None:
        if mxfp4 or piped:  # whole programs per token within one wave (a second, partial wave: +20 %)
            programs = max(1, (4 if mxfp4 else 6) * sm_programs(device) // max(T, 1))
        else:
            programs = cdiv(8 * sm_programs(device), max(T, 1))
    programs = max(1, min(programs, cdiv(max(L, 1), bn)))
    prefetch = (True if prefetch is None else bool(prefetch)) and not mxfp4
    prmt = (not interp if prmt is None else bool(prmt)) and mxfp4 and not interp
    if interp:  # the interpreter takes no register cap
        max_regs = None
    elif max_regs is None and mxfp4:
        max_regs = MX_MAX_REGS
    stages = 1 if (interp or mxfp4) else (stages or (FP8_STAGES if piped else 1))
    return bn, bh, programs, num_warps or 4, prefetch, prmt, max_regs or None, stages


def indexer_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int,
                        fmt: str, compress_ratio: int, **config) -> torch.Tensor:
    """Write ``out[t, s]`` (fp32 ``[T, >= L]``, unit stride along entries) for the visible entries
    ``s < n_t`` only; the rest of ``out`` is left as it was."""
    T, H = q.shape[0], q.shape[1]
    L = block_table.shape[1] * block_size
    if T == 0 or L == 0:
        return out
    mxfp4 = fmt == "mxfp4"
    q = q.contiguous()
    weights = weights.contiguous()
    if mxfp4:
        q_scale = q_scale.contiguous()
    qb = q.view(torch.uint8)
    bn, bh, programs, warps, prefetch, prmt, max_regs, stages = logits_config(T, L, H, q.device, mxfp4=mxfp4,
                                                                             **config)
    # the byte-permute decode takes one table per four packed bytes, so each thread's bytes must come
    # as 16-byte vectors of one block of one row: what Triton emits for 16-byte aligned rows
    prmt = prmt and all(v % 16 == 0 for v in (k_cache.data_ptr(), k_cache.stride(0), qb.data_ptr(), qb.stride(0),
                                             qb.stride(1)))
    regs = {} if max_regs is None else {"maxnreg": max_regs}
    _indexer_logits_kernel[(T, programs)](
        qb, q_scale if mxfp4 else qb, weights, k_cache, block_table, token_to_req, positions, out,
        H, block_table.shape[0], k_cache.shape[0], k_cache.stride(0), L, compress_ratio,
        qb.stride(0), qb.stride(1), weights.stride(0), block_table.stride(0), out.stride(0),
        BS=block_size, BN=bn, BH=bh, MXFP4=mxfp4, ONE_HB=H <= bh, PREFETCH=prefetch, PRMT=prmt, STAGES=stages,
        num_warps=warps, **regs,
    )
    return out


def indexer_logits(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int, fmt: str,
                   compress_ratio: int, **config) -> torch.Tensor:
    """fp32 ``[T, M·block_size]`` logits, −inf where not visible (``reference.attention.indexer_logits``)."""
    T = q.shape[0]
    L = block_table.shape[1] * block_size
    out = torch.full((T, L), float("-inf"), dtype=torch.float32, device=q.device)
    return indexer_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size,
                               fmt, compress_ratio, **config)


def op_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int,
                   fmt: str, compress_ratio: int, **config) -> torch.Tensor:
    """``indexer_logits_into``'s result from the kernel ``indexer_topk`` runs: on Hopper with CuTe DSL
    (``kernels.cute.backend``) and pages of a multiple of 64 entries, the TMA / bulk-copy + wgmma
    kernels of ``kernels/cute/indexer_logits.py`` (FP8 and MXFP4) where their ``supports`` and
    ``preferred`` hold; else, or with a Triton ``config``, the Triton kernel."""
    if not config and q.device.type == "cuda":
        from ..cute._common import backend

        if backend(q.device) == "cute":
            from ..cute import indexer_logits as cute_logits

            T, L, sms = q.shape[0], block_table.shape[1] * block_size, sm_programs(q.device)
            if (cute_logits.supports(q, q_scale, weights, k_cache, block_size, fmt)
                    and cute_logits.preferred(T, L, sms, fmt)):
                return cute_logits.indexer_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req,
                                                       positions, block_size, fmt, compress_ratio,
                                                       programs=cute_logits.programs_for(T, L, sms, fmt))
    return indexer_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size,
                               fmt, compress_ratio, **config)


def indexer_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int, fmt: str,
                 topk: int, compress_ratio: int, chunk: int | None = None, **config) -> torch.Tensor:
    """The logits of the visible entries into an uninitialized ``[T, L]`` scratch (each row written
    and read only up to its visible count), then ``topk.select_topk``'s radix select. ``topk`` above
    the select's limit (``topk.MAX_CHUNK // 2``) falls back to ``reference.select_topk`` on the GPU
    (same result, a full sort)."""
    T = q.shape[0]
    L = block_table.shape[1] * block_size
    logits = torch.empty((T, L), dtype=torch.float32, device=q.device)
    op_logits_into(logits, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt,
                   compress_ratio, **config)
    if 2 * topk > _topk.MAX_CHUNK:
        n = visible_entries(positions, token_to_req, block_table.shape[0], compress_ratio, L)
        return select_topk_reference(logits, n, topk)
    return _topk.select_topk(logits, positions, token_to_req, block_table.shape[0], compress_ratio, topk,
                             sm_programs(q.device), chunk=chunk)


# ---------------------------------------------------------------------------------------------
# sparse MQA with sink
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attend(q, m_i, l_i, acc, cache_ptr, idx_ptr, lo, hi, page_stride, capacity, qk_scale, r0,
            BS: tl.constexpr, BN: tl.constexpr, DV: tl.constexpr):
    """Online softmax (base 2) of ``q [BH, 512]`` over the candidates ``idx[lo:hi]`` of one cache;
    ``acc [BH, DV]`` accumulates value dims ``64·r0 .. 64·r0+DV−1`` (a program may own part of them:
    the scores need the whole record, the values only its share, which keeps ``acc`` in registers)."""
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        jm = j < hi
        idx = tl.load(idx_ptr + j, mask=jm, other=-1).to(tl.int64)
        ok = jm & (idx >= 0) & (idx < capacity)
        slot = tl.where(ok, idx, 0)
        page_off = (slot // BS) * page_stride
        kv = tl.reshape(load_fp8_ds_mla(cache_ptr, page_off, slot % BS, ok, BS), [BN, 512])
        s = tl.dot(q, tl.trans(kv)) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DV == 512:
            v = kv
        else:  # the program's value dims, again from the record (an L1 hit)
            v = tl.reshape(load_fp8_ds_mla_rows(cache_ptr, page_off, slot % BS, ok, r0, BS, DV // 64), [BN, DV])
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc, sink_ptr, heads, hm):
    """``acc / (l + e^{sink − m})`` in the base-2 domain; an empty set (and a −inf sink) gives 0."""
    sink = tl.load(sink_ptr + heads, mask=hm, other=float("-inf")) * 1.4426950408889634
    m = tl.maximum(m_i, sink)
    a = tl.exp2(m_i - m)
    den = l_i * a + tl.exp2(sink - m)
    inv = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    return acc * (a * inv)[:, None]


@prebound
@triton.jit
def _sparse_attn_kernel(
    q_ptr, swa_ptr, swa_idx_ptr, comp_ptr, comp_idx_ptr, sink_ptr, o_ptr, part_ptr, m_ptr, l_ptr,
    H, W, K, per_split, q_stride_t, q_stride_h, o_stride_t, o_stride_h, swa_idx_stride, comp_idx_stride,
    swa_page_stride, comp_page_stride, swa_cap, comp_cap, qk_scale,
    SWA_BS: tl.constexpr, COMP_BS: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, DV: tl.constexpr,
    SPLIT: tl.constexpr, HAS_COMP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # grid: (token, candidate split, head block × value-dim share)
    pdl_enter(PDL)
    t = tl.program_id(0)
    sp = tl.program_id(1)
    hb = tl.program_id(2) // (512 // DV)
    dv0 = (tl.program_id(2) % (512 // DV)) * DV
    heads = hb * BH + tl.arange(0, BH)
    hm = heads < H
    d = tl.arange(0, 512)
    dv = dv0 + tl.arange(0, DV)
    q = tl.load(q_ptr + t.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h + d[None, :], mask=hm[:, None],
                other=0.0)
    start = sp * per_split
    end = tl.minimum(start + per_split, W + K)
    m_i = tl.full([BH], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, DV], dtype=tl.float32)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, swa_ptr, swa_idx_ptr + t.to(tl.int64) * swa_idx_stride,
                            tl.minimum(start, W), tl.minimum(end, W), swa_page_stride, swa_cap, qk_scale, dv0 // 64,
                            SWA_BS, BN, DV)
    if HAS_COMP:
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, comp_ptr, comp_idx_ptr + t.to(tl.int64) * comp_idx_stride,
                                tl.maximum(start, W) - W, tl.maximum(end, W) - W, comp_page_stride, comp_cap,
                                qk_scale, dv0 // 64, COMP_BS, BN, DV)
    if SPLIT:
        n_split = tl.num_programs(1)
        row = (t.to(tl.int64) * n_split + sp) * H + heads
        tl.store(part_ptr + row[:, None] * 512 + dv[None, :], acc, mask=hm[:, None])
        first = hm & ((heads * 0 + dv0) == 0)  # every share computes the same (m, l): one stores them
        tl.store(m_ptr + row, m_i, mask=first)
        tl.store(l_ptr + row, l_i, mask=first)
    else:
        out = _finish(m_i, l_i, acc, sink_ptr, heads, hm)
        tl.store(o_ptr + t.to(tl.int64) * o_stride_t + heads[:, None] * o_stride_h + dv[None, :],
                 out.to(tl.bfloat16), mask=hm[:, None])


@prebound
@triton.jit
def _combine_kernel(part_ptr, m_ptr, l_ptr, sink_ptr, o_ptr, H, n_split, o_stride_t, o_stride_h,
                    BH: tl.constexpr, DC: tl.constexpr, PDL: tl.constexpr = False):
    """Merge the split-K partials of ``BH`` heads and ``DC`` value dims of one token (program axis 2
    walks the 512 value dims in ``DC`` chunks, so a one-token step still fills the GPU), one split
    after the other."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = heads < H
    d = tl.program_id(2) * DC + tl.arange(0, DC)
    base = t.to(tl.int64) * n_split * H + heads
    m = tl.full([BH], _NEG_BIG, tl.float32)
    for sp in range(0, n_split):
        m = tl.maximum(m, tl.load(m_ptr + base + sp * H, mask=hm, other=_NEG_BIG))
    l_i = tl.zeros([BH], dtype=tl.float32)
    acc = tl.zeros([BH, DC], dtype=tl.float32)
    for sp in range(0, n_split):
        a = tl.exp2(tl.load(m_ptr + base + sp * H, mask=hm, other=_NEG_BIG) - m)
        l_i += a * tl.load(l_ptr + base + sp * H, mask=hm, other=0.0)
        part = tl.load(part_ptr + (base + sp * H)[:, None] * 512 + d[None, :], mask=hm[:, None], other=0.0)
        acc += a[:, None] * part
    out = _finish(m, l_i, acc, sink_ptr, heads, hm)
    tl.store(o_ptr + t.to(tl.int64) * o_stride_t + heads[:, None] * o_stride_h + d[None, :], out.to(tl.bfloat16),
             mask=hm[:, None])


@prebound
@triton.jit
def _combine_all_kernel(part_ptr, m_ptr, l_ptr, sink_ptr, o_ptr, H, n_split, o_stride_t, o_stride_h,
                        NS: tl.constexpr, BH: tl.constexpr, DC: tl.constexpr, PDL: tl.constexpr = False):
    """``_combine_kernel`` with all ``n_split <= NS`` splits loaded at once, ``[NS, BH, DC]``: one
    round trip to memory instead of a loop of them. For the smallest steps only (see
    ``combine_config``)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    hm = heads < H
    d = tl.program_id(2) * DC + tl.arange(0, DC)
    sp = tl.arange(0, NS)
    rows = (t.to(tl.int64) * n_split + sp[:, None]) * H + heads[None, :]  # [NS, BH]
    ok = (sp < n_split)[:, None] & hm[None, :]
    ms = tl.load(m_ptr + rows, mask=ok, other=_NEG_BIG)
    m = tl.max(ms, axis=0)
    a = tl.where(ok, tl.exp2(ms - m[None, :]), 0.0)
    l_i = tl.sum(a * tl.load(l_ptr + rows, mask=ok, other=0.0), axis=0)
    part = tl.load(part_ptr + rows[:, :, None] * 512 + d[None, None, :], mask=ok[:, :, None], other=0.0)
    acc = tl.sum(a[:, :, None] * part, axis=0)
    out = _finish(m, l_i, acc, sink_ptr, heads, hm)
    tl.store(o_ptr + t.to(tl.int64) * o_stride_t + heads[:, None] * o_stride_h + d[None, :], out.to(tl.bfloat16),
             mask=hm[:, None])


def combine_config(T: int, H: int, splits: int, sms: int, max_elems: int = 8192):
    """(NS, BH, DC) of ``_combine_all_kernel``: every split at once (``NS`` = the next power of two), at
    most ``max_elems`` partial values per 4-warp program (16 heads x 512 dims when few splits: fewer
    heads before value-dim chunks under 128), and value-dim chunks down to 64 while the tokens alone
    leave SMs idle."""
    ns = next_pow2(splits)
    bh, dc = min(16, next_pow2(H)), 512
    while ns * bh * dc > max_elems and dc > 128:  # rows of >= 512 bytes first, then fewer heads
        dc //= 2
    while ns * bh * dc > max_elems and bh > 1:
        bh //= 2
    while ns * bh * dc > max_elems and dc > 16:
        dc //= 2
    while T * cdiv(H, bh) * (512 // dc) < sms and dc > 64:
        dc //= 2
    return ns, bh, dc


def launch_config(T: int, H: int, n_cand: int, device: torch.device, block_h: int | None = None,
                  block_n: int | None = None, num_warps: int | None = None, splits: int | None = None,
                  block_dv: int | None = None):
    """(BH, BN, DV, warps, splits, candidates per split), from the H100 and H200 sweeps
    (``benchmarks/attention.py --sweep``):

    * enough tokens to give every SM a ninth of a program or more (``WIDE_SHARE``): 64 heads per
      program (the MQA group shares each K/V tile; 8 warps), split over the candidates in as many
      parts as fit one wave, at least 2 (each split writes fp32 partials of [H, 512] per token;
      each a whole number of ``BN``-candidate tiles); when two splits no longer fit one wave, 2 from
      256 candidates, else none (a prefill of the 128-candidate SWA layer). H200, 64 heads, 640
      candidates, 64k context: B = 16 / 24 / 32 took 40.6 / 42.4 / 48.5 µs with 4 splits against
      45.7 / 57.7 / 59.3 µs with the 16-head programs below (80 µs at B = 32 with their former split
      count, slower than B = 64); with 2 splits 44–59 µs; at B = 48 / 64, 2 splits (62 / 68 µs) beat
      4 (83 / 94 µs); at B = 16, 5 splits (8 fit, rounded to whole 64-candidate tiles: 128 each)
      34.8 µs against 40.1 with 4. The SWA-only layer (128 candidates) at B = 32: 2 splits 16.2 µs,
      1 split 20.1 µs. At B = 12 the 16-head programs win (29.5 against 40 µs);
    * fewer tokens: 16 heads per program (4 warps) and split-K up to two programs per SM.

    Every argument can be forced (the sweep does)."""
    sms = sm_programs(device)
    wide = T * cdiv(H, 64) * WIDE_SHARE >= sms
    bh = block_h or (min(64, max(16, next_pow2(H))) if wide else 16)
    bn = block_n or (64 if bh >= 64 else 32)
    dv = block_dv or 512
    warps = num_warps or (8 if bh >= 64 else 4)
    base = T * cdiv(H, bh) * (512 // dv)
    max_splits = max(1, cdiv(n_cand, bn))
    if splits is None:
        if wide:  # as many splits as fit one wave, at least 2 (beyond one wave: 2 from 256 candidates)
            splits = sms // base if 2 * base <= sms else (2 if n_cand >= 256 else 1)
        else:
            splits = cdiv(2 * sms, base)
    splits = max(1, min(splits, max_splits))
    per_split = cdiv(cdiv(max(n_cand, 1), splits), bn) * bn
    splits = max(1, cdiv(n_cand, per_split))
    return bh, bn, dv, warps, splits, per_split


def sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale: float, swa_block_size: int,
                comp_block_size: int, **config) -> torch.Tensor:
    T, H, _ = q.shape
    out = torch.empty((T, H, layouts.KV_HEAD_DIM), dtype=torch.bfloat16, device=q.device)
    if T == 0 or H == 0:
        return out
    has_comp = comp_indices is not None and comp_indices.shape[1] > 0 and comp_cache.shape[0] > 0
    W = swa_indices.shape[1] if swa_cache.shape[0] > 0 else 0  # an empty cache has nothing to attend to
    K = comp_indices.shape[1] if has_comp else 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    swa_indices = swa_indices.contiguous()
    comp_indices = comp_indices.contiguous() if has_comp else swa_indices
    comp_cache = comp_cache if has_comp else swa_cache
    sink = sink.contiguous()
    bh, bn, dv, warps, splits, per_split = launch_config(T, H, W + K, q.device, **config)
    split = splits > 1
    if split:
        part = torch.empty((T, splits, H, layouts.KV_HEAD_DIM), dtype=torch.float32, device=q.device)
        m = torch.empty((T, splits, H), dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
    else:
        part = m = l_ = sink  # unused
    _sparse_attn_kernel[(T, splits, cdiv(H, bh) * (512 // dv))](
        q, swa_cache, swa_indices, comp_cache, comp_indices, sink, out, part, m, l_,
        H, W, K, per_split, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        swa_indices.stride(0), comp_indices.stride(0), swa_cache.stride(0), comp_cache.stride(0),
        swa_cache.shape[0] * swa_block_size, comp_cache.shape[0] * comp_block_size, scale * LOG2E,
        SWA_BS=swa_block_size, COMP_BS=comp_block_size, BH=bh, BN=bn, DV=dv, SPLIT=split, HAS_COMP=has_comp,
        num_warps=warps,
    )
    if split:
        combine_splits(part, m, l_, sink, out, min(bh, 16))
    return out


def combine_splits(part, m, l_, sink, out, max_bh: int = 16) -> None:
    """Merge split-K partials ``part`` fp32 ``[T, S, H, 512]``, ``m`` / ``l_`` fp32 ``[T, S, H]``
    (base-2 running max and sum of each split) with the sink into bf16 ``out [T, H, 512]``: all
    splits at once for up to ``COMBINE_ALL_MAX_ROWS`` (token, head) rows, else one split after the
    other (``max_bh`` heads × 512 dims per program, or 4 heads × 128 dims when that leaves SMs idle)."""
    T, splits, H, _ = part.shape
    sms = sm_programs(out.device)
    if T * H <= COMBINE_ALL_MAX_ROWS:
        ns, cbh, dc = combine_config(T, H, splits, sms)
        _combine_all_kernel[(T, cdiv(H, cbh), 512 // dc)](
            part, m, l_, sink, out, H, splits, out.stride(0), out.stride(1), NS=ns, BH=cbh, DC=dc, num_warps=4,
        )
    else:
        cbh, dc = (max_bh, 512) if T * cdiv(H, 16) >= sms else (4, 128)
        _combine_kernel[(T, cdiv(H, cbh), 512 // dc)](
            part, m, l_, sink, out, H, splits, out.stride(0), out.stride(1), BH=cbh, DC=dc, num_warps=4,
        )

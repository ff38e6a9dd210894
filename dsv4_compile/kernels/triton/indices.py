"""Triton kernels for the sparse-attention index ops (docs/numerics.md §8.1), bit-exact with
``reference.indices``.

* ``_window_kernel`` (``swa_indices`` and ``compressed_indices``, selected by the ``COMPRESSED``
  constexpr): a 2-D grid of ``BLOCK_T`` tokens × ``BLOCK_W`` columns. Each row's visible range and
  length come from its position alone, so the programs are independent; the first column block of a
  token block writes ``lens``.
* ``_topk_kernel`` (``global_topk_indices``): one program per ``BLOCK_T`` tokens walks the K columns
  in ``BLOCK_K`` chunks and counts the valid slots as it goes (``lens`` needs the whole row).

Every table read is masked and its offset clamped to 0 when masked (requests outside ``[0, R)``,
blocks outside ``[0, M)``), slot arithmetic is int64, stores are int32. Launchers take validated
inputs (the ops validate), accept strided 1-D / 2-D inputs, and never launch for T == 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTS, cdiv, next_pow2, pdl_enter
from ._launch import prebound


@triton.jit
def _slots(bt_ptr, bt_stride_r, bt_stride_m, n_blk, block_size, req, idx, ok, BS_LOG2: tl.constexpr):
    """int64 slots of logical entries ``idx [BT, BW]`` (int64) of rows ``req [BT]`` (int64, valid
    where ``ok``); −1 where not ``ok``, the block is outside ``[0, n_blk)`` or the entry is < 0.
    ``BS_LOG2 >= 0``: ``block_size == 2^BS_LOG2`` (shift and mask instead of an int64 division, which
    is a long software sequence on the GPU); −1: any block size."""
    if BS_LOG2 >= 0:
        blk = idx >> BS_LOG2
        within = idx & ((1 << BS_LOG2) - 1)
    else:
        blk = idx // block_size
        within = idx % block_size
    ok = ok & (idx >= 0) & (blk < n_blk)
    off = tl.where(ok, req[:, None] * bt_stride_r + blk * bt_stride_m, 0)
    entry = tl.load(bt_ptr + off, mask=ok, other=-1).to(tl.int64)
    return tl.where(entry >= 0, entry * block_size + within, -1)


@prebound
@triton.jit
def _window_kernel(
    pos_ptr, req_ptr, bt_ptr, out_ptr, lens_ptr,
    T, n_req, n_blk, bt_stride_r, bt_stride_m, pos_stride, req_stride, block_size, width, ratio,
    COMPRESSED: tl.constexpr, BS_LOG2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # Row t: logical entries start + j for j < n (SWA: start = max(0, p-window+1), n = min(p+1, window);
    # compressed: start = 0, n = min((p+1)//ratio, width)); width columns in all (SWA: width = window).
    pdl_enter(PDL)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    t_ok = tok < T
    t64 = tok.to(tl.int64)
    p = tl.load(pos_ptr + t64 * pos_stride, mask=t_ok, other=-1).to(tl.int64)
    r = tl.load(req_ptr + t64 * req_stride, mask=t_ok, other=-1).to(tl.int64)
    valid = t_ok & (p >= 0) & (r >= 0) & (r < n_req)
    if COMPRESSED:
        n = tl.minimum((p + 1) // ratio, width)
        start = tl.zeros_like(p)
    else:
        n = tl.minimum(p + 1, width)
        start = tl.maximum(p - width + 1, 0)
    n = tl.where(valid, n, 0)
    c64 = col.to(tl.int64)
    in_row = c64[None, :] < n[:, None]
    slot = _slots(bt_ptr, bt_stride_r, bt_stride_m, n_blk, block_size, r, start[:, None] + c64[None, :], in_row,
                  BS_LOG2)
    out_off = t64[:, None] * width + c64[None, :]
    tl.store(out_ptr + out_off, slot.to(tl.int32), mask=t_ok[:, None] & (col < width)[None, :])
    if tl.program_id(1) == 0:
        tl.store(lens_ptr + tok, n.to(tl.int32), mask=t_ok)


@prebound
@triton.jit
def _topk_kernel(
    topk_ptr, req_ptr, bt_ptr, out_ptr, lens_ptr,
    T, K, n_req, n_blk, bt_stride_r, bt_stride_m, topk_stride_t, topk_stride_k, req_stride, block_size,
    BS_LOG2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tok < T
    t64 = tok.to(tl.int64)
    r = tl.load(req_ptr + t64 * req_stride, mask=t_ok, other=-1).to(tl.int64)
    valid = t_ok & (r >= 0) & (r < n_req)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = t_ok[:, None] & (k < K)[None, :]
        k64 = k.to(tl.int64)
        idx = tl.load(topk_ptr + t64[:, None] * topk_stride_t + k64[None, :] * topk_stride_k, mask=m, other=-1)
        slot = _slots(bt_ptr, bt_stride_r, bt_stride_m, n_blk, block_size, r, idx.to(tl.int64), valid[:, None] & m,
                      BS_LOG2)
        count += tl.sum((slot >= 0).to(tl.int32), axis=1)
        tl.store(out_ptr + t64[:, None] * K + k64[None, :], slot.to(tl.int32), mask=m)
    tl.store(lens_ptr + tok, count, mask=t_ok)


# ~1024 outputs per program: small decode batches still spread over many SMs.
_TILE = 1024


def _block_w(width: int) -> int:
    return max(16, min(256, next_pow2(width)))


def _bs_log2(block_size: int) -> int:
    return block_size.bit_length() - 1 if block_size & (block_size - 1) == 0 else -1


def _window(positions, block_table, token_to_req, block_size, width, ratio, compressed):
    t = positions.shape[0]
    dev = positions.device
    out = torch.empty((t, width), dtype=torch.int32, device=dev)
    lens = torch.empty((t,), dtype=torch.int32, device=dev)
    if t == 0:
        return out, lens
    block_w = _block_w(width)
    block_t = max(1, _TILE // block_w)
    grid = (cdiv(t, block_t), cdiv(width, block_w))
    n_req, n_blk = block_table.shape
    _window_kernel[grid](
        positions, token_to_req, block_table, out, lens,
        t, n_req, n_blk, block_table.stride(0), block_table.stride(1), positions.stride(0), token_to_req.stride(0),
        block_size, width, ratio,
        COMPRESSED=compressed, BS_LOG2=_bs_log2(block_size), BLOCK_T=block_t, BLOCK_W=block_w, **LAUNCH_OPTS,
    )
    return out, lens


def swa_indices(positions, block_table, token_to_req, block_size: int, window: int):
    return _window(positions, block_table, token_to_req, block_size, window, 1, False)


def compressed_indices(positions, block_table, token_to_req, block_size: int, compress_ratio: int, width: int):
    return _window(positions, block_table, token_to_req, block_size, width, compress_ratio, True)


def global_topk_indices(topk, block_table, token_to_req, block_size: int):
    t, k = topk.shape
    dev = topk.device
    out = torch.empty((t, k), dtype=torch.int32, device=dev)
    lens = torch.empty((t,), dtype=torch.int32, device=dev)
    if t == 0:
        return out, lens
    block_k = _block_w(k)
    block_t = max(1, _TILE // block_k)
    n_req, n_blk = block_table.shape
    _topk_kernel[(cdiv(t, block_t),)](
        topk, token_to_req, block_table, out, lens,
        t, k, n_req, n_blk, block_table.stride(0), block_table.stride(1), topk.stride(0), topk.stride(1),
        token_to_req.stride(0), block_size,
        BS_LOG2=_bs_log2(block_size), BLOCK_T=block_t, BLOCK_K=block_k, **LAUNCH_OPTS,
    )
    return out, lens


def compile_cases(arch: int):
    """``(kernel, signature, constexprs)`` for every kernel variant, in ``compile_check._cases``'s format:
    both kernels, SWA and compressed rows, power-of-two and general block sizes, int32 and int64
    positions / requests, at the tiles the launchers pick for the serving widths; ``PDL`` as launched (on
    sm_90+)."""
    pdl = arch >= 90  # launched with PDL from sm_90 (ptxas rejects griddepcontrol below)
    table = dict(bt_ptr="*i32", out_ptr="*i32", lens_ptr="*i32", n_req="i32", n_blk="i32", bt_stride_r="i32",
                 bt_stride_m="i32", req_stride="i32", block_size="i32")
    for idx_dt, compressed, bs_log2 in [("*i64", False, 6), ("*i32", False, -1), ("*i64", True, -1), ("*i32", True, 6)]:
        yield _window_kernel, dict(
            pos_ptr=idx_dt, req_ptr=idx_dt, **table, T="i32", pos_stride="i32", width="i32", ratio="i32",
        ), dict(COMPRESSED=compressed, BS_LOG2=bs_log2, BLOCK_T=4 if compressed else 8,
                BLOCK_W=256 if compressed else 128, PDL=pdl)
    for idx_dt, bs_log2 in [("*i64", 6), ("*i32", -1)]:
        yield _topk_kernel, dict(
            topk_ptr="*i32", req_ptr=idx_dt, **table, T="i32", K="i32", topk_stride_t="i32", topk_stride_k="i32",
        ), dict(BS_LOG2=bs_log2, BLOCK_T=4, BLOCK_K=256, PDL=pdl)

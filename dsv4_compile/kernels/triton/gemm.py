"""Block-scaled FP8 GEMM for ``dsv4::fp8_block_gemm`` (``reference.gemm``): e4m3 tensor-core dots per
128-wide K block, each scaled by its activation (1x128) and weight (128x128) scale into one fp32
accumulator per tile. Small M (decode) is weight-bandwidth bound: the N x K weight is split over
N blocks and, when those leave SMs idle, over K (split-K partials in fp32, summed in a fixed order
afterwards, so the result is deterministic)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _device

BLOCK = 128


@triton.jit
def _fp8_block_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, KB, kb_per_split,
    x_stride, xs_stride, w_stride, ws_stride, out_stride_s, out_stride_m,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Program (m tile, n tile of 128 = one weight-scale row, K split): ``out[split, m, n]`` (fp32
    partial when split, else the output dtype) = Σ over its K blocks of dot · x_scale · w_scale."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, 128)
    mm = rm < M
    nm = rn < N
    kb0 = ps * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, KB)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * x_stride + rk[None, :]
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride + rk[None, :]
    for kb in range(kb0, kb1):
        a = tl.load(x_rows + kb * 128, mask=mm[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        b = tl.load(w_rows + kb * 128, mask=nm[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        d = tl.dot(a, tl.trans(b))  # [BM, BN] fp32: exact e4m3 products, fp32 sums
        sa = tl.load(xs_ptr + rm.to(tl.int64) * xs_stride + kb, mask=mm, other=0.0)
        sb = tl.load(ws_ptr + pn * ws_stride + kb)
        acc += d * (sa[:, None] * sb)
    out = out_ptr + ps.to(tl.int64) * out_stride_s + rm.to(tl.int64)[:, None] * out_stride_m + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def _sms(device: torch.device) -> int:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 8
    return _device.sm_count(_device.index(device))


def gemm_config(M: int, N: int, KB: int, device: torch.device, block_m: int | None = None,
                splits: int | None = None, num_warps: int | None = None):
    """(BM, splits, warps): 16-row tiles up to M = 16, then 32 / 64; split-K until the tiles give every
    SM two programs (at least one K block per split)."""
    bm = block_m or (16 if M <= 16 else 32 if M <= 32 else 64)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, BLOCK)
    if splits is None:
        splits = triton.cdiv(2 * _sms(device), tiles) if tiles < 2 * _sms(device) else 1
    splits = max(1, min(splits, KB))
    return bm, splits, num_warps or 4


def fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16, **config) -> torch.Tensor:
    M, K = x_q.shape
    N = w_q.shape[0]
    KB = K // BLOCK
    out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if M == 0 or N == 0:
        return out
    if KB == 0:
        return out.zero_()
    xb = x_q.contiguous().view(torch.uint8)
    wb = w_q.contiguous().view(torch.uint8)
    xs = x_scale.to(torch.float32).contiguous()
    ws = w_scale.to(torch.float32).contiguous()
    bm, splits, warps = gemm_config(M, N, KB, x_q.device, **config)
    per = triton.cdiv(KB, splits)
    splits = triton.cdiv(KB, per)
    dst = out if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=x_q.device)
    _fp8_block_gemm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, BLOCK), splits)](
        xb, xs, wb, ws, dst, M, N, KB, per, xb.stride(0), xs.stride(0), wb.stride(0), ws.stride(0),
        dst.stride(0) if splits > 1 else 0, dst.stride(-2), BM=bm, BN=BLOCK, num_warps=warps,
    )
    if splits > 1:
        out.copy_(dst.sum(dim=0))
    return out

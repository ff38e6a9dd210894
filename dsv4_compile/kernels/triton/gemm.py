"""Block-scaled FP8 GEMM for ``dsv4::fp8_block_gemm`` (``reference.gemm``): e4m3 tensor-core dots per
128-wide K block, each scaled by its activation (1x128) and weight (128x128) scale into one fp32
accumulator per tile.

Small M (decode) is weight-bandwidth bound: the ``N x K`` weight streams through a pipelined K loop
(``STAGES`` tiles in flight per program), split over N tiles and, when those leave SMs idle, over K.
A split-K program writes its fp32 partial, then takes a ticket on its tile's counter; the program
that takes the last ticket sums the partials **in split order** (so the result does not depend on
which program finished last: deterministic) into the output and resets the counter. One launch per
GEMM, no second reduction kernel. The counters are one zeroed ``int32`` buffer per device (see
``_device.zeroed_counters``), left zero by every call.

A grouped ``x_q [M, G, K]`` is DSv4's ``wo_a``: output columns ``[g·N/G, (g+1)·N/G)`` are group g's
input times the weight rows of the same range, one launch for every group. Activations and their
scales are read through their strides (the fused output quant's group-major ``o`` and MN-major
scales need no copy).

One row (M = 1, the B = 1 decode step) goes to a CUDA-core GEMV (``_gemv_kernel``) instead: the
tiled kernel's tensor-core dot buys nothing for one row and its K pipeline starts loading only after
the grid-dependency wait. Each GEMV program owns ``R`` whole weight rows (up to 8192 K columns: one
contiguous 16-32 KiB slab) and issues all of its weight loads *before* the wait, so under
programmatic dependent launch the weight stream overlaps the previous kernel's tail; then the
activation row is dequantized once per program with both block scales folded in (``x_q · x_scale ·
w_scale``: the ``R`` rows share one 128-row weight-scale block) and each output is one fp32 dot of
the weight row with it. Longer K splits over programs, reduced in split order as above. The ops
therefore require that a weight is not the output of the kernel launched just before them (a
checkpoint weight never is); a weight the launcher has to copy first is launched without PDL. The
same GEMV runs ``linear_fp32`` (bf16 / fp16 / fp32 weight, fp32 output) for one row. A narrow weight
(``GEMV_NARROW_N`` rows at most) also runs it for 2 to ``GEMV_NARROW_MAX_M`` rows (``_gemv_rows``).

From 2 to ``CUTE_MAX_M`` rows (and one row of K ≤ ``CUTE_ROW_MAX_K``; up to ``CUTE_UNSPLIT_MAX_M`` rows
where its launch is unsplit), where CuTe DSL runs on Hopper, the CuTe-DSL kernel of ``kernels.cute.gemm``
takes the call (TMA weight stream filled by a producer warp, wgmma with the weight rows on M;
``_cute_preferred``).

Large M (prefill) goes to cuBLAS through ``torch._scaled_mm`` with block-wise scales where this
torch / GPU takes them (probed once per device), else to the same kernel with 128-row tiles.
``DSV4_FP8_GEMM=triton`` forces the tiled Triton kernel (``backend="scaled_mm"`` forces cuBLAS, ``"gemv"``
the GEMV, for tests and benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ... import layouts
from .. import _device
from ...reference.gemm import weight_scale_fp32
from ._common import cdiv, fp8_quant_rows, interpreting, next_pow2, pdl_enter, sm_programs
from ._launch import prebound

BLOCK = layouts.WEIGHT_BLOCK  # the kernel's K step and N tile bound are this 128
COUNTERS = 4096  # split-K tile counters per device; splitting is used below 2 tiles per SM
SCALED_MM_MIN_M = 256  # from this many rows the GEMM is compute-bound: cuBLAS when it takes block scales
GEMM_ENV = "DSV4_FP8_GEMM"
GEMV_MAX_M = 1  # rows the automatic dispatch gives the GEMV (FP8: at M = 2 the tiled kernel is faster on an
# H200; linear_fp32: cuBLAS above)
GEMV_NARROW_N = 2048  # a weight of at most this many rows (wq_a+wkv: 1536) runs the GEMV up to
GEMV_NARROW_MAX_M = 3  # this many rows (_gemv_rows)
GEMV_FORCED_MAX_M = 4  # rows the GEMV takes at all (one unrolled pass over the tile per row)
GEMV_MAX_KC = 8192  # K columns of one GEMV program's slab; longer K splits over programs
GEMV_TILE = 16384  # weight elements of a GEMV program (rows = max(4, GEMV_TILE // KC), ≤ 16: fewer when K < 1024)
GEMV_KEYS = ("rows", "k_chunk")  # configuration keywords of the GEMV (the tiled kernel's: gemm_config's)


@prebound
@triton.jit
def _fp8_block_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, q_tmp_ptr, q_tmp_u8_ptr, M, N, KB, kb_per_split,
    n_per_group,
    x_stride_m, x_stride_g, xs_stride_m, xs_stride_g, xs_stride_k, w_stride, ws_stride, out_stride, amax_floor,
    BM: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr, U8: tl.constexpr,
    QUANT_X: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (m tile, n tile of ``BN`` rows inside one 128-row weight-scale block, K split):
    Σ over its K blocks of dot · x_scale · w_scale; with ``SPLIT`` the partial goes to
    ``part[split, m, n]`` and the last of the tile's programs sums the partials in split order.
    ``QUANT_X``: ``x`` is bf16 / fp16 / fp32 and each 1x128 block is quantized in registers as
    ``fp8_block_quant(x, 128, amax_floor)`` does (``xs_ptr`` unused): ``fp8_linear``."""
    pdl_enter(PDL)
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ps = tl.program_id(2)
    n0 = pn * BN
    grp = (n0 // n_per_group).to(tl.int64)  # the group of this N tile (0 when not grouped)
    rm = pm * BM + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    rk = tl.arange(0, 128)
    mm = rm < M
    nm = rn < N
    kb0 = ps * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, KB)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * x_stride_m + grp * x_stride_g + rk[None, :]
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride + rk[None, :]
    xs_rows = xs_ptr + rm.to(tl.int64) * xs_stride_m + grp * xs_stride_g
    ws_row = ws_ptr + (n0 // 128) * ws_stride
    for kb in tl.range(kb0, kb1, num_stages=STAGES):
        a = tl.load(x_rows + kb * 128, mask=mm[:, None], other=0.0)
        b = tl.load(w_rows + kb * 128, mask=nm[:, None], other=0.0)
        if U8:  # the interpreter has no FP8 pointers: bytes, reinterpreted
            b = b.to(tl.float8e4nv, bitcast=True)
        if QUANT_X:  # padding rows are zeros: scale = the floor's, discarded
            a, sa = fp8_quant_rows(a.to(tl.float32), amax_floor)
            if U8:  # the interpreter's in-register e4m3 values are not the stored codes: through memory
                t = tl.arange(0, BM)[:, None] * 128 + rk[None, :]
                tl.store(q_tmp_ptr + t, a)
                a = tl.load(q_tmp_u8_ptr + t).to(tl.float8e4nv, bitcast=True)
        else:
            if U8:
                a = a.to(tl.float8e4nv, bitcast=True)
            sa = tl.load(xs_rows + kb * xs_stride_k, mask=mm, other=0.0)
        d = tl.dot(a, tl.trans(b))  # [BM, BN] fp32: exact e4m3 products, fp32 sums
        sb = tl.load(ws_row + kb)
        acc += d * (sa[:, None] * sb)
    out = out_ptr + rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    omask = mm[:, None] & nm[None, :]
    if SPLIT:
        n_split = tl.num_programs(2)
        tile_elems = (tl.zeros([], dtype=tl.int64) + M) * N  # int64 even when M or N is specialized to 1
        part = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(part + ps * tile_elems, acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the ticket (release, GPU scope)
        cnt = cnt_ptr + pm * tl.num_programs(1) + pn
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:  # the last program of the tile: every partial is visible (acquire)
            total = tl.zeros([BM, BN], dtype=tl.float32)
            for s in range(0, n_split):
                total += tl.load(part + s * tile_elems, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt, 0)  # ready for the next GEMM on this stream
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _gemv_x_eff(x_ptr, xs_ptr, ws_row, rk, km, kbs, kbm, xs_stride_k, amax_floor, KC: tl.constexpr,
                U8: tl.constexpr, X_MODE: tl.constexpr):
    """fp32 ``[KC]`` of one activation row, as the weight row is dotted with it. ``X_MODE`` 0: e4m3
    values times their 1x128 scale times the tile's weight scale; 1: the row quantized here first, as
    ``fp8_block_quant(x, 128, amax_floor)``, then the same; 2 (float weights): the values as they are."""
    KCB: tl.constexpr = KC // 128
    if X_MODE == 2:
        return tl.load(x_ptr + rk, mask=km, other=0.0).to(tl.float32)
    sb = tl.load(ws_row + kbs, mask=kbm, other=0.0)
    if X_MODE == 1:  # columns past K are zeros: their block's scale is the floor's, multiplied by zeros
        xb = tl.reshape(tl.load(x_ptr + rk, mask=km, other=0.0).to(tl.float32), (KCB, 128))
        q, sa = fp8_quant_rows(xb, amax_floor)
        xq = q.to(tl.float32)
    else:
        xv = tl.load(x_ptr + rk, mask=km, other=0.0)
        if U8:
            xv = xv.to(tl.float8e4nv, bitcast=True)
        xq = tl.reshape(xv.to(tl.float32), (KCB, 128))
        sa = tl.load(xs_ptr + kbs * xs_stride_k, mask=kbm, other=0.0)
    return tl.reshape(xq * (sa * sb)[:, None], (KC,))


@prebound
@triton.jit
def _gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, n_per_group,
    x_stride_m, x_stride_g, xs_stride_m, xs_stride_g, xs_stride_k, w_stride, ws_stride, out_stride, amax_floor,
    R: tl.constexpr, KC: tl.constexpr, MB: tl.constexpr, SPLIT: tl.constexpr, U8: tl.constexpr,
    X_MODE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (``R`` weight rows inside one 128-row scale block and one group, K split of ``KC``
    columns): its ``[R, KC]`` weight slab is loaded before the grid-dependency wait (the ops require
    that the weight is not the previous kernel's output; checkpoint weights never are); then for each
    of the ``M ≤ MB`` activation rows ``out[m, n] = Σ_k w[n, k] · x_eff[m, k]`` in fp32
    (``_gemv_x_eff``; ``X_MODE`` 2: a bf16 / fp16 / fp32 weight and activation, ``linear_fp32``).
    With ``SPLIT`` the partials go to ``part[split, m, n]`` and the last program of the rows sums
    them in split order."""
    KCB: tl.constexpr = KC // 128
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    n0 = pn * R
    rn = n0 + tl.arange(0, R)
    nm = rn < N
    rk = ps * KC + tl.arange(0, KC)
    km = rk < K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * w_stride + rk[None, :], mask=nm[:, None] & km[None, :],
                other=0.0)
    pdl_enter(PDL)  # nothing above reads what the previous kernel writes
    if U8 and X_MODE != 2:
        w = w.to(tl.float8e4nv, bitcast=True)
    wf = w.to(tl.float32)
    grp = (n0 // n_per_group).to(tl.int64)
    kbs = ps * KCB + tl.arange(0, KCB)
    kbm = kbs * 128 < K
    ws_row = ws_ptr + (n0 // 128) * ws_stride
    tile_elems = (tl.zeros([], dtype=tl.int64) + M) * N  # int64 even when M or N is specialized to 1
    for m in tl.static_range(MB):
        if m < M:
            xe = _gemv_x_eff(x_ptr + m * x_stride_m + grp * x_stride_g, xs_ptr + m * xs_stride_m + grp * xs_stride_g,
                             ws_row, rk, km, kbs, kbm, xs_stride_k, amax_floor, KC, U8, X_MODE)
            acc = tl.sum(wf * xe[None, :], axis=1)  # [R]
            if SPLIT:
                tl.store(part_ptr + ps * tile_elems + m * N + rn, acc, mask=nm)
            else:
                tl.store(out_ptr + m * out_stride + rn, acc.to(out_ptr.dtype.element_ty), mask=nm)
    if SPLIT:
        tl.debug_barrier()  # every thread's partial is written before the ticket (release, GPU scope)
        n_split = tl.num_programs(1)
        cnt = cnt_ptr + pn
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:  # the last program of these rows: every partial is visible (acquire)
            rm = tl.arange(0, MB)
            omask = (rm < M)[:, None] & nm[None, :]
            part = part_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
            total = tl.zeros([MB, R], dtype=tl.float32)
            for s in range(0, n_split):
                total += tl.load(part + s * tile_elems, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * out_stride + rn[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt, 0)  # ready for the next GEMM on this stream


def _counter_buffer(device: torch.device, tiles: int) -> torch.Tensor:
    """The split-K tile counters (``_device.zeroed_counters``, ``COUNTERS`` of them per device)."""
    return _device.zeroed_counters(device, "fp8_gemm", tiles, COUNTERS)


def gemm_config(M: int, N: int, KB: int, device: torch.device, block_m: int | None = None,
                block_n: int | None = None, splits: int | None = None, num_warps: int | None = None,
                stages: int | None = None, n_per_group: int | None = None, waves: int | None = None,
                min_kb: int = 2):
    """(BM, BN, splits, warps, stages). Decode sizes (M ≤ 64): one M tile of 16 / 32 / 64 rows, 64-row N
    tiles, 4 stages (3 unsplit up to 32 rows), split-K to about ``waves`` programs per SM (2 up to 32
    rows, then 1; rounded to the nearest split count), with at least ``min_kb`` K blocks per split and
    at most ``8·KB / M`` splits: each split writes an fp32 ``M x N`` partial that is read back, so the
    cap keeps that traffic within half the weight bytes. Larger M: 64 x 128 tiles up to 256 rows, then
    128 x 128 with 8 warps, no split.
    The decode defaults come from ``benchmarks/projections.py --sweep`` on an H200 (block_n 64 / 128,
    stages 3 / 4, splits 1-16; V4-Flash projections at M = 8, 32, 64). The fixed 2 waves and 3 stages
    before them split ``wq_a+wkv`` (N = 1536) 11 ways at M = 64, writing 1.4x its weight bytes in partials:
    12.3 against 8.1 µs with 4 splits; ``wo_a`` 19.7 against 14.8 µs unsplit, ``wo_b`` 20.5 against
    17.6 µs with 2 (M = 64), ``wo_b`` 19.7 against 15.2 µs with 4 (M = 32); unsplit ``q_proj`` 14.1 / 14.6
    µs with 3 stages against 14.7 / 15.2 with 4 at M = 8 / 32, 17.2 against 16.5 at M = 64."""
    if M <= 64:
        bm, bn, warps, st = (16 if M <= 16 else 32 if M <= 32 else 64), 64, 4, 4
    elif M < 256:
        bm, bn, warps, st = 64, 128, 4, 3
    else:
        bm, bn, warps, st = 128, 128, 8, 3
    if n_per_group is not None and n_per_group % bn:
        bn = 64
    bm, bn = block_m or bm, block_n or bn
    # an N tile must sit inside one 128-row weight-scale block (and one group)
    if bn not in (16, 32, 64, 128) or (n_per_group is not None and n_per_group % bn):
        raise ValueError(f"block_n must be 16, 32, 64 or 128 and divide the group's {n_per_group} rows, got {bn}")
    tiles = cdiv(M, bm) * cdiv(N, bn)
    if splits is None:
        want = (waves or (2 if M <= 32 else 1)) * sm_programs(device)
        splits = (want + tiles // 2) // tiles if (M <= 64 and tiles < want) else 1
        splits = min(splits, max(1, KB // min_kb), max(1, 8 * KB // M))
    splits = max(1, min(splits, KB))
    if splits > 1 and tiles > COUNTERS:
        splits = 1
    if M <= 32 and splits == 1:
        st = 3
    return bm, bn, splits, num_warps or warps, stages or st


_scaled_mm_ok: dict = {}


def _scaled_mm_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` takes 1x128 activation and 128x128 weight scales here (cuBLASLt
    ≥ 12.9 on sm_90): probed once per device, outside any CUDA-graph capture."""
    if device.type != "cuda" or interpreting():
        return False
    idx = _device.index(device)
    if idx not in _scaled_mm_ok:
        if torch.cuda.is_current_stream_capturing():
            return False  # decided at the first call outside a capture (the runner warms up first)
        try:
            q = torch.zeros(128, 128, device=device).to(torch.float8_e4m3fn)
            _scaled_mm(q, torch.ones(128, 1, device=device), q, torch.ones(1, 1, device=device), torch.bfloat16)
            _scaled_mm_ok[idx] = True
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            _scaled_mm_ok[idx] = False
    return _scaled_mm_ok[idx]


def _scaled_mm(x_q, x_scale, w_q, w_scale, out_dtype):
    """cuBLAS block-scaled GEMM: scales in the layouts it takes (activation scales M-major, weight
    scales ``[K/128, N/128]`` with the K blocks contiguous)."""
    return torch._scaled_mm(x_q.contiguous(), w_q.t(), scale_a=x_scale.t().contiguous().t(), scale_b=w_scale.t(),
                            out_dtype=out_dtype)


def fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16, backend: str | None = None,
                   **config) -> torch.Tensor:
    """See ``dsv4::fp8_block_gemm``; ``backend`` "triton" / "scaled_mm" / "gemv" / "cute" (forced) / None (automatic;
    ``DSV4_FP8_GEMM=triton`` forces the kernel), ``config`` overrides ``gemm_config``."""
    M = x_q.shape[0]
    N, K = w_q.shape
    KB = K // BLOCK
    if M == 0 or N == 0 or KB == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=x_q.device)
    config = _given(config)
    ws = weight_scale_fp32(w_scale).contiguous()
    backend = _backend(backend)
    if backend == "scaled_mm" or (backend == "auto" and M >= SCALED_MM_MIN_M and _scaled_mm_shape(x_q, N, KB, out_dtype)
                                  and _scaled_mm_supported(x_q.device)):
        return _scaled_mm(x_q, x_scale, w_q, ws, out_dtype)
    out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if backend == "cute":
        _check_cute(x_q, w_q, out_dtype)
    if backend == "cute" or _auto_cute(backend, config, x_q, w_q, out_dtype):
        return _launch_cute(x_q, x_scale, w_q, ws, out, config)
    if _use_gemv(backend, M, N, K, config):
        return _launch_gemv(x_q, x_scale, w_q, ws, out, config)
    return _launch(x_q, x_scale, w_q, ws, out, config)


CUTE_KEYS = ("splits", "stages")  # configuration keywords of the CuTe-DSL kernel (kernels.cute.gemm)
CUTE_MAX_M = 16  # rows the automatic dispatch gives the CuTe-DSL kernel (where CuTe DSL runs on Hopper)
CUTE_UNSPLIT_MAX_M = 32  # and up to these rows where its launch is unsplit, two CTAs an SM at most
CUTE_ROW_MAX_K = 2048  # one row: the CuTe-DSL kernel up to this K, the GEMV above


def _cute_preferred(x_q, w_q, out_dtype) -> bool:
    """Whether the automatic dispatch takes ``kernels.cute.gemm``: 2 to ``CUTE_MAX_M`` rows (not those
    ``_gemv_rows`` gives the GEMV), or one row with ``K ≤ CUTE_ROW_MAX_K``, where ``kernels.cute.backend``
    picks CuTe DSL and it ``supports`` the call. H200, µs, M = 2 / 8, against the Triton tiled kernel:
    ``wq_b`` 8.7 / 8.9 against 12.2 / 12.7, ``q_proj`` 11.6 / 11.9 against 14.0 / 14.2, ``indexer.wq_b`` 3.6
    against 6.2-6.4, ``wo_a`` 11.6 against 13.1-13.5, ``wq_a+wkv`` 5.1-5.2 against 6.5-6.9, ``wo_b``
    12.9-13.4 against 13.0-13.5; one row, against the GEMV: ``wq_b`` 8.6 against 10.9, ``q_proj`` 11.6
    against 13.3, but K ≥ 4096 10.5-12.1 against 3.1-10.5 (``wo_a``, ``wo_b``, ``wq_a+wkv``). From 17 to
    ``CUTE_UNSPLIT_MAX_M`` rows, only where its launch is unsplit and has at most two 128-row tiles an SM (M
    = 32, seventeenth session: ``wq_b`` 10.5 against 13.7, ``indexer.wq_b`` 4.4 against 7.2, ``wo_a`` 13.1
    against 14.6; split or wider it lost: ``wq_a+wkv`` 9.5 against 7.9, ``wo_b`` 16.5 against 15.1,
    ``q_proj`` 14.6 against 14.4); at 64 rows it won for ``wq_b`` alone (13.0 against 15.1)."""
    M, (N, K) = x_q.shape[0], w_q.shape
    if (x_q.device.type != "cuda" or interpreting() or M > CUTE_UNSPLIT_MAX_M
            or (M == 1 and K > CUTE_ROW_MAX_K) or (M > 1 and _gemv_rows(M, N))):
        return False
    from ..cute import _common as cute_common

    if cute_common.backend(x_q.device) != "cute":
        return False
    from ..cute import gemm as cute_gemm

    return _cute_rows(M, N, K, sm_programs(x_q.device)) and cute_gemm.supports(x_q, w_q, out_dtype)


def _auto_cute(backend, config, x, w_q, out_dtype) -> bool:
    """Whether the automatic dispatch (no backend or configuration given) takes the CuTe-DSL kernel for
    rows ``x`` (``_cute_preferred``): one rule for ``fp8_block_gemm`` and ``fp8_linear``, which must
    agree bit for bit."""
    return backend == "auto" and not config and _cute_preferred(x, w_q, out_dtype)


@functools.lru_cache(maxsize=None)
def _cute_rows(M: int, N: int, K: int, sms: int) -> bool:
    """``_cute_preferred``'s shape rule (2 to ``CUTE_MAX_M`` rows; up to ``CUTE_UNSPLIT_MAX_M`` for an
    unsplit launch of at most two 128-row tiles an SM), cached: it runs at every call."""
    if M <= CUTE_MAX_M:
        return True
    from ..cute import gemm as cute_gemm

    return cute_gemm.gemm_config(M, N, K // BLOCK, sms)[0] == 1 and N // cute_gemm.TILE_N <= 2 * sms


def _check_cute(x_q, w_q, out_dtype) -> None:
    """A ``ValueError`` where ``kernels.cute.gemm`` cannot run the call (without CuTe DSL, off Hopper,
    more than 64 rows, ragged 128-row weight tiles): the forced backend's check, which the automatic
    dispatch makes in ``_cute_preferred``."""
    from ..cute import _common as cute_common

    if not cute_common.HAVE_CUTE:
        raise ValueError("fp8 gemm: backend 'cute' needs nvidia-cutlass-dsl and apache-tvm-ffi")
    from ..cute import gemm as cute_gemm

    if not cute_gemm.supports(x_q, w_q, out_dtype):
        raise ValueError(f"fp8 gemm: the CuTe-DSL kernel does not take x {tuple(x_q.shape)}, w {tuple(w_q.shape)}, "
                         f"{out_dtype} out on {x_q.device} (Hopper, 1-64 rows, 128-row weight tiles)")


def _launch_cute(x_q, x_scale, w_q, ws, out, config):
    """``kernels.cute.gemm.fp8_gemm_into`` (the call checked: ``_check_cute`` / ``_cute_preferred``)."""
    from ..cute import gemm as cute_gemm

    return cute_gemm.fp8_gemm_into(out, x_q, x_scale, w_q, ws, **{k: v for k, v in config.items() if k in CUTE_KEYS})


def gemv_config(N: int, K: int, rows: int | None = None, k_chunk: int | None = None):
    """(rows R, K columns KC, splits) of the GEMV: ``KC = min(max(128, next_pow2(K)), GEMV_MAX_KC)`` and
    ``R = max(4, GEMV_TILE // KC)`` up to 16 rows, so a program loads 16-32 Ki weight elements for
    K ≥ 1024 (on an H200 at M = 1, ``.old_tree/gemv_exp3.py``: the fastest of R 2-32, 16 / 32 KiB FP8
    slabs, 4 / 8 warps within 5 % for the five V4-Flash projections). ``R`` is a power of two up to
    128: its rows sit in one 128-row weight-scale block and, for groups of whole 128-row blocks, in
    one group."""
    kc = k_chunk or min(max(BLOCK, next_pow2(K)), GEMV_MAX_KC)
    r = rows or min(16, max(4, GEMV_TILE // kc))
    if r & (r - 1) or not 1 <= r <= 128 or kc & (kc - 1) or kc < 128:
        raise ValueError(f"GEMV rows must be a power of two up to 128 and k_chunk a power of two >= 128, got "
                         f"{r}, {kc}")
    return r, kc, cdiv(K, kc)


def _gemv_rows(M: int, N: int) -> bool:
    """Whether the automatic dispatch gives ``M`` rows of an ``N``-row weight to the GEMV: one row, or
    up to ``GEMV_NARROW_MAX_M`` of a weight of at most ``GEMV_NARROW_N`` rows. A GEMV program's cost
    grows with the rows (one dot per row and weight row: ``wq_b`` 11.4 / 16.8 / 27.3 µs at 1 / 2 / 3
    rows, against the CuTe kernel's 8.8-9.1), but a narrow weight has few weight rows a program
    (H200, ``.old_tree/gemv_m_ab.py``: ``wq_a+wkv`` 3.7 / 4.6 / 5.4 µs at 2 / 3 / 4 rows against the CuTe
    kernel's 5.3 / 5.3 / 5.4)."""
    return M <= GEMV_MAX_M or (M <= GEMV_NARROW_MAX_M and N <= GEMV_NARROW_N)


def _use_gemv(backend, M: int, N: int, K: int, config: dict) -> bool:
    """The GEMV runs ``backend="gemv"`` (up to ``GEMV_FORCED_MAX_M`` rows) and, automatically, the rows
    ``_gemv_rows`` gives it with no tiled-kernel configuration given, on the GPU and under the
    interpreter, unless its split-K would need more tile counters than there are."""
    if backend == "gemv":
        return True  # _launch_gemv checks the rows and the counters
    if backend != "auto" or not _gemv_rows(M, N) or any(k not in GEMV_KEYS for k in config):
        return False
    return _gemv_counters_suffice(N, K, config)


def _gemv_counters_suffice(N: int, K: int, config: dict) -> bool:
    """Whether the GEMV's split K (if any) has a tile counter for each of its row tiles."""
    r, _, splits = gemv_config(N, K, **config)
    return splits == 1 or cdiv(N, r) <= COUNTERS


def _given(config: dict) -> dict:
    """The configuration keywords given a value (None means the default)."""
    return {k: v for k, v in config.items() if v is not None}


def _launch_gemv(x, x_scale, w_q, ws, out, config, amax_floor=None):
    """``_gemv_kernel`` on FP8 ``x`` with ``x_scale`` (``[M, K]`` or grouped ``[M, G, K]``); with
    ``amax_floor``, on bf16 / fp16 / fp32 ``x [M, K]`` quantized in the kernel (``x_scale`` None); with
    ``ws`` None, on a float weight ``w_q`` and float ``x`` (``linear_fp32``). The kernel reads the
    weight before its grid-dependency wait; a weight this launcher has to copy first (a last stride
    other than 1) is launched without PDL, so the copy is finished before the kernel starts."""
    M, (N, K) = x.shape[0], w_q.shape
    if M > GEMV_FORCED_MAX_M:
        raise ValueError(f"the GEMV takes at most {GEMV_FORCED_MAX_M} rows, got {M}")
    quant = amax_floor is not None
    mode = 2 if ws is None else 1 if quant else 0
    R, KC, splits = gemv_config(N, K, **config)
    tiles = cdiv(N, R)
    if splits > 1 and tiles > COUNTERS:
        raise ValueError(f"the GEMV's split K needs {tiles} tile counters, more than {COUNTERS}: more rows per "
                         f"program or a longer k_chunk")
    u8 = interpreting() and mode != 2
    xb, wb, x_scale, xs_strides = _operands(x, x_scale, w_q, u8, quant)
    pdl = {} if wb.data_ptr() == w_q.data_ptr() else {"PDL": False}
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    cnt = _counter_buffer(x.device, tiles) if splits > 1 else out
    _gemv_kernel[(tiles, splits)](
        xb, x_scale if x_scale is not None else out, wb, ws if ws is not None else out, out, part, cnt, M, N, K,
        N // xb.shape[1], xb.stride(0), xb.stride(1), *xs_strides, wb.stride(0), ws.stride(0) if ws is not None else 0,
        out.stride(0), float(amax_floor) if quant else 0.0, R=R, KC=KC, MB=next_pow2(M), SPLIT=splits > 1, U8=u8,
        X_MODE=mode, num_warps=4, **pdl,
    )
    return out


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None, **config) -> torch.Tensor:
    """See ``dsv4::linear_fp32``: one row through the GEMV (``backend="gemv"`` forces it, up to
    ``GEMV_FORCED_MAX_M`` rows), else ``torch.mm`` with an fp32 output (cuBLAS; fp32 operands: fp32 mm)."""
    M, (N, K) = x.shape[0], weight.shape
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=x.device)
    config = _given(config)
    if (backend == "gemv" or (backend is None and M <= GEMV_MAX_M)) and _gemv_counters_suffice(N, K, config):
        out = torch.empty((M, N), dtype=torch.float32, device=x.device)
        return _launch_gemv(x, None, weight, None, out, config)
    if x.dtype == torch.float32:
        return torch.mm(x, weight.t())
    return torch.mm(x, weight.t(), out_dtype=torch.float32)


def _backend(backend: str | None) -> str:
    """The forced backend, or "triton" under ``DSV4_FP8_GEMM=triton``, else "auto"."""
    return backend or ("triton" if os.environ.get(GEMM_ENV) == "triton" else "auto")


def _scaled_mm_shape(x_q, N: int, KB: int, out_dtype) -> bool:
    """Shapes the cuBLAS path is used for: 2-D, M a multiple of 4 (the M-major activation scales'
    leading dimension is M: 16-byte aligned), whole 128-row weight blocks, K blocks a multiple of 4,
    bf16 / fp32 out (what torch tests)."""
    return (x_q.dim() == 2 and x_q.shape[0] % 4 == 0 and N % BLOCK == 0 and KB % 4 == 0
            and out_dtype in (torch.bfloat16, torch.float32))


def _operands(x, x_scale, w_q, u8: bool, quant: bool):
    """What both kernels read: ``x`` with a unit last stride as ``[M, G, K]`` (G = 1 for 2-D), the
    weight with a unit last stride, ``x_scale`` as ``[M, G, K/128]`` (or None) and its strides
    ((0, 0, 0) without); with ``u8`` (the interpreter, which has no FP8 pointers) the FP8 tensors as
    bytes."""
    xb = x if x.stride(-1) == 1 else x.contiguous()
    wb = w_q if w_q.stride(-1) == 1 else w_q.contiguous()  # the kernels take the row stride
    if u8:
        wb = wb.view(torch.uint8)
        if not quant:
            xb = xb.view(torch.uint8)
    if xb.dim() == 2:
        xb = xb.unsqueeze(1)
        x_scale = x_scale.unsqueeze(1) if x_scale is not None else None
    return xb, wb, x_scale, (x_scale.stride() if x_scale is not None else (0, 0, 0))


def _launch(x, x_scale, w_q, ws, out, config, amax_floor=None):
    """The Triton kernel on FP8 ``x`` with ``x_scale`` (``[M, K]`` or grouped ``[M, G, K]``), or, with
    ``amax_floor``, on bf16 / fp16 / fp32 ``x [M, K]`` quantized in the kernel (``x_scale`` None)."""
    M, (N, K) = x.shape[0], w_q.shape
    KB = K // BLOCK
    quant = amax_floor is not None
    u8 = interpreting()
    grouped = x.dim() == 3
    xb, wb, x_scale, xs_strides = _operands(x, x_scale, w_q, u8, quant)
    npg = N // xb.shape[1]
    bm, bn, splits, warps, stages = gemm_config(M, N, KB, x.device, n_per_group=npg if grouped else None,
                                                **{k: v for k, v in config.items() if k not in GEMV_KEYS})
    per = cdiv(KB, splits)
    splits = cdiv(KB, per)
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    cnt = _counter_buffer(x.device, cdiv(M, bm) * cdiv(N, bn)) if splits > 1 else out
    # interpreter only (programs run one at a time): the quantized x tile goes through memory
    q_tmp = torch.empty((bm, BLOCK), dtype=torch.float8_e4m3fn, device=x.device) if quant and u8 else None
    _fp8_block_gemm_kernel[(cdiv(M, bm), cdiv(N, bn), splits)](
        xb, x_scale if x_scale is not None else ws, wb, ws, out, part, cnt,
        q_tmp if q_tmp is not None else out, q_tmp.view(torch.uint8) if q_tmp is not None else out, M, N, KB, per,
        npg, xb.stride(0),
        xb.stride(1), *xs_strides, wb.stride(0), ws.stride(0), out.stride(0),
        float(amax_floor) if quant else 0.0, BM=bm, BN=bn, STAGES=stages, SPLIT=splits > 1, U8=u8, QUANT_X=quant,
        num_warps=warps,
    )
    return out


FUSED_QUANT_MAX_K = 4096  # the GEMV quantizes x itself up to this K (each program quantizes its K columns of x)


def fp8_linear(x, w_q, w_scale, out_dtype=torch.bfloat16, scale_floor=1e-4, backend: str | None = None,
               **config) -> torch.Tensor:
    """See ``dsv4::fp8_linear``: ``fp8_block_gemm(*fp8_block_quant(x, 128, scale_floor), w_q, w_scale)``,
    bit for bit. One row with ``K ≤ FUSED_QUANT_MAX_K``: the GEMV quantizes ``x`` in registers as it streams
    the weight (one launch); otherwise the quant kernel, then ``fp8_block_gemm``. Every GEMV program or
    tiled-kernel N tile quantizes the same activations again, which pays only where the weight rows per
    program are many against K and the rows are few (on an H200 at M = 1: ``wq_a+wkv`` 3.2 µs fused against
    3.1 + 1.3, ``q_proj`` 13.5 against 13.1 + 1.1, but ``wo_b`` (K = 8192) 13.9 against 10.6 + 1.3; the
    tiled kernel's fused form lost from 2 rows, and so did the GEMV's: ``wq_a+wkv`` 6.6 / 11.5 µs at 2 / 3
    rows against 7.4 for the quant kernel + the CuTe kernel, so 2-3 rows of a narrow weight run the quant
    kernel, then the GEMV ``fp8_block_gemm`` gives them). Where ``fp8_block_gemm`` gives one row to the
    CuTe-DSL kernel (``_cute_preferred``), so does this, after the quant kernel: bit for bit the pair (H200,
    alone: ``wq_b`` 10.6 µs against 11.3 with the fused GEMV, ``q_proj`` 13.5 against 13.4, ``indexer.wq_b``
    1.1 + 3.6 against 3.9). ``backend="gemv"`` / ``"triton"`` force the fused GEMV (up to
    ``GEMV_FORCED_MAX_M`` rows) / the fused tiled kernel (up to 64 rows)."""
    M = x.shape[0]
    N, K = w_q.shape
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=x.device)
    backend = _backend(backend)
    config = _given(config)
    fused = backend == "gemv" or (M <= GEMV_MAX_M and K <= FUSED_QUANT_MAX_K)
    gemv = fused and _use_gemv(backend, M, N, K, config)
    # the one row fp8_block_gemm gives the CuTe-DSL kernel: decided here once, launched straight after the quant
    cute = gemv and backend != "gemv" and _auto_cute(backend, config, x, w_q, out_dtype)
    if (gemv and not cute) or (backend == "triton" and M <= 64):
        out = torch.empty((M, N), dtype=out_dtype, device=x.device)
        launch = _launch_gemv if gemv else _launch
        return launch(x, None, w_q, weight_scale_fp32(w_scale).contiguous(), out, config, amax_floor=scale_floor)
    from .primitives import fp8_block_quant

    x_q, x_scale = fp8_block_quant(x, BLOCK, scale_floor)
    if cute:
        out = torch.empty((M, N), dtype=out_dtype, device=x.device)
        return _launch_cute(x_q, x_scale, w_q, weight_scale_fp32(w_scale).contiguous(), out, config)
    return fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype, backend=None if backend == "auto" else backend,
                          **config)

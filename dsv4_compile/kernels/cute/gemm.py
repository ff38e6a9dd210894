"""CuTe-DSL block-scaled FP8 GEMM for decode sizes (``dsv4::fp8_block_gemm`` at 1 ≤ M ≤ 64), Hopper.

Same contract as ``kernels.triton.gemm``'s tiled kernel (``reference.gemm``): ``out[m, n] = Σ_kb
dot_kb(x_q[m], w_q[n]) · (x_scale[m, kb] · w_scale[n // 128, kb])``, each ``dot_kb`` the exact
e4m3 products of one 128-wide K block summed in fp32, the scaled blocks summed in K order into one
fp32 accumulator; a grouped ``x_q [M, G, K]`` (``wo_a``) multiplies group ``n // (N / G)``'s
activations. Split-K partials are summed in split order by the last CTA of each tile (a ticket on a
zero-at-rest counter, ``kernels._device.zeroed_counters``): deterministic.

Method (weight-streaming: at M ≤ 64 the weight bytes are the GEMM). One CTA = one 128-row weight
tile (one 128 x 128 scale block per K block) x one split of the K blocks; a producer warp and two
consumer warpgroups, 288 threads:

* the producer loads each K block's two ``[64 rows, 128]`` weight halves and the ``[MB, 128]``
  activation block (``MB`` = M rounded up to 8 / 16 / 32 / 64, rows past M zero-filled) into a ring of
  ``stages`` shared-memory buffers with TMA tensor copies (128-byte swizzled K-major, as wgmma reads
  them), completing on the stage's mbarrier. The weight copies of the first ``stages`` blocks are
  issued before the grid-dependency wait (under PDL the weight stream overlaps the previous kernel's
  tail: the weight must not be that kernel's output; a checkpoint weight never is), the activation
  copies after it;
* the consumer warpgroups first stage the split's ``x_scale · w_scale`` products (``[KB, MB]`` fp32)
  in shared memory; then, per K block, warpgroup ``g`` runs ``S = W_g · Xᵀ`` as four chained
  ``wgmma`` m64nMBk32 e4m3 (weight rows on M: the "swap AB" form, so one row block serves every M),
  frees the stage, and adds ``S · scale[kb, m]`` into its fp32 accumulator;
* unsplit, the accumulator is rounded to the output dtype and stored; split, it is stored as an fp32
  partial and the tile's last CTA sums the partials (every element of one split loaded at once: one
  L2 round trip per split; a first version looping over the splits per element took 69 µs for
  ``wo_b`` at M = 64).

Where it stands (H200, graph replay over L2-cold weight copies, ``.old_tree/gemm_ab.py``; µs, the
best of splits 1 / 2 / 4 / 8 x stages 4 / 6 against the package's default path then, % of the
streaming read): M = 2 / 8 ``wq_b`` 8.7 / 8.9 (85 / 83 %) against the Triton tiled kernel's 12.2 /
12.7, ``q_proj`` 11.6 / 11.9 against 14.0 / 14.2, ``indexer.wq_b`` 3.6 / 3.6 against 6.2 / 6.4,
``wo_a`` 11.6 / 11.6 against 13.5 / 13.1, ``wq_a+wkv`` 5.1 / 5.2 against 6.5 / 6.9, ``wo_b`` 12.9 / 13.0
against 13.0 / 13.5; M = 1 ``wq_b`` 8.6 and ``q_proj`` 11.6 against the GEMV's 10.9 / 13.3, but the
GEMV wins for K ≥ 4096 (``wo_a`` 10.5 against 11.3, ``wo_b`` 10.5 against 12.1, ``wq_a+wkv`` 3.1 against
5.0). From 32 rows it wins only for ``wq_b`` (10.7 / 12.6 against 14.2 / 15.2 at M = 32 / 64),
``indexer.wq_b`` and ``wo_a`` at M = 32 (4.1 / 13.0 against 7.4 / 14.6) and loses elsewhere (``q_proj``
M = 64 19.3 against 16.9: the activation block re-read per K block and CTA). The op's dispatch takes it
for 2-16 rows, one row of K ≤ 2048 and unsplit launches of 17-32 rows (``kernels.triton.gemm._cute_preferred``;
``fp8_block_gemm(backend="cute")`` forces it); ``gemm_config`` gives the launch rule and the later
measurements.
"""

from __future__ import annotations

import functools

import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float8E4M3FN, Float32, Int32, Int64, Uint8, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.tensor_utils.layout import LayoutEnum
from cutlass.utils import hopper_helpers as sm90

from .. import _device
from ..triton._common import cdiv, sm_programs
from ..triton._launch import pdl_meta
from ..triton.gemm import COUNTERS  # as many split-K tile counters per device as the Triton kernels'
from ._common import _capability, aligned, arch_name, fresh_copy
from ._math import e4m3_wgmma
from ._smem import ld, st_global

BK = 128  # K block (one scale block)
BW = 64  # weight rows per consumer warpgroup (wgmma M)
TILE_N = 2 * BW  # weight rows per CTA: one 128-row scale block
WG = 128
THREADS = 2 * WG + 32  # two consumer warpgroups, then the producer warp
SCALE_BYTES = 8192  # shared memory for a split's staged scales: max_kb(MB) K blocks of MB rows
SMEM_PER_SM = 228 * 1024  # Hopper's shared memory per SM
SMEM_PER_CTA = 227 * 1024  # and the most one CTA may take
MIN_STAGES = 3  # the shallowest ring the launch rule picks (1 KiB reserved per CTA beside its ring)
MAX_M = 64
_ROW = LayoutEnum.ROW_MAJOR  # K-major wgmma operands
_OUT = {torch.bfloat16: BFloat16, torch.float32: Float32}


def max_kb(mb: int) -> int:
    """K blocks of one split whose ``x_scale · w_scale`` products a CTA stages: 64 (K ≤ 8,192) up to 32
    activation rows, 32 at 64."""
    return min(64, SCALE_BYTES // (4 * mb))


def _mb(M: int) -> int:
    """The activation rows of a K block (wgmma N): M rounded up to 8, 16, 32 or 64."""
    return 8 if M <= 8 else 16 if M <= 16 else 32 if M <= 32 else 64


class Fp8GemmKernel:
    """One launch configuration (activation rows ``mb``, stage ring, output dtype, split or not,
    PDL); see ``compile`` for the cache key."""

    def __init__(self, mb: int, stages: int, out_dtype, split: bool, pdl: bool):
        if mb not in (8, 16, 32, 64) or stages < 1:
            raise ValueError(f"fp8 gemm: activation rows must be 8, 16, 32 or 64 and stages >= 1, got {mb}, {stages}")
        self.mb = mb
        self.stages = stages
        self.out_dtype = out_dtype
        self.split = split
        self.pdl = pdl
        self.esize = 2 if out_dtype is BFloat16 else 4  # output bytes per element

    @cute.jit
    def __call__(self, mX, mXs, mW, mWs, mOut, mPart, mCnt, n_per_group: Int32, kb_per_split: Int32, stream):
        N = mW.shape[0]
        K = mW.shape[1]
        splits = (K // BK + kb_per_split - 1) // kb_per_split
        # x as an e4m3 (row, k, group) tensor, the weight as (row, k): TMA copies [MB, 128] / [64, 128] boxes
        xt = cute.make_tensor(cute.recast_ptr(mX.iterator, dtype=Float8E4M3FN),
                              cute.make_layout((mX.shape[0], K, mX.shape[1]), stride=(mX.stride[0], 1, mX.stride[1])))
        wt = cute.make_tensor(cute.recast_ptr(mW.iterator, dtype=Float8E4M3FN),
                              cute.make_layout((N, K), stride=(mW.stride[0], 1)))
        w_layout = sm90.make_smem_layout_a(_ROW, (BW, self.mb, BK), Float8E4M3FN, 2 * self.stages)
        x_layout = sm90.make_smem_layout_b(_ROW, (BW, self.mb, BK), Float8E4M3FN, self.stages)
        op = cpasync.CopyBulkTensorTileG2SOp()
        tma_w_atom, tma_w = cpasync.make_tiled_tma_atom(op, wt, cute.slice_(w_layout, (None, None, 0)), (BW, BK))
        tma_x_atom, tma_x = cpasync.make_tiled_tma_atom(op, xt, cute.slice_(x_layout, (None, None, 0)),
                                                        (self.mb, BK))
        self.kernel(tma_w_atom, tma_w, w_layout, tma_x_atom, tma_x, x_layout, mXs, mWs, mOut, mPart, mCnt,
                    n_per_group, kb_per_split).launch(
            grid=[N // TILE_N, splits, 1],
            block=[THREADS, 1, 1],
            stream=stream,
            use_pdl=self.pdl,
        )

    @cute.kernel
    def kernel(self, tma_w_atom: cute.CopyAtom, tma_w: cute.Tensor, w_layout: cute.ComposedLayout,
               tma_x_atom: cute.CopyAtom, tma_x: cute.Tensor, x_layout: cute.ComposedLayout, mXs, mWs, mOut, mPart,
               mCnt, n_per_group: Int32, kb_per_split: Int32):
        tid, _, _ = cute.arch.thread_idx()
        tile, s, _ = cute.arch.block_idx()
        _, splits, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tid % 32
        stages = self.stages
        mb = self.mb
        M = mXs.shape[0]
        N = mOut.shape[1]
        KB = mWs.shape[1]
        kb0 = s * kb_per_split
        nkb = cutlass.min(kb_per_split, KB - kb0)
        n0 = tile * TILE_N
        grp = n0 // n_per_group
        producer = 2 * (WG // 32)
        w_bytes = BW * BK
        x_bytes = mb * BK
        g = warp // (WG // 32)  # consumer warpgroup g multiplies weight rows n0 + 64·g ..
        # byte address of output element (m, n) is out_base + (m·out_stride + n)·esize; of split q's partial
        # element, part + (q·plane + m·N + n)·4
        out_base = mOut.iterator.toint()
        out_stride = Int64(mOut.stride[0])
        esize = self.esize
        plane = Int64(M) * Int64(N)
        part = Int64(0)
        if const_expr(self.split):
            part = mPart.iterator.toint()

        # ---- shared memory: weight ring (two halves per stage), activation ring, scales, flag, mbarriers ----
        smem = cutlass.utils.SmemAllocator()
        sW = smem.allocate_tensor(Float8E4M3FN, w_layout.outer, byte_alignment=1024, swizzle=w_layout.inner)
        sX = smem.allocate_tensor(Float8E4M3FN, x_layout.outer, byte_alignment=1024, swizzle=x_layout.inner)
        sScale = smem.allocate_tensor(Float32, cute.make_layout((mb, max_kb(mb)), stride=(1, mb)), byte_alignment=16)
        sFlag = smem.allocate_tensor(Int32, cute.make_layout(4), byte_alignment=16)
        full = smem.allocate_array(Int64, stages, byte_alignment=8)
        empty = smem.allocate_array(Int64, stages, byte_alignment=8)
        if tid == 0:
            for st in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(full + st, 1)
                cute.arch.mbarrier_init(empty + st, 2 * WG)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        if warp == producer:
            cpasync.prefetch_descriptor(tma_w_atom)
            cpasync.prefetch_descriptor(tma_x_atom)
            gW = cute.local_tile(tma_w, (BW, BK), (None, None))  # (64, 128, row halves, K blocks)
            tWsW, tWgW = cpasync.tma_partition(tma_w_atom, 0, cute.make_layout(1), cute.group_modes(sW, 0, 2),
                                               cute.group_modes(gW, 0, 2))
            gX = cute.local_tile(tma_x, (mb, BK), (0, None, None))  # (MB, 128, K blocks, groups)
            tXsX, tXgX = cpasync.tma_partition(tma_x_atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2),
                                               cute.group_modes(gX, 0, 2))
            pro = cutlass.min(nkb, stages)
            # the weight halves of the first stages before the grid-dependency wait
            for i in cutlass.range(pro, unroll=1):
                if lane == 0:
                    cute.arch.mbarrier_arrive_and_expect_tx(full + i, 2 * w_bytes + x_bytes)
                for h in cutlass.range_constexpr(2):
                    cute.copy(tma_w_atom, tWgW[(None, 2 * tile + h, kb0 + i)], tWsW[(None, 2 * i + h)],
                              tma_bar_ptr=full + i)
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_wait()
            for i in cutlass.range(pro, unroll=1):
                cute.copy(tma_x_atom, tXgX[(None, kb0 + i, grp)], tXsX[(None, i)], tma_bar_ptr=full + i)
            for i in cutlass.range(pro, nkb, unroll=1):
                stage = i % stages
                cute.arch.mbarrier_wait(empty + stage, ((i // stages) % 2) ^ 1)
                if lane == 0:
                    cute.arch.mbarrier_arrive_and_expect_tx(full + stage, 2 * w_bytes + x_bytes)
                for h in cutlass.range_constexpr(2):
                    cute.copy(tma_w_atom, tWgW[(None, 2 * tile + h, kb0 + i)], tWsW[(None, 2 * stage + h)],
                              tma_bar_ptr=full + stage)
                cute.copy(tma_x_atom, tXgX[(None, kb0 + i, grp)], tXsX[(None, stage)], tma_bar_ptr=full + stage)
        else:
            if const_expr(self.pdl):
                cute.arch.griddepcontrol_wait()
                cute.arch.griddepcontrol_launch_dependents()
            # ---- the split's x_scale · w_scale products, [kb, m] (m past M: 0) ----
            ws_row = mWs.iterator.toint() + Int64(n0 // TILE_N) * Int64(mWs.stride[0]) * 4
            xs_base = mXs.iterator.toint() + Int64(grp) * Int64(mXs.stride[1]) * 4
            for c in cutlass.range(tid, nkb * mb, 2 * WG, unroll=1):
                kb = c // mb
                m = c % mb
                v = Float32(0.0)
                if m < M:
                    sa = ld("global", xs_base + Int64(m) * Int64(mXs.stride[0]) * 4
                            + Int64(kb0 + kb) * Int64(mXs.stride[2]) * 4, Float32)
                    sb = ld("global", ws_row + Int64(kb0 + kb) * 4, Float32, nc=True)
                    v = sa * sb
                sScale[m, kb] = v
            cute.arch.barrier(barrier_id=1, number_of_threads=2 * WG)

            # cC: (weight row, activation row) of each accumulator element
            mma, tCrW, tCrX, blk, cC = e4m3_wgmma(sW, sX, tid % WG, BW, mb)
            acc = cute.make_rmem_tensor(cute.size(blk), Float32)
            acc.fill(0.0)
            mma.set(warpgroup.Field.ACCUMULATE, True)
            for i in cutlass.range(nkb, unroll=1):
                stage = i % stages
                cute.arch.mbarrier_wait(full + stage, (i // stages) % 2)
                blk.fill(0.0)
                warpgroup.fence()
                for k in cutlass.range_constexpr(cute.size(tCrW, mode=[2])):
                    cute.gemm(mma, blk, tCrW[None, None, k, 2 * stage + g], tCrX[None, None, k, stage], blk)
                warpgroup.commit_group()
                warpgroup.wait_group(0)
                cute.arch.mbarrier_arrive(empty + stage)
                for e in cutlass.range_constexpr(cute.size(acc)):
                    acc[e] = acc[e] + blk[e] * sScale[cC[e][1], i]

            # ---- epilogue: the output (unsplit) or the partial, then the tile's last CTA sums them ----
            for e in cutlass.range_constexpr(cute.size(acc)):
                n = n0 + g * BW + cC[e][0]
                m = cC[e][1]
                if m < M:
                    if const_expr(not self.split):
                        st_global(out_base + (Int64(m) * out_stride + Int64(n)) * esize, acc[e], self.out_dtype)
                    else:
                        st_global(part + (Int64(s) * plane + Int64(m) * Int64(N) + Int64(n)) * 4, acc[e])
        if const_expr(self.split):
            cute.arch.sync_threads()  # every partial store is issued before thread 0 releases them
            if tid == 0:
                cute.arch.fence_acq_rel_gpu()
                old = cute.arch.atomic_add(mCnt.iterator + tile, Int32(1), sem="relaxed", scope="gpu")
                last = Int32(0)
                if old == splits - 1:
                    cute.arch.fence_acq_rel_gpu()
                    mCnt[tile] = Int32(0)  # zero at rest, for the next GEMM
                    last = Int32(1)
                sFlag[0] = last
            cute.arch.sync_threads()
            if sFlag[0] != 0:
                if warp != producer:
                    cC = e4m3_wgmma(sW, sX, tid % WG, BW, mb)[4]
                    # the element's offset in a partial (0 past M: read, never stored)
                    off = cute.make_rmem_tensor(cute.size(cC), Int64)
                    tot = cute.make_rmem_tensor(cute.size(cC), Float32)
                    for e in cutlass.range_constexpr(cute.size(cC)):
                        m = cC[e][1]
                        off[e] = Int64(0)
                        if m < M:
                            off[e] = Int64(m) * Int64(N) + Int64(n0 + g * BW + cC[e][0])
                        tot[e] = Float32(0.0)
                    for q in cutlass.range(splits, unroll=1):  # split order: deterministic; one round trip each
                        for e in cutlass.range_constexpr(cute.size(cC)):
                            tot[e] = tot[e] + ld("global", part + (Int64(q) * plane + off[e]) * 4, Float32, cg=True)
                    for e in cutlass.range_constexpr(cute.size(cC)):
                        m = cC[e][1]
                        if m < M:
                            n = n0 + g * BW + cC[e][0]
                            st_global(out_base + (Int64(m) * out_stride + Int64(n)) * esize, tot[e], self.out_dtype)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(mb: int, stages: int, out_dtype, split: bool, pdl: bool, arch: str, extra_options: str = ""):
        """Compile one variant over fake tensors (no GPU needed): M, groups, N, K and strides symbolic;
        ``out_dtype`` ``BFloat16`` or ``Float32``."""
        mk = cute.runtime.make_fake_tensor
        M = cute.sym_int()
        G = cute.sym_int()
        N = cute.sym_int()
        KB = cute.sym_int()
        args = [
            mk(Uint8, (M, G, cute.sym_int()), stride=(cute.sym_int64(divisibility=16), cute.sym_int64(divisibility=16),
                                                      1), assumed_align=16),  # x_q bytes [M, G, K]
            mk(Float32, (M, G, KB), stride=(cute.sym_int64(), cute.sym_int64(), cute.sym_int64()), assumed_align=4),
            mk(Uint8, (N, cute.sym_int()), stride=(cute.sym_int64(divisibility=16), 1), assumed_align=16),  # w_q
            mk(Float32, (cute.sym_int(), KB), stride=(cute.sym_int64(), 1), assumed_align=4),  # w scales
            mk(out_dtype, (M, N), stride=(cute.sym_int64(), 1), assumed_align=out_dtype.width // 8),
            mk(Float32, (cute.sym_int(), M, N), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
            if split else None,
            mk(Int32, (cute.sym_int(),), stride=(1,), assumed_align=4) if split else None,
        ]
        kernel = Fp8GemmKernel(mb, stages, out_dtype, split, pdl)
        stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        return cute.compile(kernel, *args, Int32(128), Int32(1), stream,
                            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip())


def supports(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype) -> bool:
    """Whether this kernel can run the GEMM: a Hopper GPU (wgmma, TMA), 1 ≤ M ≤ 64 rows, whole 128-row
    weight tiles (inside one group), K a multiple of 128, bf16 / fp32 output, a weight whose base and
    row stride are 16-byte multiples (TMA; activations are copied when they are not)."""
    if x_q.device.type != "cuda" or _capability(x_q.device)[0] != 9 or out_dtype not in _OUT:
        return False
    N, K = w_q.shape
    G = x_q.shape[1] if x_q.dim() == 3 else 1
    return (0 < x_q.shape[0] <= MAX_M and N % TILE_N == 0 and (N // G) % TILE_N == 0 and K % BK == 0 and K > 0
            and w_q.stride(1) == 1 and aligned(w_q.view(torch.uint8), 16, (0,)))


def smem_bytes(mb: int, stages: int) -> int:
    """Shared memory of one CTA: the stage ring (two 64-row weight halves and the ``[mb, 128]``
    activation block a stage), the staged scales, the flag and two mbarriers a stage."""
    return stages * (TILE_N + mb) * BK + 4 * mb * max_kb(mb) + 16 + 16 * stages


@functools.lru_cache(maxsize=None)
def _ring(mb: int, ctas: int, sms: int) -> int:
    """The stages of ``ctas`` CTAs of ``mb`` activation rows on ``sms`` SMs: the deepest ring (up to 8
    stages for one CTA an SM, 6 for more) with which all of them are resident at once, if one of at
    least ``MIN_STAGES`` does; else the same for one CTA fewer an SM (1 KiB of each SM's shared memory
    reserved per CTA, so one CTA's ring stays within ``SMEM_PER_CTA``)."""
    per_sm = cdiv(ctas, sms)
    while True:
        fits = [s for s in range(MIN_STAGES, (8 if per_sm == 1 else 6) + 1)
                if per_sm * (smem_bytes(mb, s) + 1024) <= SMEM_PER_SM]
        if fits or per_sm == 1:
            return max(fits)
        per_sm -= 1


def gemm_config(M: int, N: int, KB: int, sms: int, splits: int | None = None, stages: int | None = None):
    """(splits, K blocks per split, stages); a ``ValueError`` for a ring that does not fit a CTA's shared
    memory. Split-K (4 ways) only where four splits of every 128-row tile still fit one CTA per SM; at most
    ``max_kb`` K blocks per split. Stages (``_ring``): the deepest ring with which every CTA is resident at
    once, up to 8 stages where they fit one an SM and 6 otherwise (two an SM: 6 / 6 / 5 / 4 stages for 8 /
    16 / 32 / 64 rows; three: 4 / 3 / 3 for 8 / 16 / 32), the bytes in flight per SM that keep the weight
    stream full. H200 sweeps (µs; ``.old_tree/gemm_ab.py``, sixteenth session, M = 1-8; ``gemm_ab2.py``,
    seventeenth, M = 1-64): the split rule picked the best of 1 / 2 / 4 / 8 splits for every V4-Flash
    projection but ``wo_b`` (4 splits 12.7-13.4 against 8 splits 12.1-13.0); one CTA per SM with 8 stages
    against 6: ``wo_b`` M = 1 / 8 / 16 12.4 / 12.7 / 14.0 against 13.7 / 14.0 / 15.3, ``wo_a`` 11.3-13.1
    against 11.6-13.2, ``wq_a+wkv`` M = 8 6.1 against 6.6; two CTAs an SM against one with 6 stages:
    ``wq_b`` M = 32 / 64 10.5 / 13.0 (4 stages) against 12.2 / 15.1; ``q_proj`` (320 CTAs), all resident
    (three an SM) against two an SM: M = 1 / 8 11.4 / 11.6-12.0 (4 stages; 6 not measured in the same run:
    11.9 / 12.4 in the next), M = 16 13.2 (3 stages) against 14.0 (6). CTAs that each ran several tiles in
    turn (at most as many as fit the GPU at once) lost to one tile per CTA: ``wq_b`` M = 1 / 16 10.9 / 11.5
    against 8.7 / 9.3, ``q_proj`` M = 8 14.3 against 11.6."""
    tiles = N // TILE_N
    mb = _mb(M)
    if splits is None:
        splits = 4 if 4 * tiles <= sms else 1
        splits = max(1, min(splits, KB // 2))
    splits = max(splits, cdiv(KB, max_kb(mb)))
    per = cdiv(KB, min(splits, KB))
    splits = cdiv(KB, per)
    if stages is None:
        stages = _ring(mb, tiles * splits, sms)
    elif stages < 1 or smem_bytes(mb, stages) > SMEM_PER_CTA:
        raise ValueError(f"fp8 gemm: {stages} stages of {mb} activation rows do not fit a CTA's shared memory")
    return splits, per, stages


def fp8_gemm_into(out, x_q, x_scale, w_q, ws, splits: int | None = None, stages: int | None = None,
                  pdl: bool | None = None) -> torch.Tensor:
    """``out [M, N]`` (bf16 / fp32, unit last stride) = the block-scaled GEMM of ``x_q`` (e4m3 ``[M, K]`` or
    grouped ``[M, G, K]``) with its fp32 ``x_scale`` (``[M, K/128]`` / ``[M, G, K/128]``, any strides) and
    ``w_q`` (e4m3 ``[N, K]``) with its fp32 ``ws`` (``[N/128, K/128]``, unit last stride); ``supports``
    must hold. ``splits`` / ``stages`` override ``gemm_config``."""
    M, (N, K) = x_q.shape[0], w_q.shape
    KB = K // BK
    xb = x_q.view(torch.uint8)
    if xb.dim() == 2:
        xb = xb.unsqueeze(1)
        x_scale = x_scale.unsqueeze(1)
    if xb.stride(-1) != 1 or not aligned(xb, 16, (0, 1)):
        xb = fresh_copy(xb)
    n_split, per, st = gemm_config(M, N, KB, sm_programs(x_q.device), splits, stages)
    if pdl is None:
        pdl = pdl_meta(x_q.device.index) is not None
    part = cnt = None
    if n_split > 1:
        part = torch.empty((n_split, M, N), dtype=torch.float32, device=x_q.device)
        cnt = _device.zeroed_counters(x_q.device, "fp8_gemm_cute", N // TILE_N, COUNTERS)
    compiled = Fp8GemmKernel.compile(_mb(M), st, _OUT[out.dtype], n_split > 1, pdl, arch_name(x_q.device))
    compiled(xb, x_scale, w_q.view(torch.uint8), ws, out, part, cnt, N // xb.shape[1], per)
    return out

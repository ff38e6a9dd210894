"""CuTe-DSL lightning-indexer logits over the paged indexer K cache (Hopper: TMA / bulk copies + wgmma).

The logits half of ``dsv4::indexer_topk`` (docs/numerics.md §7.2), the same contract as
``kernels.triton.attention.indexer_logits_into``: for token ``t`` and each of its ``n_t`` visible
entries ``s`` (``n_t = min((pos + 1) // ratio, L)``, 0 for a padding row)
``out[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k_s)``; an entry whose page is −1 or outside the cache is
scored as zero keys with scale 0 (not read); nothing at or past ``n_t`` is written, and only the last
tile's page is read past it (its keys and scales are loaded whole, inside the page). ReLU keeps NaN.

FP8 (``IndexerLogitsKernel``; ``k_s`` the entry's e4m3 key times its fp32 power-of-two scale, the
scale after the head sum since ``ReLU(a·x) = a·ReLU(x)`` for ``a > 0``). One CTA = one token × one of
``programs`` strided shares of its 64-entry tiles; a producer warp and two consumer warpgroups, 288
threads:

* the producer warp walks the CTA's tiles, reads each tile's page from the block table (one tile
  ahead), and loads the tile's keys (``[64 entries, 128]`` e4m3, 8 KB) into a ring of ``stages``
  (4) shared-memory buffers with one TMA tensor copy (the 128-byte swizzled K-major layout wgmma
  reads) and its 64 scales (256 B) with one bulk copy, both completing on the stage's mbarrier; an
  unreadable page is not loaded (the stage is marked and its mbarrier arrived on);
* the consumer warpgroups share the token's 64 query heads (8 KB, loaded once) in shared memory and
  take the CTA's tiles in turn: ``S = K·Qᵀ`` as four ``wgmma`` m64n64k32 e4m3 (entries on M, heads
  on N), the stage freed, then ``Σ_h w·ReLU(S)`` over the thread's 16 heads per row and the quad's
  four lanes, times the scale, and the 64 logits written;
* two CTAs per SM (one wave): more stages or CTAs per SM measured slower, not faster (MXFP4: three).

MXFP4 (``IndexerLogitsMxfp4Kernel``; keys and queries E2M1 with one UE8M0 scale per 32-block, the
Triton kernel's folded / exact semantics): the producer bulk-copies each tile's packed keys (4 KB)
and scale bytes (256 B) into the ring; each consumer warpgroup decodes its tile to e4m3 in shared
memory with byte permutes (rows whose block exponents lie within 5 binades fold ``2^(e_b − e)`` into
the values), then runs four chained k32 wgmma and applies the key scale after the head sum when every
row of the tile and every query head folds, else per 32-block two m64n32k32 wgmma (one per half of
the heads) times both block scales.
72 registers by ``ptxas -v`` (not enforced; the exact form takes the heads in two m64n32 halves so
its accumulators fit): 3 CTAs per SM. (At 101 registers the SM sub-partitions' register files held
one CTA per SM, at 96 two.)

Where they stand (H200, graph replay over L2-cold input sets; bytes read per visible entry 132 FP8,
68 MXFP4): FP8 at 64k context B = 8 / 32 / 64 7.2 / 23.0 / 40.7 µs (2.40 / 3.01 / 3.40 TB/s) against
10.4 / 28.6 / 50.3 for the Triton kernel (nineteenth session, `benchmarks/attention.py --indexer`); B = 1
at 1M context 13.2 against 18.2 µs (before the early reads). The same loads
with the multiplies and the head sum removed take 38.8 µs at B = 64 (3.57 TB/s), as do
one-dimensional bulk copies of the pages and a Triton kernel that only gathers them (38.6 µs):
reading 8 KB pages scattered over the cache tops out near 3.6 TB/s here, against 4.5-4.6 TB/s for
one streaming read. MXFP4 at 64k B = 8 / 32 / 64 10.1 / 27.9 / 52.7 µs against the Triton kernel's
13.4 / 42.5 / 81.0, 1M B = 1 15.4 against 23.4: bound by each consumer warpgroup's per-tile chain
(decode, barriers, wgmma, head sum), not the bytes; more CTAs or stages no longer help (see
``benchmarks/results/indexer_topk_h200.md``).

Needs 64 heads or fewer (zero rows pad the block), fp32 head weights, pages of a multiple of 64
entries whose base and stride allow 16-byte TMA and bulk copies (``supports``); the op keeps the
Triton kernel otherwise, and for FP8 tables too small to give each CTA two tiles (``preferred``, on
the table width: the visible counts are on the GPU). A CTA left without tiles (a short context in a
wide table) sets up its barriers and loads no queries (8k context in a 1M-token table, B = 1: 3.0 µs
against the Triton kernel's 2.7 when its FP8 queries were still loaded). Each CTA reads the token's
request and position, and the producer warp the first tile's page, before the grid-dependency wait
(``_early_reads``), as the Triton kernel reads the request and position. H200, graph replay,
``indexer_topk`` (logits alone) with both kernels reading after the wait → before it, same bits: 64k
context B = 1 / 8 / 32 / 64 10.1 / 14.6 / 30.5 / 47.6 (4.2-4.3 / 8.5 / 23.6-23.7 / 40.8-40.9) → 9.7-9.9 /
13.8 / 30.1 / 47.2 µs (3.9-4.1 / 7.7 / 22.9-23.2 / 40.2-40.4); MXFP4 B = 8 16.2-16.4 → 15.7-15.8; 8k
context in a 1M table B = 1 6.1 (3.4) → 5.8 (2.9).
"""

from __future__ import annotations

import functools

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float8E4M3FN, Float32, Int32, Int64, Uint8, Uint32, const_expr
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, warpgroup
from cutlass.tensor_utils.layout import LayoutEnum
from cutlass.utils import hopper_helpers as sm90

from ... import layouts
from ..triton._common import cdiv, sm_programs
from ..triton._launch import pdl_meta
from ..triton.attention import MX_FOLD_SPREAD as _TRITON_FOLD_SPREAD
from ._common import _capability, aligned, arch_name, fresh_copy
from ._math import TORCH_TO_CUTE, e4m3_wgmma, visible_entries
from ._smem import ld, st_global, st_shared_v4, sw128_offset

D = layouts.INDEXER_HEAD_DIM  # 128 e4m3 dims = one 128-byte row
BH = 64  # query heads (wgmma N)
BN = 64  # entries per tile (wgmma M)
WG = 128  # the consumer warpgroup: warps 0-3
CONSUMERS = 2  # consumer warpgroups per CTA (warps 0 .. 4·consumers − 1; the producer warp after them)
TILE_BYTES = BN * D
SCALE_BYTES = BN * layouts.INDEXER_FP8_SCALE_BYTES  # 256
STAGES = 4
# CTAs per SM: 288 threads each, ~42 KB (FP8) / ~46 KB (MXFP4) of shared memory; FP8 76-81 registers
# (more CTAs measured slower), MXFP4 72 (3 x 9 warps fit the SM sub-partitions' register files)
CTAS_PER_SM = {"fp8": 2, "mxfp4": 3}
_ROW = LayoutEnum.ROW_MAJOR  # K-major wgmma operands


def _bulk_g2s(smem_addr, gmem_addr, nbytes: int, mbar_addr):
    """``nbytes`` contiguous bytes global → shared, completing as transaction bytes on the mbarrier."""
    cute.arch.inline_ptx(
        f"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [{{$r0}}], [{{$r1}}], {nbytes}, [{{$r2}}];",
        read_only_args=[smem_addr, gmem_addr, mbar_addr])


def _check_ring(stages: int, consumers: int, max_consumers: int) -> None:
    """``ValueError`` for a stage ring the consumer warpgroups cannot share: each warpgroup takes every
    ``consumers``-th tile, so stage ``i % stages`` must always come back to the same warpgroup (its
    mbarrier phases are that warpgroup's), and the query tile splits evenly (1, 2 or 4 warpgroups)."""
    if consumers not in (1, 2, 4) or consumers > max_consumers or stages < 1 or stages % consumers:
        allowed = ", ".join(str(c) for c in (1, 2, 4) if c <= max_consumers)
        raise ValueError(f"indexer logits: {stages} stages cannot be shared by {consumers} consumer warpgroups "
                         f"(consumers {allowed}; stages a multiple of consumers)")


def _head(e: int) -> int:
    """The thread's head (accumulator column) of accumulator element ``e`` of a wgmma m64nN tile, as
    an index over its N/4 distinct columns: element ``e = c + 2·r + 4·i`` is column ``8i + 2·(lane % 4)
    + c`` of row ``r0 + 8r`` (so elements ``e`` and ``e + 2`` share a head)."""
    return e % 2 + 2 * (e // 4)


def _relu_nan(x):
    """``max(x, 0)`` keeping NaN (``torch.relu``; the plain ``max`` would drop it)."""
    return cute.arch.inline_ptx("max.NaN.f32 {$w0}, {$r0}, 0f00000000;", write_only_types=[Float32],
                                read_only_args=[x])


def _coords():
    """(thread, token ``t``, CTA ``j`` of the token's ``P``, warp (uniform), lane) of this thread."""
    tid, _, _ = cute.arch.thread_idx()
    t, j, _ = cute.arch.block_idx()
    _, P, _ = cute.arch.grid_dim()
    return tid, t, j, P, cute.arch.make_warp_uniform(cute.arch.warp_idx()), tid % 32


def _alloc_q(smem):
    """The shared ``[64 heads, 128]`` e4m3 query tile, in the 128-byte swizzled layout wgmma reads."""
    q_layout = sm90.make_smem_layout_b(_ROW, (BN, BH, D), Float8E4M3FN, 1)
    return smem.allocate_tensor(Float8E4M3FN, q_layout.outer, byte_alignment=1024, swizzle=q_layout.inner)


def _alloc_ring(smem, stages: int, tid, pdl: bool):
    """(stage flags ``sOk``, full mbarriers, empty mbarriers) of the stage ring, allocated last, then
    ``_init_ring``."""
    sOk = smem.allocate_tensor(Int32, cute.make_layout(stages), byte_alignment=16)
    full = smem.allocate_array(Int64, stages, byte_alignment=8)
    empty = smem.allocate_array(Int64, stages, byte_alignment=8)
    _init_ring(full, empty, stages, tid, pdl)
    return sOk, full, empty


def _qk(mma, acc, tCrK, tile, tCrQ):
    """``acc = S`` of the K tile ``tile`` of ``tCrK`` (``e4m3_wgmma``): the k32 wgmma chained from zero,
    waited for."""
    acc.fill(0.0)
    warpgroup.fence()
    for kb in range(cute.size(tCrK, mode=[2])):  # unrolled at trace time
        cute.gemm(mma, acc, tCrK[None, None, kb, tile], tCrQ[None, None, kb, 0], acc)
    warpgroup.commit_group()
    warpgroup.wait_group(0)


@cute.jit
def _producer_tile(i, mine, j, P, bs: cutlass.Constexpr, stages: cutlass.Constexpr, bt_row, page_nx, n_pages,
                   empty, sOk, lane):
    """The producer's tile ``i`` of ``mine``: (its first entry ``s0``, its page (read a tile ahead), the next
    tile's page, its stage, whether the page is readable), once its stage is free; ``sOk`` set."""
    s0 = (j + i * P) * BN
    page = page_nx
    if i + 1 < mine:
        page_nx = _ld_page(bt_row, Int64((s0 + P * BN) // bs))
    stage = i % stages
    cute.arch.mbarrier_wait(empty + stage, ((i // stages) % 2) ^ 1)
    ok = (page >= 0) & (page < n_pages)
    if lane == 0:
        sOk[stage] = Int32(ok)
    return s0, page, page_nx, stage, ok


@cute.jit
def _init_ring(full, empty, stages: cutlass.Constexpr, tid, pdl: cutlass.Constexpr):
    """The stage ring's mbarriers (full: the producer's one arrival plus the copies' bytes; empty: a
    consumer warpgroup's 128 threads), visible to the whole CTA; then, under PDL, wait for the
    previous kernel's writes and let the next kernel launch."""
    if tid == 0:
        for s in cutlass.range_constexpr(stages):
            cute.arch.mbarrier_init(full + s, 1)
            cute.arch.mbarrier_init(empty + s, WG)
    cute.arch.mbarrier_init_fence()
    cute.arch.sync_threads()
    if const_expr(pdl):
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()


@cute.jit
def _token_tiles(mBT, mReq, mPos, t, j, P, ratio, bs: cutlass.Constexpr):
    """(request, whether the token is real, its visible count ``n``, how many of its 64-entry tiles
    CTA ``j`` of ``P`` takes: tiles ``j, j + P, …``)."""
    n_req = mBT.shape[0]
    L = mBT.shape[1] * bs
    req = Int64(mReq[t])
    ok_tok, n = visible_entries(req, Int64(mPos[t]), n_req, ratio, L)
    n_tiles = Int32((n + BN - 1) // BN)
    mine = Int32(0)
    if j < n_tiles:
        mine = (n_tiles - j + P - 1) // P
    return req, ok_tok, n, mine


@cute.jit
def _early_reads(mBT, mReq, mPos, t, j, P, ratio, bs: cutlass.Constexpr, producer):
    """``_token_tiles``, the token's block-table row address and (in the producer warp of a CTA with
    tiles) the page of its first tile, -1 else: what a CTA reads before the grid-dependency wait
    (``_init_ring``), so under PDL their round trips overlap the previous kernel's tail. The stream's
    previous kernel must not write ``token_to_req``, ``positions`` or ``block_table`` (``dsv4::indexer_topk``
    requires it)."""
    req, ok_tok, n, mine = _token_tiles(mBT, mReq, mPos, t, j, P, ratio, bs)
    bt_row = mBT.iterator.toint() + cutlass.select_(ok_tok, req, Int64(0)) * Int64(mBT.stride[0]) * 4
    page = Int32(-1)
    if producer:
        if mine > 0:
            page = _ld_page(bt_row, Int64(j * BN // bs))
    return req, ok_tok, n, mine, bt_row, page


def _row_sums(n: int, term, v0=None, v1=None):
    """(``v0`` + Σ of ``term(e)`` over the thread's accumulator elements ``e < n`` of row ``r0``, ``v1`` + that
    of row ``r0 + 8``; ``v0``, ``v1`` 0 by default): element ``e`` is in row ``r0 + 8·((e // 2) % 2)``
    (``_head``), summed in element order."""
    v0 = Float32(0.0) if v0 is None else v0
    v1 = Float32(0.0) if v1 is None else v1
    for e in range(n):
        if (e // 2) % 2 == 0:
            v0 = v0 + term(e)
        else:
            v1 = v1 + term(e)
    return v0, v1


@cute.jit
def _store_rows(v0, v1, sc0, sc1, lane, out_row, s, n):
    """The thread's two row sums (entries ``s`` and ``s + 8``) summed over its quad's four lanes (the
    quad holds all 64 heads of a row), times the rows' scales, stored by lane 0 of the quad below ``n``."""
    v0 = v0 + cute.arch.shuffle_sync_bfly(v0, offset=1)
    v0 = v0 + cute.arch.shuffle_sync_bfly(v0, offset=2)
    v1 = v1 + cute.arch.shuffle_sync_bfly(v1, offset=1)
    v1 = v1 + cute.arch.shuffle_sync_bfly(v1, offset=2)
    if lane % 4 == 0:
        if s < n:
            st_global(out_row + s * 4, v0 * sc0)
        if s + 8 < n:
            st_global(out_row + (s + 8) * 4, v1 * sc1)


class _LogitsKernel:
    """What both logits kernels hold: one launch configuration (page size, stage ring, consumer
    warpgroups, PDL), checked against the kernel's ``MAX_CONSUMERS``."""

    MAX_CONSUMERS = 4

    def __init__(self, block_size: int, stages: int, consumers: int, pdl: bool):
        _check_ring(stages, consumers, self.MAX_CONSUMERS)
        self.bs = block_size
        self.stages = stages
        self.consumers = consumers
        self.pdl = pdl


class IndexerLogitsKernel(_LogitsKernel):
    """One launch configuration; see ``compile`` for the cache key."""

    @cute.jit
    def __call__(self, mQ, mW, mCache, mBT, mReq, mPos, mOut, ratio: Int32, programs: Int32, stream):
        T = mQ.shape[0]
        n_pages = mCache.shape[0]
        # the keys of every page as an e4m3 (entry, dim, page) tensor: TMA copies [64, 128] boxes of it
        keys = cute.make_tensor(cute.recast_ptr(mCache.iterator, dtype=Float8E4M3FN),
                                cute.make_layout((self.bs, D, n_pages), stride=(D, 1, mCache.stride[0])))
        k_layout = sm90.make_smem_layout_a(_ROW, (BN, BH, D), Float8E4M3FN, self.stages)
        tma_atom, tma_keys = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileG2SOp(), keys,
                                                         cute.slice_(k_layout, (None, None, 0)), (BN, D))
        self.kernel(tma_atom, tma_keys, k_layout, mQ, mW, mCache, mBT, mReq, mPos, mOut, ratio).launch(
            grid=[T, programs, 1],
            block=[self.consumers * WG + 32, 1, 1],
            stream=stream,
            use_pdl=self.pdl,
        )

    @cute.kernel
    def kernel(self, tma_atom: cute.CopyAtom, tma_keys: cute.Tensor, k_layout: cute.ComposedLayout, mQ, mW, mCache,
               mBT, mReq, mPos, mOut, ratio: Int32):
        tid, t, j, P, warp, lane = _coords()
        stages = self.stages
        producer = self.consumers * (WG // 32)
        if warp == producer:
            cpasync.prefetch_descriptor(tma_atom)

        # ---- shared memory: key ring, queries, scales, stage flags, mbarriers ----
        smem = cutlass.utils.SmemAllocator()
        sK = smem.allocate_tensor(Float8E4M3FN, k_layout.outer, byte_alignment=1024, swizzle=k_layout.inner)
        sQ = _alloc_q(smem)
        sScale = smem.allocate_tensor(Float32, cute.make_layout(BN * stages), byte_alignment=128)
        # ---- the token's visible entries, this CTA's tiles and the producer's first page, read before the
        # grid-dependency wait (_early_reads) ----
        req, ok_tok, n, mine, bt_row, page_nx = _early_reads(mBT, mReq, mPos, t, j, P, ratio, self.bs,
                                                             warp == producer)
        sOk, full, empty = _alloc_ring(smem, stages, tid, self.pdl)

        if warp == producer:
            # ---- producer: block-table page one tile ahead, then TMA keys + bulk scales per stage ----
            gK = cute.local_tile(tma_keys, (BN, D), (None, 0, None))  # (BN, D, tiles in a page, page)
            tKsK, tKgK = cpasync.tma_partition(tma_atom, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2),
                                               cute.group_modes(gK, 0, 2))
            n_pages = mCache.shape[0]
            page_stride = Int64(mCache.stride[0])
            cache_base = mCache.iterator.toint()
            scale_base = sScale.iterator.toint()
            for i in cutlass.range(mine, unroll=1):
                s0, page, page_nx, stage, ok = _producer_tile(i, mine, j, P, self.bs, stages, bt_row, page_nx,
                                                              n_pages, empty, sOk, lane)
                row_tile = (s0 % self.bs) // BN
                if ok:
                    if lane == 0:
                        cute.arch.mbarrier_arrive_and_expect_tx(full + stage, TILE_BYTES + SCALE_BYTES)
                    cute.copy(tma_atom, tKgK[(None, row_tile, page)], tKsK[(None, stage)], tma_bar_ptr=full + stage)
                    if lane == 0:
                        src = (cache_base + Int64(page) * page_stride + Int64(self.bs * D)
                               + Int64(s0 % self.bs) * layouts.INDEXER_FP8_SCALE_BYTES)
                        _bulk_g2s(scale_base + Int32(stage * SCALE_BYTES), src, SCALE_BYTES,
                                  (full + stage).toint())
                else:
                    if lane == 0:
                        cute.arch.mbarrier_arrive(full + stage)
        elif mine > 0:  # (a CTA without tiles, past a short context in a wide table, loads no queries)
            # ---- consumer warpgroup ----
            H = mQ.shape[1]
            # the 64 query heads (e4m3 rows of 128 bytes) into the swizzled K-major tile; zero rows past H
            q_base = sQ.iterator.toint()
            q_row0 = mQ.iterator.toint() + Int64(t) * Int64(mQ.stride[0])
            for u in cutlass.range_constexpr(BH * (D // 16) // (self.consumers * WG)):
                c = tid + u * (self.consumers * WG)
                h = c // (D // 16)
                ch = c % (D // 16)
                w0 = Uint32(0)
                w1 = Uint32(0)
                w2 = Uint32(0)
                w3 = Uint32(0)
                if h < H:
                    w0, w1, w2, w3 = ld("global", q_row0 + Int64(h) * Int64(mQ.stride[1]) + Int64(ch * 16), Uint32, 4,
                                        nc=True)
                st_shared_v4(q_base + Int32(sw128_offset(h, ch)), w0, w1, w2, w3)
            cute.arch.fence_view_async_shared()  # generic-proxy writes of sQ visible to wgmma
            cute.arch.barrier(barrier_id=1, number_of_threads=self.consumers * WG)
            g = warp // (WG // 32)  # this warpgroup takes the CTA's tiles g, g + consumers, ..
            wtid = tid % WG

            mma, tCrK, tCrQ, acc, cS = e4m3_wgmma(sK, sQ, wtid, BN, BH)  # cS: (entry, head) of each element
            mma.set(warpgroup.Field.ACCUMULATE, True)
            w = cute.make_rmem_tensor(cute.size(acc), Float32)
            w_row = mW.iterator.toint() + Int64(t) * Int64(mW.stride[0]) * 4
            for e in cutlass.range_constexpr(cute.size(acc)):
                h = cS[e][1]
                w[e] = Float32(0.0)
                if h < H:
                    w[e] = ld("global", w_row + Int64(h * 4), Float32, nc=True)
            out_row = mOut.iterator.toint() + Int64(t) * Int64(mOut.stride[0]) * 4
            scale_base = sScale.iterator.toint()
            for i in cutlass.range(g, mine, self.consumers, unroll=1):
                s0 = (j + i * P) * BN
                stage = i % stages
                cute.arch.mbarrier_wait(full + stage, (i // stages) % 2)
                ok = sOk[stage] != 0
                _qk(mma, acc, tCrK, stage, tCrQ)
                r0 = cS[0][0]
                sc0 = ld("shared", scale_base + Int32(stage * SCALE_BYTES + r0 * 4), Float32)
                sc1 = ld("shared", scale_base + Int32(stage * SCALE_BYTES + (r0 + 8) * 4), Float32)
                cute.arch.mbarrier_arrive(empty + stage)
                if not ok:  # an unreadable page: zero keys, scale 0 (the Triton kernel's masked load)
                    acc.fill(0.0)
                    sc0 = Float32(0.0)
                    sc1 = Float32(0.0)
                # Σ_h w·ReLU(S) on the thread's two rows (16 heads each), then over the quad's lanes
                v0, v1 = _row_sums(cute.size(acc), lambda e: w[e] * _relu_nan(acc[e]))
                _store_rows(v0, v1, sc0, sc1, lane, out_row, Int64(s0 + r0), n)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(block_size: int, stages: int, consumers: int, req_dtype, pos_dtype, pdl: bool, arch: str,
                extra_options: str = ""):
        """Compile one variant over fake tensors (no GPU needed): tokens, heads, pages, table width
        and strides are symbolic."""
        kernel = IndexerLogitsKernel(block_size, stages, consumers, pdl)
        return _compile_fake(kernel, D, False, req_dtype, pos_dtype, arch, extra_options)


def _compile_fake(kernel, q_row_bytes: int, q_scales: bool, req_dtype, pos_dtype, arch: str, extra_options: str):
    """``cute.compile`` of one logits kernel over fake tensors (no GPU needed): tokens, heads, pages,
    table width and strides symbolic; queries of ``q_row_bytes`` per head (and ``[T, H, 4]`` scale bytes
    with ``q_scales``), 16-byte aligned rows."""
    mk = cute.runtime.make_fake_tensor
    T = cute.sym_int()
    H = cute.sym_int()
    args = [mk(Uint8, (T, H, q_row_bytes), stride=(cute.sym_int64(divisibility=16), cute.sym_int64(divisibility=16), 1),
               assumed_align=16)]
    if q_scales:
        args.append(mk(Uint8, (T, H, 4), stride=(cute.sym_int64(divisibility=4), cute.sym_int64(divisibility=4), 1),
                       assumed_align=4))
    args += [
        mk(Float32, (T, H), stride=(cute.sym_int64(), 1), assumed_align=4),  # head weights
        mk(Uint8, (cute.sym_int(), cute.sym_int()), stride=(cute.sym_int64(divisibility=16), 1), assumed_align=16),
        mk(Int32, (cute.sym_int(), cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4),  # block table
        mk(req_dtype, (T,), stride=(1,), assumed_align=req_dtype.width // 8),
        mk(pos_dtype, (T,), stride=(1,), assumed_align=pos_dtype.width // 8),
        mk(Float32, (T, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4),  # out
    ]
    return cute.compile(kernel, *args, Int32(4), Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip())


def _ld_page(bt_row, b):
    """Block-table entry ``b`` of the row at global ``bt_row`` (int32)."""
    return ld("global", bt_row + b * 4, Int32, nc=True)


# --------------------------------------------------------------------------------------------------
# MXFP4
# --------------------------------------------------------------------------------------------------
MX_ROW = layouts.INDEXER_MXFP4_VALUE_BYTES  # 64 packed bytes per key / query row
MX_TILE_BYTES = BN * MX_ROW  # 4 KB of packed keys per tile
MX_SCALE_BYTES = BN * layouts.INDEXER_MXFP4_SCALE_BYTES  # 256: four UE8M0 bytes per entry
MX_FOLD_SPREAD = _TRITON_FOLD_SPREAD.value  # the Triton kernel's fold rule, the same binades


def _e2m1x8_e4m3(p, lut_lo, lut_hi):
    """Eight packed E2M1 values ``p`` (element ``i`` in bits ``4i .. 4i + 3``) → the e4m3 bytes of
    elements 0-3 and of elements 4-7, in order. Each nibble with its sign bit cleared is a ``prmt``
    selector into the 8-byte table ``lut_lo | lut_hi`` (the magnitude); the raw nibble selects from
    ``0x7F`` bytes, where a set bit 3 makes ``prmt`` replicate the byte's msb (0x00) instead of copying
    it (0x7F), so that result shifted left by one has bit 7 clear exactly for the negative elements,
    whose sign ``lop3`` then sets (``a | (~b & c)``). Outputs written last (``inline_ptx`` outputs may
    share registers with its inputs)."""
    return cute.arch.inline_ptx(
        "{ .reg .b32 m, t, x, k, lo, hi;"
        " mov.b32 k, 0x7F7F7F7F; and.b32 m, {$r0}, 0x77777777;"
        " prmt.b32 t, {$r1}, {$r2}, m; prmt.b32 x, k, k, {$r0}; shl.b32 x, x, 1;"
        " lop3.b32 lo, t, x, 0x80808080, 0xF2;"
        " shr.u32 m, m, 16; shr.u32 x, {$r0}, 16;"
        " prmt.b32 t, {$r1}, {$r2}, m; prmt.b32 x, k, k, x; shl.b32 x, x, 1;"
        " lop3.b32 hi, t, x, 0x80808080, 0xF2;"
        " mov.b32 {$w0}, lo; mov.b32 {$w1}, hi; }",
        write_only_types=[Uint32, Uint32], read_only_args=[p, lut_lo, lut_hi])


def _mx_fold(sb):
    """(largest scale byte ``e``, fold) of a row's four UE8M0 scale bytes packed in ``sb`` (block 0 in
    the low byte): fold when every block lies within ``MX_FOLD_SPREAD`` binades of the largest, none
    is the NaN byte 0xFF and none the zero scale 0x00 (``kernels.triton.attention._mx_fold``)."""
    b0 = sb & Uint32(0xFF)
    b1 = (sb >> 8) & Uint32(0xFF)
    b2 = (sb >> 16) & Uint32(0xFF)
    b3 = sb >> 24
    e = cutlass.max(cutlass.max(b0, b1), cutlass.max(b2, b3))
    lo = cutlass.min(cutlass.min(b0, b1), cutlass.min(b2, b3))
    return e, (e - lo <= Uint32(MX_FOLD_SPREAD)) & (e < Uint32(255)) & (lo > Uint32(0))


def _ue8m0(b):
    """fp32 ``2^(b − 127)`` of one UE8M0 byte ``b`` (Uint32), NaN for 0xFF, 0 for 0x00 (its exponent
    field; the reference's too)."""
    return cutlass.select_(b == Uint32(255), Float32(float("nan")), (b << 23).bitcast(Float32))


def _mx_luts(sb, fold, e, b):
    """The 8-byte e4m3 magnitude table of block ``b`` of a row (scale bytes ``sb``) as two words: E2M1's
    0, 0.5, 1, 1.5, 2, 3, 4, 6 as e4m3 0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C; with ``fold`` the
    block is times ``2^(e_b − e)``, its nonzero entries' exponent fields ``e − e_b`` lower (exact in
    e4m3 within 5 binades: ``0.5 · 2^-5`` is still normal)."""
    sbb = (sb >> (8 * b)) & Uint32(0xFF)
    c = cutlass.select_(fold, Uint32(48) - Uint32(8) * (e - sbb), Uint32(48))
    return c * Uint32(0x01010100) + Uint32(0x0C080000), c * Uint32(0x01010101) + Uint32(0x1C181410)


def _mx_store_block(words, luts, dst, row, b):
    """Block ``b`` of an MXFP4 row (its four packed words, its ``_mx_luts``) → e4m3 at K ``32b .. 32b +
    31`` of the row ``row`` of the swizzled ``[64, 128]`` tile at ``dst``."""
    l0, h0 = _e2m1x8_e4m3(words[0], *luts)
    l1, h1 = _e2m1x8_e4m3(words[1], *luts)
    l2, h2 = _e2m1x8_e4m3(words[2], *luts)
    l3, h3 = _e2m1x8_e4m3(words[3], *luts)
    st_shared_v4(dst + Int32(sw128_offset(row, 2 * b)), l0, h0, l1, h1)
    st_shared_v4(dst + Int32(sw128_offset(row, 2 * b + 1)), l2, h2, l3, h3)


@cute.jit
def _mx_decode_row(src, sb, fold, e, dst, row, half):
    """Blocks ``2·half`` and ``2·half + 1`` of one MXFP4 row (32 packed bytes at shared ``src``, scale
    bytes ``sb``) → e4m3 in the row ``row`` of the swizzled ``[64, 128]`` tile at ``dst`` (block ``b``
    at K ``32b .. 32b + 31``); with ``fold``, block ``b`` times ``2^(e_b − e)``."""
    for k in cutlass.range_constexpr(2):
        b = 2 * half + k
        luts = _mx_luts(sb, fold, e, b)
        _mx_store_block(ld("shared", src + Int32(16 * k), Uint32, 4), luts, dst, row, b)


class IndexerLogitsMxfp4Kernel(_LogitsKernel):
    """MXFP4 keys and queries (``kernels.triton.attention`` folded / exact semantics): the producer
    bulk-copies each tile's packed keys (4 KB) and scale bytes (256 B) into a ring; each consumer
    warpgroup decodes its tile into its own e4m3 tile (rows whose block exponents fold take
    ``2^(e_b − e)`` into the values), then runs the folded form (four chained k32 wgmma, key scale
    after the head sum) when every row of the tile and every query head folds, else the exact form
    (per 32-block two m64n32k32 wgmma, one per half of the heads, times both block scales, summed in
    fp32 in block order)."""

    MAX_CONSUMERS = 2  # one named barrier per consumer warpgroup (ids 2, 3)

    @cute.jit
    def __call__(self, mQ, mQs, mW, mCache, mBT, mReq, mPos, mOut, ratio: Int32, programs: Int32, stream):
        self.kernel(mQ, mQs, mW, mCache, mBT, mReq, mPos, mOut, ratio).launch(
            grid=[mQ.shape[0], programs, 1],
            block=[self.consumers * WG + 32, 1, 1],
            stream=stream,
            use_pdl=self.pdl,
        )

    @cute.kernel
    def kernel(self, mQ, mQs, mW, mCache, mBT, mReq, mPos, mOut, ratio: Int32):
        tid, t, j, P, warp, lane = _coords()
        stages = self.stages
        nc = self.consumers
        producer = nc * (WG // 32)

        # ---- shared memory ----
        smem = cutlass.utils.SmemAllocator()
        k_layout = sm90.make_smem_layout_a(_ROW, (BN, BH, D), Float8E4M3FN, nc)  # one decoded tile per warpgroup
        sK = smem.allocate_tensor(Float8E4M3FN, k_layout.outer, byte_alignment=1024, swizzle=k_layout.inner)
        sQ = _alloc_q(smem)
        sRaw = smem.allocate_tensor(Uint8, cute.make_layout(MX_TILE_BYTES * stages), byte_alignment=128)
        sSb = smem.allocate_tensor(Uint32, cute.make_layout(BN * stages), byte_alignment=128)
        sQm = smem.allocate_tensor(Float32, cute.make_layout(BH * 4), byte_alignment=16)  # [head][block]
        sW = smem.allocate_tensor(Float32, cute.make_layout(BH), byte_alignment=16)  # head weights (0 past H)
        sWf = smem.allocate_tensor(Float32, cute.make_layout(BH), byte_alignment=16)  # sW · 2^(e − 127), folded
        sKm = smem.allocate_tensor(Float32, cute.make_layout(nc * BN * 4), byte_alignment=16)  # [wg][row][block]
        sKs = smem.allocate_tensor(Float32, cute.make_layout(nc * BN), byte_alignment=16)  # [wg][row]
        sVote = smem.allocate_tensor(Int32, cute.make_layout(4 * (nc + 1)), byte_alignment=16)
        req, ok_tok, n, mine, bt_row, page_nx = _early_reads(mBT, mReq, mPos, t, j, P, ratio, self.bs,
                                                             warp == producer)
        sOk, full, empty = _alloc_ring(smem, stages, tid, self.pdl)
        raw_base = sRaw.iterator.toint()
        sb_base = sSb.iterator.toint()

        if mine > 0:
            if warp == producer:
                n_pages = mCache.shape[0]
                page_stride = Int64(mCache.stride[0])
                cache_base = mCache.iterator.toint()
                for i in cutlass.range(mine, unroll=1):
                    s0, page, page_nx, stage, ok = _producer_tile(i, mine, j, P, self.bs, stages, bt_row, page_nx,
                                                                  n_pages, empty, sOk, lane)
                    if lane == 0:
                        if ok:
                            page_off = cache_base + Int64(page) * page_stride
                            cute.arch.mbarrier_arrive_and_expect_tx(full + stage, MX_TILE_BYTES + MX_SCALE_BYTES)
                            _bulk_g2s(raw_base + Int32(stage * MX_TILE_BYTES), page_off + Int64(s0 % self.bs) * MX_ROW,
                                      MX_TILE_BYTES, (full + stage).toint())
                            _bulk_g2s(sb_base + Int32(stage * MX_SCALE_BYTES),
                                      page_off + Int64(self.bs * MX_ROW) + Int64(s0 % self.bs) * 4, MX_SCALE_BYTES,
                                      (full + stage).toint())
                        else:
                            cute.arch.mbarrier_arrive(full + stage)
            else:
                H = mQ.shape[1]
                g = warp // (WG // 32)
                wtid = tid % WG
                wwarp = wtid // 32
                row = wtid // 2  # the row (query head, then tile entry) this thread decodes half of
                half = wtid % 2
                q_base = sQ.iterator.toint()
                # ---- queries: fold flags of every head (warpgroup 0), one vote, then the decode ----
                qsb = Uint32(0x7F7F7F7F)  # heads past H: scale 2^0 in every block, zero values
                if (g == 0) & (row < H):
                    qsb = ld("global", mQs.iterator.toint() + Int64(t) * Int64(mQs.stride[0])
                             + Int64(row) * Int64(mQs.stride[1]), Uint32, nc=True)
                qe, qf = _mx_fold(qsb)
                if g == 0:
                    fold_all = cute.arch.vote_all_sync(qf)
                    if lane == 0:
                        sVote[wwarp] = Int32(fold_all)
                cute.arch.barrier(barrier_id=1, number_of_threads=nc * WG)
                q_fold = (sVote[0] & sVote[1] & sVote[2] & sVote[3]) != 0
                if g == 0:
                    src = Int64(0)
                    if row < H:
                        # the packed row straight from global memory: 32 bytes of this thread's half
                        src = mQ.iterator.toint() + Int64(t) * Int64(mQ.stride[0]) + Int64(row) * Int64(mQ.stride[1])
                    _mx_decode_q_row(src, row < H, qsb, q_fold, qe, q_base, row, half)
                    if half == 0:
                        for b in cutlass.range_constexpr(4):
                            m = cutlass.select_(q_fold, _ue8m0(qe), _ue8m0((qsb >> (8 * b)) & Uint32(0xFF)))
                            sQm[row * 4 + b] = cutlass.select_(row < H, m, Float32(0.0))
                        wv = Float32(0.0)
                        if row < H:
                            wv = ld("global", mW.iterator.toint() + Int64(t) * Int64(mW.stride[0]) * 4 + Int64(row * 4),
                                    Float32, nc=True)
                        sW[row] = wv
                        sWf[row] = wv * _ue8m0(qe)  # the folded query's common block scale in its weight
                cute.arch.fence_view_async_shared()
                cute.arch.barrier(barrier_id=1, number_of_threads=nc * WG)

                mma, tCrK, tCrQ, acc, cS = e4m3_wgmma(sK, sQ, wtid, BN, BH)
                mma.set(warpgroup.Field.ACCUMULATE, True)
                # the exact form one half of the heads at a time (m64n32: 16 + 16 accumulator registers,
                # not 32 + 32), each 32-block's dot on its own (scale-d 0)
                mma_h = sm90.make_trivial_tiled_mma(Float8E4M3FN, Float8E4M3FN, OperandMajorMode.K,
                                                    OperandMajorMode.K, Float32, (1, 1, 1), (BN, BH // 2))
                mma_h.set(warpgroup.Field.ACCUMULATE, False)
                thr_h = mma_h.get_slice(wtid)
                tHrK = mma_h.make_fragment_A(thr_h.partition_A(sK))
                q_half = [cute.local_tile(sQ[None, None, 0], (BH // 2, D), (hh, 0)) for hh in range(2)]
                tHrQ0 = mma_h.make_fragment_B(thr_h.partition_B(q_half[0]))
                tHrQ1 = mma_h.make_fragment_B(thr_h.partition_B(q_half[1]))
                acc_h = cute.make_rmem_tensor(thr_h.partition_shape_C((BN, BH // 2)), Float32)
                sc_h = cute.make_rmem_tensor(thr_h.partition_shape_C((BN, BH // 2)), Float32)
                cH = thr_h.partition_C(cute.make_identity_tensor((BN, BH // 2)))
                out_row = mOut.iterator.toint() + Int64(t) * Int64(mOut.stride[0]) * 4
                k_base = sK.iterator.toint() + Int32(g * BN * D)
                r0 = cS[0][0]
                for i in cutlass.range(g, mine, nc, unroll=1):
                    s0 = (j + i * P) * BN
                    stage = i % stages
                    cute.arch.mbarrier_wait(full + stage, (i // stages) % 2)
                    ok = sOk[stage] != 0
                    # the previous tile's multiplies have read this warpgroup's decoded tile
                    _wg_barrier(g)
                    sb = ld("shared", sb_base + Int32(stage * MX_SCALE_BYTES + row * 4), Uint32)
                    ke, kf = _mx_fold(sb)
                    live = ok & (Int64(s0 + row) < n)
                    _mx_decode_row(raw_base + Int32(stage * MX_TILE_BYTES + row * MX_ROW + 32 * half), sb, kf, ke,
                                   k_base, row, half)
                    if half == 0:
                        sKs[g * BN + row] = cutlass.select_(ok, _ue8m0(ke), Float32(0.0))
                    cute.arch.mbarrier_arrive(empty + stage)
                    tile_fold = cute.arch.vote_all_sync((Int32(kf) | (Int32(1) - Int32(live))) != 0)
                    if lane == 0:
                        sVote[4 + 4 * g + wwarp] = Int32(tile_fold)
                    cute.arch.fence_view_async_shared()
                    _wg_barrier(g)
                    v = 4 + 4 * g
                    folded = q_fold & ((sVote[v] & sVote[v + 1] & sVote[v + 2] & sVote[v + 3]) != 0)
                    v0 = Float32(0.0)
                    v1 = Float32(0.0)
                    sc0 = Float32(1.0)
                    sc1 = Float32(1.0)
                    if folded:
                        _qk(mma, acc, tCrK, g, tCrQ)
                        if not ok:  # an unreadable page: zero keys, scale 0 (sKs), as the Triton kernel
                            acc.fill(0.0)
                        # the folded head weights read from shared memory here, not held across the loop
                        v0, v1 = _row_sums(cute.size(acc), lambda e: sWf[cS[e][1]] * _relu_nan(acc[e]))
                        sc0 = sKs[g * BN + r0]
                        sc1 = sKs[g * BN + r0 + 8]
                    else:
                        # this row's block scales, for the rows of the accumulators (the tile's barrier)
                        for k in cutlass.range_constexpr(2):
                            b = 2 * half + k
                            km = cutlass.select_(kf, _ue8m0(ke), _ue8m0((sb >> (8 * b)) & Uint32(0xFF)))
                            sKm[(g * BN + row) * 4 + b] = cutlass.select_(ok, km, Float32(0.0))
                        _wg_barrier(g)
                        for hh in cutlass.range_constexpr(2):
                            tHrQ = tHrQ0 if const_expr(hh == 0) else tHrQ1
                            sc_h.fill(0.0)
                            for kb in cutlass.range_constexpr(cute.size(tHrK, mode=[2])):
                                warpgroup.fence()
                                cute.gemm(mma_h, acc_h, tHrK[None, None, kb, g], tHrQ[None, None, kb], acc_h)
                                warpgroup.commit_group()
                                warpgroup.wait_group(0)
                                for e in cutlass.range_constexpr(cute.size(acc_h)):
                                    hd = cH[e][1] + hh * (BH // 2)
                                    km = sKm[(g * BN + cH[e][0]) * 4 + kb]
                                    sc_h[e] = sc_h[e] + (acc_h[e] * km) * sQm[hd * 4 + kb]
                            # an unreadable page: sKm is 0 there, so (acc·0)·sQm is 0, or NaN for a NaN query
                            # block scale, as the Triton kernel's zero keys give (stale bytes decode finite)
                            v0, v1 = _row_sums(cute.size(acc_h), lambda e: sW[cH[e][1] + hh * (BH // 2)]
                                               * _relu_nan(sc_h[e]), v0, v1)
                    _store_rows(v0, v1, sc0, sc1, lane, out_row, Int64(s0 + r0), n)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(block_size: int, stages: int, consumers: int, req_dtype, pos_dtype, pdl: bool, arch: str,
                extra_options: str = ""):
        """Compile one variant over fake tensors (no GPU needed)."""
        kernel = IndexerLogitsMxfp4Kernel(block_size, stages, consumers, pdl)
        return _compile_fake(kernel, MX_ROW, True, req_dtype, pos_dtype, arch, extra_options)


@cute.jit
def _wg_barrier(g):
    """A named barrier of consumer warpgroup ``g``'s 128 threads (ids 2, 3: constant ids, so ptxas
    reserves two barriers, not all sixteen)."""
    if g == 0:
        cute.arch.barrier(barrier_id=2, number_of_threads=WG)
    else:
        cute.arch.barrier(barrier_id=3, number_of_threads=WG)


@cute.jit
def _mx_decode_q_row(src, live, sb, fold, e, dst, row, half):
    """``_mx_decode_row`` for a query row read from global memory at ``src`` (zeros where not ``live``)."""
    for k in cutlass.range_constexpr(2):
        b = 2 * half + k
        luts = _mx_luts(sb, fold, e, b)
        w0 = Uint32(0)
        w1 = Uint32(0)
        w2 = Uint32(0)
        w3 = Uint32(0)
        if live:
            w0, w1, w2, w3 = ld("global", src + Int64(32 * half + 16 * k), Uint32, 4, nc=True)
        _mx_store_block((w0, w1, w2, w3), luts, dst, row, b)


def supports(q: torch.Tensor, q_scale: torch.Tensor | None, weights: torch.Tensor, k_cache: torch.Tensor,
             block_size: int, fmt: str) -> bool:
    """Whether these kernels can run the call: a Hopper GPU (wgmma, TMA), at most 64 query heads
    (e4m3 rows of 128 bytes for ``fmt="fp8"``; for ``"mxfp4"`` uint8 rows of 64 packed bytes and
    their ``[T, H, 4]`` uint8 scales), fp32 head weights, pages of a multiple of 64 entries, and a
    cache of whole pages whose base and stride are 16-byte multiples (TMA and bulk copies; every
    ``indexer_k_insert``-made cache). Queries or scales whose rows are not aligned are copied first
    (``indexer_logits_into``)."""
    if fmt not in ("fp8", "mxfp4") or q.device.type != "cuda" or _capability(q.device)[0] != 9:
        return False
    if q.dim() != 3 or not 0 < q.shape[1] <= BH or block_size % BN or weights.dtype != torch.float32:
        return False
    if fmt == "fp8" and q.shape[2] != D:
        return False
    if fmt == "mxfp4" and (q.dtype != torch.uint8 or q.shape[2] != MX_ROW or q_scale is None
                           or q_scale.dtype != torch.uint8 or tuple(q_scale.shape) != (*q.shape[:2], 4)):
        return False
    return (k_cache.dim() == 2 and k_cache.shape[0] > 0 and k_cache.shape[1] >= layouts.page_bytes(fmt, block_size)
            and k_cache.stride(1) == 1 and aligned(k_cache, 16, (0,)))


def preferred(T: int, L: int, sms: int, fmt: str = "fp8") -> bool:
    """Whether the op takes these kernels over the Triton one (given ``supports``). MXFP4: always (the
    E2M1 decode makes the Triton kernel the slower one even at 256 tiles: 64k context B = 1 3.9 against
    5.0 µs). FP8: when ``T`` rows of the table width ``L`` (``M·block_size``; the visible counts are
    on the GPU) hold at least two 64-entry tiles per CTA of one wave. H200, FP8 logits alone, this
    kernel against the Triton one (µs): below the line, 64k context B = 1 3.4 / 3.1 (256 tiles), 8k
    context in a 16k table B = 1 2.7 / 2.6 and B = 8 3.3 / 3.5 (64 and 512 tiles: the Triton kernel
    runs both); above it, 64k B = 8 / 32 / 64 8.3 / 23.8 / 41.4 against 10.8 / 28.6 / 50.1, 1M B = 1
    13.2 / 18.2, prefill (4,096 tokens over 64k entries) 6,850 / 8,336, and the one loss, 8k context in
    a 1M table B = 1 3.0 / 2.7 (4,096 table tiles, 32 visible)."""
    return fmt == "mxfp4" or T * cdiv(L, BN) >= 2 * CTAS_PER_SM["fp8"] * sms


def programs_for(T: int, L: int, sms: int, fmt: str = "fp8") -> int:
    """CTAs per token: one wave of ``CTAS_PER_SM[fmt]`` per SM, at most one per 64-entry tile."""
    return max(1, min(cdiv(max(L, 1), BN), CTAS_PER_SM[fmt] * sms // max(T, 1)))


def indexer_logits_into(out, q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int,
                        fmt: str, compress_ratio: int, programs: int | None = None, stages: int = STAGES,
                        consumers: int = CONSUMERS, pdl: bool | None = None) -> torch.Tensor:
    """``kernels.triton.attention.indexer_logits_into``'s result (same arguments; ``supports`` must
    hold) from ``IndexerLogitsKernel`` (FP8) or ``IndexerLogitsMxfp4Kernel`` (MXFP4): ``out[t, s]``
    (fp32 ``[T, >= L]``, unit stride along entries) for the visible entries only. ``programs`` (CTAs
    per token), ``stages`` and ``consumers`` override the launch configuration (tests, benchmarks);
    ``ValueError`` for a ring the consumer warpgroups cannot share (``stages`` not a multiple of
    ``consumers``; ``consumers`` not 1, 2 or 4 for FP8, not 1 or 2 for MXFP4) or an ``out`` narrower
    than the table."""
    T = q.shape[0]
    L = block_table.shape[1] * block_size
    kernel = IndexerLogitsKernel if fmt == "fp8" else IndexerLogitsMxfp4Kernel
    _check_ring(stages, consumers, kernel.MAX_CONSUMERS)
    if out.dim() != 2 or out.shape[0] != T or out.shape[1] < L or out.stride(1) != 1:
        raise ValueError(f"indexer logits: out must be [{T}, >= {L}] with unit stride along entries, "
                         f"got {tuple(out.shape)} strides {out.stride()}")
    if T == 0 or L == 0:
        return out
    qb = q.view(torch.uint8) if q.dtype != torch.uint8 else q
    if qb.stride(-1) != 1 or not aligned(qb, 16, (0, 1)):
        qb = fresh_copy(qb)
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    if programs is None:
        programs = programs_for(T, L, sm_programs(q.device), fmt)
    if pdl is None:
        pdl = pdl_meta(q.device.index) is not None
    compiled = kernel.compile(block_size, stages, consumers, TORCH_TO_CUTE[token_to_req.dtype],
                              TORCH_TO_CUTE[positions.dtype], pdl, arch_name(q.device))
    if fmt == "fp8":
        compiled(qb, weights, k_cache, block_table, token_to_req, positions, out, compress_ratio, programs)
    else:
        if q_scale.stride(-1) != 1 or not aligned(q_scale, 4, (0, 1)):
            q_scale = fresh_copy(q_scale)
        compiled(qb, q_scale, weights, k_cache, block_table, token_to_req, positions, out, compress_ratio, programs)
    return out

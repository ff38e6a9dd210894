"""CuTe-DSL top-k selection of ``indexer_topk``: a radix select over shared-memory histograms.

Same contract and bits as ``kernels.triton.topk`` (``reference.attention.select_topk``,
docs/numerics.md §7.2): a row with ``n`` visible entries keeps, when ``n > k``, the ``k`` entries of
largest logit with ties going to the lower entry index (NaN above +inf, −0.0 equal to +0.0), written
in increasing index order; ``n <= k`` gives ``0 .. n−1`` then −1; a padding row gives −1. Only
positions below a row's visible count are read.

Method. A CTA of up to 1,024 threads holds a chunk of up to 16,384 keys in registers, thread ``i``
the ``E`` consecutive positions from ``start + i·E``. The key is the Triton kernel's
(``_sort_key``: unsigned order == float order, 0 = absent). The k-th largest key is found with at
most four passes over 8 key bits. The chunk's valid keys share every bit above the highest one where
their largest and smallest differ (one warp reduction each): the first pass counts the 8 bits just
below that common prefix, the next ones the 8 below those, the last clamped at bit 0 (a fixed top
byte would put logits of one magnitude into one or two bins, whose atomics serialize). Each pass
counts the digits of the keys still sharing the threshold's higher bits into a 256-bin shared-memory
histogram (one plain atomic per key: on the H200 that beat both per-lane copies of the bins and
``match.any`` aggregation of equal digits, 12.2 against 13.4 and 19.6 µs for one 16,384-entry row),
and one warp finds the bin holding the k-th largest from the suffix sums. The passes stop once that
bin holds exactly the entries still needed. Entries above the threshold are kept, then the first
``need`` entries equal to it in position order; each thread counts its kept entries of both kinds,
one block-wide prefix sum over those counts (one barrier) places them, and each thread writes its own
in order, so the kept entries are written compacted in index order without a sort. (Holding the
positions strided by the thread count instead, which needed per-slot ballots and a prefix sum over
(slot, warp) counts with four barriers, took about 40 % of a 16,384-entry CTA's time in that ordering,
H200 clock stamps.)

Rows longer than one chunk are split over CTAs in rounds as the Triton selection does
(``kernels.triton.topk.plan``): each chunk keeps its best ``k`` (key, index) candidates and the next
round selects from them. A row whose entries (or candidates) fit in a round's first chunk is finished
by that chunk's CTA, which writes the result, and the later rounds skip it: a short row of a wide
table (an 8k-token context in a 1M-token ``max_model_len``) costs one CTA, as in a narrow table. The
plan (``plan``) differs from the Triton one (the H200 timings there); the bits are the same.

In a table wider than ``FUSED_FROM`` entries the rounds of a split row run in one kernel
(``TopkFusedKernel``, with ticket counters from ``kernels._device.zeroed_counters``): the CTA whose
arrival completes a group's first-round chunks selects from the group's candidates, so a row's merge
starts when its own chunks are done, with no launch in between, and a short row of a wide table
launches nothing after its first CTA (its CTAs loop over a row's chunks in a grid of at most one CTA
per SM, so the chunks past a short row cost no second wave either). Otherwise (or where ``fused_plan``
declines) each round is its own kernel (``TopkRoundKernel``), the later ones waiting for the earlier
ones to complete: for rows of at most 65,536 entries the separate rounds were as fast or slightly
faster on the H200.

Few rows the plan splits (``cluster_plan``: up to four rows of up to 16,384 entries, a 64k-token
context) are selected in one round by a thread-block cluster instead (``TopkClusterKernel``): each CTA
holds a 4,096-entry chunk, and the key range, every pass's histogram and the kept counts before each CTA
are summed over the cluster in distributed shared memory, so the row's threshold is found with no
candidates written and no second launch. H200, ``indexer_topk`` at 64k context: B = 1 / 4 9.35-9.42 /
11.65-11.67 → 8.95-9.12 / 11.31-11.33 µs; it lost at B = 8 and with more, smaller CTAs (``CLUSTER_CHUNK``
has the numbers).
"""

from __future__ import annotations

import functools
from typing import Optional

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Boolean, Float32, Int32, Int64, Uint32, const_expr

from .. import _device
from ..triton import topk as _ttopk
from ..triton._common import cdiv
from ._common import arch_name
from ._math import TORCH_TO_CUTE, visible_entries
from ._smem import ld

WARP = 32
BINS = 256  # 8-bit digits
MAX_THREADS = 1024  # a CTA; 16 keys per thread at the largest chunk
MAX_PER_THREAD = 16
MAX_CHUNK = MAX_THREADS * MAX_PER_THREAD  # 16,384: the Triton selection's largest chunk too
_FULL = 0xFFFFFFFF
MAX_CLUSTER_CTAS = 16  # a cluster's CTAs on sm_90 (8 portable, 16 with the non-portable size allowed)
MAX_MERGES = 3  # merge levels of the one-kernel selection (four rounds: rows of up to 2^29 entries at k = 512)


def chunk_threads(chunk: int) -> tuple[int, int]:
    """(threads, keys per thread) of a CTA holding ``chunk`` keys (a power of two, 16..16,384):
    up to 1,024 threads (measured against 512 on the H200: 12.2 against 13.7 µs for one 16,384-entry
    row), at least one warp."""
    threads = max(WARP, min(MAX_THREADS, chunk))
    return threads, max(1, chunk // threads)


def _sort_key(x):
    """uint32 key of fp32 ``x``: unsigned order == float order, NaN highest, −0 == +0, never 0."""
    b = x.bitcast(Uint32)
    key = cutlass.select_((b >> 31) != Uint32(0), b ^ Uint32(_FULL), b | Uint32(0x80000000))
    key = cutlass.select_(x == Float32(0.0), Uint32(0x80000000), key)
    return cutlass.select_(x != x, Uint32(_FULL), key)


def _warp_inclusive_sum(v, lane):
    """Inclusive prefix sum of ``v`` over the lanes of a warp (shuffles up)."""
    for off in (1, 2, 4, 8, 16):
        other = cute.arch.shuffle_sync_up(v, off)
        v = v + cutlass.select_(lane >= off, other, Int32(0))
    return v


def _row_length(mPos, mReq, t, n_req, ratio, L):
    """Row ``t``'s visible entries (``_math.visible_entries``), Int32."""
    return Int32(visible_entries(Int64(mReq[t]), Int64(mPos[t]), Int64(n_req), ratio, L)[1])


def _alloc_smem(cluster: bool = False):
    """A selecting CTA's shared memory: two radix histograms, per-warp sums, pass results (res[0..3];
    res[4]: the fused kernel's ticket) and per-warp key ranges; with ``cluster`` also what the
    cluster's other CTAs read (``ext``: the CTA's key range and kept counts) and the summed histogram
    (``tot``)."""
    smem = cutlass.memory.SmemAllocator()
    hist = smem.allocate_tensor(Int32, cute.make_layout(2 * BINS), byte_alignment=16)
    wsum = smem.allocate_tensor(Int32, cute.make_layout(WARP), byte_alignment=16)
    res = smem.allocate_tensor(Int32, cute.make_layout(8), byte_alignment=16)
    rng = smem.allocate_tensor(Uint32, cute.make_layout(2 * WARP), byte_alignment=16)
    if const_expr(not cluster):
        return hist, wsum, res, rng
    ext = smem.allocate_tensor(Int32, cute.make_layout(4), byte_alignment=16)
    tot = smem.allocate_tensor(Int32, cute.make_layout(BINS), byte_alignment=16)
    return hist, wsum, res, rng, ext, tot


@cute.jit
def _row_length_then_wait(mPos, mReq, t, n_req, ratio, L, pdl: bool):
    """Row ``t``'s visible entries, read before the grid-dependency wait (with ``pdl``: see
    ``TopkRoundKernel.kernel``), then the wait."""
    n = _row_length(mPos, mReq, t, n_req, ratio, L)
    if const_expr(pdl):
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()
    return n


@cute.jit
def _cluster_range(kmax, kmin, ext, tid, lane, cl: int):
    """The cluster's largest and smallest valid key from each CTA's (``kmax`` / ``kmin``, left in
    ``ext[0:2]`` for the others; a cluster barrier orders the stores before the remote loads)."""
    if tid == 0:
        ext[0] = Int32(kmax)
        ext[1] = Int32(kmin)
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()
    wmax = Uint32(0)
    wmin = Uint32(_FULL)
    if lane < cl:
        base = ext.iterator.toint()
        wmax = ld("shared", base, Uint32, rank=lane)
        wmin = ld("shared", base + Int32(4), Uint32, rank=lane)
    return cute.arch.warp_redux_sync(wmax, "umax"), cute.arch.warp_redux_sync(wmin, "umin")


@cute.jit
def _cluster_hist(hist, tot, cur, tid, cl: int):
    """``tot[b]`` = bin ``b`` of histogram buffer ``cur`` summed over the cluster's CTAs (a cluster
    barrier first: every CTA's counts are in; a CTA rewrites a buffer only two passes later, after the
    next pass's barrier, which every CTA reaches after these loads). Needs ``BINS`` threads or more;
    the caller's block barrier publishes ``tot``."""
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()
    if tid < BINS:
        vals = cute.make_rmem_tensor((cl,), Int32)
        addr = hist.iterator.toint() + (cur + tid) * 4
        for r in cutlass.range_constexpr(cl):  # every load in flight before the sum
            vals[r] = ld("shared", addr, Int32, rank=r)
        s = Int32(0)
        for r in cutlass.range_constexpr(cl):
            s += vals[r]
        tot[tid] = s


@cute.jit
def _cluster_before(ctot, ext, rank, tid, lane):
    """(entries above the threshold, ties) kept by the cluster's CTAs before ``rank`` (earlier row
    positions), from each CTA's count ``ctot`` (above in the low 16 bits, ties in the high ones, left
    in ``ext[2:4]``). Ends with this CTA's arrival at the cluster barrier that keeps every CTA's shared
    memory alive until the others have read it (the kernel waits on it before it exits)."""
    if tid == 0:
        ext[2] = ctot & 0xFFFF
        ext[3] = ctot >> 16
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()
    a = Int32(0)
    b = Int32(0)
    if lane < rank:
        base = ext.iterator.toint()
        a = ld("shared", base + Int32(8), Int32, rank=lane)
        b = ld("shared", base + Int32(12), Int32, rank=lane)
    a = cute.arch.warp_redux_sync(a, "add")
    b = cute.arch.warp_redux_sync(b, "add")
    cute.arch.cluster_arrive()
    return a, b


class TopkRoundKernel:
    """One round of the selection; see ``compile`` for the cache key.

    ``from_logits``: the source is fp32 logits (the row length from positions / requests), else the
    previous round's (key, index) candidates (the row length from ``mN``). ``final``: write indices
    (−1 fill) into ``[T, K]``, else (key, index) candidates (key 0 / −1 fill) and the next row length."""

    def __init__(self, chunk: int, from_logits: bool, final: bool, pdl: bool):
        self.threads, self.per_thread = chunk_threads(chunk)
        self.chunk = chunk  # positions per chunk (the plan's); the CTA holds threads·per_thread >= chunk
        self.warps = self.threads // WARP
        self.from_logits = from_logits
        self.final = final
        self.pdl = pdl
        self.level = (chunk, self.per_thread, from_logits)  # what _finish / _select take

    @cute.jit
    def __call__(
        self,
        mSrc: cute.Tensor,  # fp32 logits [T, >= L] or int32 candidate keys [T, W]
        mSrcIdx: Optional[cute.Tensor],  # int32 candidate indices [T, W] (not from_logits)
        mN: Optional[cute.Tensor],  # int32 [T] row lengths (not from_logits)
        mPos: Optional[cute.Tensor],  # int32/int64 [T] (from_logits)
        mReq: Optional[cute.Tensor],  # int32/int64 [T] (from_logits)
        mOutKey: Optional[cute.Tensor],  # int32 [T, S·K] (not final)
        mOutIdx: cute.Tensor,  # int32 [T, S·K] (final: [T, K])
        mNOut: Optional[cute.Tensor],  # int32 [T] (not final)
        mFinal: Optional[cute.Tensor],  # int32 [T, K]: the selection's result (not final)
        n_req: Int32,
        ratio: Int32,
        L: Int32,
        K: Int32,
        chunks: Int32,
        stream,
    ):
        self.kernel(mSrc, mSrcIdx, mN, mPos, mReq, mOutKey, mOutIdx, mNOut, mFinal, n_req, ratio, L, K).launch(
            grid=[mOutIdx.shape[0], chunks, 1],
            block=[self.threads, 1, 1],
            stream=stream,
            use_pdl=self.pdl,
        )

    @cute.kernel
    def kernel(
        self,
        mSrc: cute.Tensor,
        mSrcIdx: Optional[cute.Tensor],
        mN: Optional[cute.Tensor],
        mPos: Optional[cute.Tensor],
        mReq: Optional[cute.Tensor],
        mOutKey: Optional[cute.Tensor],
        mOutIdx: cute.Tensor,
        mNOut: Optional[cute.Tensor],
        mFinal: Optional[cute.Tensor],
        n_req: Int32,
        ratio: Int32,
        L: Int32,
        K: Int32,
    ):
        tid, _, _ = cute.arch.thread_idx()
        t, c, _ = cute.arch.block_idx()
        warp = tid // WARP
        lane = tid % WARP
        # ---- the row's length. From the logits, out of positions and requests read before the grid-
        # dependency wait (their latency then hides under the previous kernel's tail): with PDL this
        # kernel starts once the previous kernel, the op's logits kernel, is past its own wait (every
        # kernel here waits before it lets dependents launch), so every kernel before that one has
        # completed, and that one does not write them ----
        if const_expr(self.from_logits):
            n = _row_length(mPos, mReq, t, n_req, ratio, L)
        if const_expr(self.pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
        if const_expr(not self.from_logits):
            n = mN[t]  # the previous round's
        start = c * self.chunk

        hist, wsum, res, rng = _alloc_smem()

        if const_expr(self.final):  # one chunk per row
            self._finish(mSrc, mSrcIdx, mOutIdx, hist, wsum, res, rng, t, n, K, tid, warp, lane, *self.level)
        else:
            # a row that fits in chunk 0 (n < 0: an earlier round finished it) is finished by that chunk's
            # CTA, into the result; later rounds skip it (n = −1), so a short row in a wide table costs
            # what it costs in a narrow one
            fits = n <= self.chunk
            if c == 0:
                if tid == 0:
                    mNOut[t] = cutlass.select_(fits, Int32(-1), (n + (self.chunk - 1)) // self.chunk * K)
            if fits:
                if c == 0:
                    self._finish(mSrc, mSrcIdx, mFinal, hist, wsum, res, rng, t, n, K, tid, warp, lane, *self.level)
            else:
                if start < n:
                    self._select(mSrc, mSrcIdx, mOutKey, mOutIdx, hist, wsum, res, rng, t, start, n,
                                 c * K, K, tid, warp, lane, False, *self.level)

    @cute.jit
    def _finish(self, mSrc, mSrcIdx, mOut, hist, wsum, res, rng, t, n, K, tid, warp, lane, chunk: int, E: int,
                from_logits: bool):
        """The result row ``t`` of ``mOut [T, K]`` from the row's ``n`` entries, all in chunk 0
        (``n < 0``: nothing, an earlier round wrote it)."""
        if n >= 0:
            if n <= K:  # the whole row: 0 .. n−1 (logits, none read) or the candidates, −1 after
                for j in cutlass.range(tid, K, self.threads):
                    v = Int32(-1)
                    if j < n:
                        if const_expr(from_logits):
                            v = j
                        else:
                            if mSrc[t, j] != 0:
                                v = mSrcIdx[t, j]
                    mOut[t, j] = v
            else:
                self._select(mSrc, mSrcIdx, None, mOut, hist, wsum, res, rng, t, Int32(0), n, Int32(0), K,
                             tid, warp, lane, True, chunk, E, from_logits)

    @cute.jit
    def _load_one(self, src, src_idx, keys, idx, j, pos, end, from_logits: bool):
        """Slot ``j`` from row position ``pos`` if it is below ``end``."""
        if pos < end:
            if const_expr(from_logits):
                keys[j] = _sort_key(Float32(src[pos]))
            else:
                keys[j] = Uint32(src[pos])
                idx[j] = src_idx[pos]

    @cute.jit
    def _select(self, mSrc, mSrcIdx, mOutKey, mOutIdx, hist, wsum, res, rng, t, start, n, out_base, K,
                tid, warp, lane, final: bool, chunk: int, E: int, from_logits: bool, cl: int = 0, rank=None,
                ext=None, tot=None):
        """Keep the best ``K`` of the row's entries ``start ..`` (at most a chunk, ``n`` in all):
        indices into ``mOutIdx[t, out_base ..]`` (``final``, −1 fill), else (key, index) candidates
        (key 0 / index −1 fill). ``cl`` > 0 (``TopkClusterKernel``): this CTA is rank ``rank`` of a
        cluster of ``cl`` holding the row's chunks in order, and keeps its part of the row's best ``K``
        (the key range, every pass's histogram and the kept counts before it summed over the cluster
        in distributed shared memory: ``ext`` / ``tot`` are the CTA's buffers the others read); it
        ends with its cluster arrival, the kernel waits before it exits."""
        NT = self.threads
        NW = self.warps
        # ---- keys (and candidate indices) in registers: thread i holds the E consecutive positions
        # first = start + i·E .. (a blocked arrangement: the kept entries' output positions then come
        # from one prefix sum over per-thread counts, not per-slot ballots) ----
        end = cutlass.min(n, start + chunk)
        first = start + tid * E
        live = end - start
        wlive = warp * (WARP * E) < live  # the warp holds a live position (warp-uniform)
        keys = cute.make_rmem_tensor((E,), Uint32)
        idx = cute.make_rmem_tensor((E,), Int32)
        src = mSrc[t, None]  # the row: one base address, 32-bit offsets
        src_idx = None
        if const_expr(not from_logits):
            src_idx = mSrcIdx[t, None]
        for j in cutlass.range_constexpr(E):
            keys[j] = Uint32(0)
            idx[j] = first + j
        if wlive:
            # V-wide loads (8 or 16 bytes) where the row is so aligned (the op's rows are; every
            # thread's first position is a multiple of V), element loads in a row's last partial group:
            # a warp's lanes read 4·E bytes apart, so one load per element would cost L1 E times the
            # requests of a coalesced one (16 keys per thread: 1.7 µs more per 16,384 entries, H200)
            V = min(E, 4)
            if const_expr(V == 1):
                for j in cutlass.range_constexpr(E):
                    self._load_one(src, src_idx, keys, idx, j, first + j, end, from_logits)
            else:
                src_at = src.iterator.toint() + Int64(first) * 4
                idx_at = Int64(0)
                vec = (src_at & Int64(4 * V - 1)) == Int64(0)
                if const_expr(not from_logits):
                    idx_at = src_idx.iterator.toint() + Int64(first) * 4
                    vec = vec & ((idx_at & Int64(4 * V - 1)) == Int64(0))
                for g in cutlass.range_constexpr(E // V):
                    if vec & (first + V * g + V <= end):
                        if const_expr(from_logits):
                            xs = ld("global", src_at + Int64(4 * V * g), Float32, V)
                            for i in cutlass.range_constexpr(V):
                                keys[V * g + i] = _sort_key(xs[i])
                        else:
                            ks = ld("global", src_at + Int64(4 * V * g), Uint32, V)
                            ix = ld("global", idx_at + Int64(4 * V * g), Int32, V)
                            for i in cutlass.range_constexpr(V):
                                keys[V * g + i] = ks[i]
                                idx[V * g + i] = ix[i]
                    else:
                        for i in cutlass.range_constexpr(V):
                            self._load_one(src, src_idx, keys, idx, V * g + i, first + V * g + i, end,
                                            from_logits)

        # ---- the chunk's key range: every valid key shares the bits above the highest bit where the
        # largest and the smallest differ, so the first pass counts the 8 bits just below that common
        # prefix (a fixed top byte puts logits of one magnitude into one or two bins, and their shared
        # atomics serialize); at most four passes still reach bit 0 ----
        kmax = Uint32(0)
        kmin = Uint32(_FULL)
        for j in cutlass.range_constexpr(E):
            if keys[j] != Uint32(0):
                kmax = Uint32(cutlass.select_(keys[j] > kmax, keys[j], kmax))
                kmin = Uint32(cutlass.select_(keys[j] < kmin, keys[j], kmin))
        kmax = cute.arch.warp_redux_sync(kmax, "umax")
        kmin = cute.arch.warp_redux_sync(kmin, "umin")
        if lane == 0:
            rng[warp] = kmax
            rng[WARP + warp] = kmin
        # pass p counts into buffer p % 2 (plain shared atomics: the hardware serializes a warp's
        # lanes that hit one bin; per-lane copies of the bins or match.any groups measured slower);
        # its scan zeroes the other buffer for the next pass
        for b in cutlass.range(tid, BINS, NT):
            hist[b] = Int32(0)
        cute.arch.sync_threads()
        # every warp reduces the per-warp extremes itself (no second barrier)
        wmax = Uint32(0)
        wmin = Uint32(_FULL)
        if lane < NW:
            wmax = rng[lane]
            wmin = rng[WARP + lane]
        kmax = cute.arch.warp_redux_sync(wmax, "umax")
        kmin = cute.arch.warp_redux_sync(wmin, "umin")
        if const_expr(cl > 0):  # the row's range: every CTA's, read from their shared memory
            kmax, kmin = _cluster_range(kmax, kmin, ext, tid, lane, cl)
        varying = Int32(32) - Int32(cute.arch.clz(kmax ^ kmin))  # low bits that differ: 0..32
        shift = cutlass.max(varying - 8, Int32(0))
        thr = Uint32(0)  # the common prefix above the first digit (nothing valid: kmax = 0)
        if shift + 8 < 32:
            thr = (kmax >> Uint32(shift + 8)) << Uint32(shift + 8)
        prev = Int32(32)  # bits at and above prev are fixed in thr
        need = K
        total = Int32(0)
        done = Boolean(False)
        exact = Boolean(False)
        for p in cutlass.range_constexpr(4):
            cur = (p % 2) * BINS
            nxt = ((p + 1) % 2) * BINS
            if not done:
                if wlive:
                    for j in cutlass.range_constexpr(E):
                        k = keys[j]
                        part = k != Uint32(0)
                        if const_expr(p > 0):
                            part = part & ((k >> Uint32(prev)) == (thr >> Uint32(prev)))
                        if part:
                            digit = Int32((k >> Uint32(shift)) & Uint32(BINS - 1))
                            cute.arch.atomic_add(hist.iterator + cur + digit, Int32(1), scope="cta")
                if const_expr(cl > 0):  # the row's histogram: each bin summed over the cluster into tot
                    _cluster_hist(hist, tot, cur, tid, cl)
                cute.arch.sync_threads()
                if warp == 0:
                    h = cute.make_rmem_tensor((BINS // WARP,), Int32)
                    s = Int32(0)
                    for i in cutlass.range_constexpr(BINS // WARP):
                        if const_expr(cl > 0):
                            h[i] = tot[lane * (BINS // WARP) + i]
                        else:
                            h[i] = hist[cur + lane * (BINS // WARP) + i]
                        s += h[i]
                        hist[nxt + lane * (BINS // WARP) + i] = Int32(0)
                    suffix = s  # inclusive suffix sum over lanes >= lane
                    for off in cutlass.range_constexpr(5):
                        other = cute.arch.shuffle_sync_down(suffix, 1 << off)
                        if lane + (1 << off) < WARP:
                            suffix += other
                    if const_expr(p == 0):
                        if lane == 0:
                            res[3] = suffix
                    run = suffix - s
                    for i in cutlass.range_constexpr(BINS // WARP - 1, -1, -1):
                        nrun = run + h[i]
                        if (run < need) & (nrun >= need):
                            res[0] = lane * (BINS // WARP) + i
                            res[1] = run
                            res[2] = h[i]
                        run = nrun
                cute.arch.sync_threads()
                if const_expr(p == 0):
                    total = res[3]
                if total <= K:  # the whole chunk (only pass 0 can see this): every valid key is kept
                    done = Boolean(True)
                else:
                    # a last digit clamped at bit 0 overlaps bits thr already holds: the counted keys
                    # share them, so the OR leaves them as they are
                    thr = thr | (Uint32(res[0]) << Uint32(shift))
                    need = need - res[1]
                    if res[2] == need:  # every entry of the bin is kept: thr's lower bits stay 0
                        done = Boolean(True)
                    else:
                        if shift == 0:
                            exact = Boolean(True)
                            done = Boolean(True)
                        else:
                            prev = shift
                            shift = cutlass.max(shift - 8, Int32(0))
                # no barrier needed before the next pass: its scan rewrites res only after the barrier
                # that follows its counting, which every thread reaches after reading res here
        kept = cutlass.min(total, K)

        # ---- the kept entries: every key above ``lo`` and, with an exact threshold, the first ``need``
        # keys equal to it in position order. Exact: lo = thr. Otherwise (the passes stopped early:
        # thr's lower bits are 0; or the chunk holds at most k valid keys: thr is their common prefix,
        # at most every one of them) every valid key at or above thr: lo = thr − 1, or 0 for thr = 0
        # (key 0 is an absent slot). One compare per key; the ties only where the threshold is exact.
        # Each thread counts its kept entries (ties in the upper 16 bits; at most 16,384 each), one
        # block-wide exclusive prefix sum over the threads places them, and each thread writes its own
        # in position order ----
        lo = Uint32(thr)
        if not exact:
            lo = Uint32(cutlass.select_(thr == Uint32(0), Uint32(0), thr - Uint32(1)))
        cnt = Int32(0)
        if exact:
            for j in cutlass.range_constexpr(E):
                cnt += Int32(keys[j] > lo) + (Int32(keys[j] == thr) << 16)
        else:
            for j in cutlass.range_constexpr(E):
                cnt += Int32(keys[j] > lo)
        incl = _warp_inclusive_sum(cnt, lane)
        if lane == WARP - 1:
            wsum[warp] = incl
        cute.arch.sync_threads()
        # every warp scans the warp totals itself (no second barrier) and takes its own warp's offset
        w = Int32(0)
        if lane < NW:
            w = wsum[lane]
        before = incl - cnt + cute.arch.shuffle_sync(_warp_inclusive_sum(w, lane) - w, warp)
        above_pre = Int32(0)  # kept entries above the threshold / ties in the cluster's earlier CTAs
        ties_pre = Int32(0)
        if const_expr(cl > 0):
            above_pre, ties_pre = _cluster_before(cute.arch.warp_redux_sync(w, "add"), ext, rank, tid, lane)

        out_idx = mOutIdx[t, None]
        out_key = None
        if const_expr(not final):
            out_key = mOutKey[t, None]
        if wlive:
            at = out_base + above_pre + (before & 0xFFFF)
            if exact:  # an entry above goes after the kept ties before it; a tie is kept while < need came before
                t_before = ties_pre + (before >> 16)
                for j in cutlass.range_constexpr(E):
                    k = keys[j]
                    above = k > lo
                    tie = k == thr
                    if above | (tie & (t_before < need)):
                        at_j = at + cutlass.min(t_before, need)
                        out_idx[at_j] = idx[j]
                        if const_expr(not final):
                            out_key[at_j] = Int32(k)
                    at += Int32(above)
                    t_before += Int32(tie)
            else:
                for j in cutlass.range_constexpr(E):
                    k = keys[j]
                    if k > lo:
                        out_idx[at] = idx[j]
                        if const_expr(not final):
                            out_key[at] = Int32(k)
                        at += 1
        # fewer valid keys than K: fill (not in a cluster: it selects only rows of more than K entries, and
        # a logit's key is never 0, so the row's K are all kept)
        if const_expr(cl == 0):
            for j in cutlass.range(kept + tid, K, NT):
                out_idx[out_base + j] = Int32(-1)
                if const_expr(not final):
                    out_key[out_base + j] = Int32(0)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(chunk: int, from_logits: bool, final: bool, pos_dtype, req_dtype, pdl: bool, arch: str,
                extra_options: str = ""):
        """Compile one round variant over fake tensors (no GPU needed): tokens, row widths and
        strides are symbolic."""
        tokens = cute.sym_int()
        mk = cute.runtime.make_fake_tensor
        src_w = cute.sym_int()
        out_w = cute.sym_int()
        src = mk(Float32 if from_logits else Int32, (tokens, src_w), stride=(cute.sym_int64(), 1), assumed_align=4)
        src_idx = None if from_logits else mk(Int32, (tokens, src_w), stride=(cute.sym_int64(), 1), assumed_align=4)
        n = None if from_logits else mk(Int32, (tokens,), stride=(1,), assumed_align=4)
        pos = mk(pos_dtype, (tokens,), stride=(1,), assumed_align=pos_dtype.width // 8) if from_logits else None
        req = mk(req_dtype, (tokens,), stride=(1,), assumed_align=req_dtype.width // 8) if from_logits else None
        out_key = None if final else mk(Int32, (tokens, out_w), stride=(cute.sym_int64(), 1), assumed_align=4)
        out_idx = mk(Int32, (tokens, out_w), stride=(cute.sym_int64(), 1), assumed_align=4)
        n_out = None if final else mk(Int32, (tokens,), stride=(1,), assumed_align=4)
        result = None if final else mk(Int32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
        kernel = TopkRoundKernel(chunk, from_logits, final, pdl)
        return cute.compile(
            kernel, src, src_idx, n, pos, req, out_key, out_idx, n_out, result,
            Int32(0), Int32(1), Int32(0), Int32(1), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


class TopkFusedKernel(TopkRoundKernel):
    """Every round of a split selection in one kernel: the rounds of ``plan`` as levels, merged by
    the last CTA to finish instead of by the next launch.

    Grid ``[T, P]``, ``P`` at most the first round's chunks ``S0``: CTA ``c`` takes the row's live
    chunks ``c, c + P, ..`` (``select_into`` takes ``P = SMs / T``, at least 1: one wave of its
    1,024-thread CTAs, one an SM, wherever ``T <= SMs``; chunks past a short row of a wide table then
    cost no CTA). For each chunk the CTA selects its logits into level-0
    candidates, then arrives at its group's ticket counter (``groups[0]`` chunks per group; a
    barrier, then thread 0's GPU-scope release fence and atomic increment: CUTLASS's semaphore
    pattern). The CTA that brings the count to the group's live chunks resets the counter to 0 (zero
    at rest, for the next selection) and, after an acquire fence and a barrier, selects from the
    group's candidates: into the next level's, or into the result when its group is the row's only
    one. The others go on to their next chunk. A row's merge thus starts when its own chunks are done,
    not when every row's are, and rows that fit in chunk 0 are finished by CTA 0 with no later work at
    all (a short row in a wide table). Same candidates, same order, same bits as the separate rounds."""

    def __init__(self, chunks: tuple, groups: tuple, pdl: bool):
        assert len(chunks) == len(groups) + 1 and 2 <= len(chunks) <= 1 + MAX_MERGES
        self.threads = max(chunk_threads(c)[0] for c in chunks)
        self.warps = self.threads // WARP
        # (chunk, keys per thread, from the logits) of each level, as _finish / _select take them
        self.levels = [(c, max(1, c // self.threads), lv == 0) for lv, c in enumerate(chunks)]
        self.groups = groups
        self.pdl = pdl

    @cute.jit
    def __call__(
        self,
        mSrc: cute.Tensor,  # fp32 logits [T, >= L]
        mPos: cute.Tensor,  # int32/int64 [T]
        mReq: cute.Tensor,  # int32/int64 [T]
        mKey0: cute.Tensor,  # int32 [T, S_l·K]: level l's candidates (keys, indices), l < levels − 1
        mIdx0: cute.Tensor,
        mKey1: Optional[cute.Tensor],
        mIdx1: Optional[cute.Tensor],
        mKey2: Optional[cute.Tensor],
        mIdx2: Optional[cute.Tensor],
        mCnt: cute.Tensor,  # int32 [T, levels − 1, groups]: ticket counters, zero at rest
        mOut: cute.Tensor,  # int32 [T, K]
        n_req: Int32,
        ratio: Int32,
        L: Int32,
        K: Int32,
        ctas: Int32,  # P: CTAs a row
        stream,
    ):
        self.kernel(mSrc, mPos, mReq, mKey0, mIdx0, mKey1, mIdx1, mKey2, mIdx2, mCnt, mOut, n_req, ratio, L,
                    K).launch(grid=[mOut.shape[0], ctas, 1], block=[self.threads, 1, 1], stream=stream,
                              use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mSrc: cute.Tensor, mPos: cute.Tensor, mReq: cute.Tensor, mKey0: cute.Tensor,
               mIdx0: cute.Tensor, mKey1: Optional[cute.Tensor], mIdx1: Optional[cute.Tensor],
               mKey2: Optional[cute.Tensor], mIdx2: Optional[cute.Tensor], mCnt: cute.Tensor,
               mOut: cute.Tensor, n_req: Int32, ratio: Int32, L: Int32, K: Int32):
        tid, _, _ = cute.arch.thread_idx()
        t, c0, _ = cute.arch.block_idx()
        _, P, _ = cute.arch.grid_dim()
        warp = tid // WARP
        lane = tid % WARP
        n = _row_length_then_wait(mPos, mReq, t, n_req, ratio, L, self.pdl)

        hist, wsum, res, rng = _alloc_smem()

        bufs = ((mKey0, mIdx0), (mKey1, mIdx1), (mKey2, mIdx2))
        ch0 = self.levels[0][0]
        if n <= ch0:  # the whole row in chunk 0: its CTA writes the result
            if c0 == 0:
                self._finish(mSrc, None, mOut, hist, wsum, res, rng, t, n, K, tid, warp, lane, *self.levels[0])
        else:
            # the row's live chunks c0, c0 + P, .. (none past the row: a short row in a wide table costs no
            # CTA beyond the grid's P), each selected, then arriving at its group's ticket
            n_chunks = (n + (ch0 - 1)) // ch0
            for c in cutlass.range(c0, n_chunks, P, unroll=1):
                start = c * ch0
                self._select(mSrc, None, mKey0, mIdx0, hist, wsum, res, rng, t, start, n, c * K, K, tid, warp,
                             lane, False, *self.levels[0])
                live = n_chunks  # this level's CTAs (chunks or groups) of the row
                g = c  # this chunk's place among them
                active = Boolean(True)
                for lv in cutlass.range_constexpr(len(self.groups)):
                    G = self.groups[lv]
                    src_key, src_idx = bufs[lv]
                    if active:
                        grp = g // G
                        arrivals = cutlass.min(Int32(G), live - grp * G)
                        last = self._arrive(mCnt, t, lv, grp, arrivals, tid, res)
                        active = last
                        if last:
                            live = (live + (G - 1)) // G
                            lo = grp * (G * K)
                            hi = lo + arrivals * K
                            if const_expr(lv == len(self.groups) - 1):
                                live = Int32(1)  # the plan's last level: one group
                            if live == 1:  # the row's only group: into the result
                                self._select(src_key, src_idx, None, mOut, hist, wsum, res, rng, t, lo, hi,
                                             Int32(0), K, tid, warp, lane, True, *self.levels[lv + 1])
                                active = Boolean(False)
                            else:
                                if const_expr(lv < len(self.groups) - 1):
                                    dst_key, dst_idx = bufs[lv + 1]
                                    self._select(src_key, src_idx, dst_key, dst_idx, hist, wsum, res, rng, t,
                                                 lo, hi, grp * K, K, tid, warp, lane, False, *self.levels[lv + 1])
                                    g = grp

    @cute.jit
    def _arrive(self, mCnt, t, lv: int, grp, arrivals, tid, res):
        """True in the CTA whose arrival completes group ``grp`` of level ``lv`` (``arrivals`` CTAs):
        it resets the counter and sees every arrival's candidates. Ends with a barrier."""
        cute.arch.sync_threads()  # every thread's candidate stores are issued before thread 0 releases them
        if tid == 0:
            cute.arch.fence_acq_rel_gpu()
            old = cute.arch.atomic_add(mCnt[t, lv, None].iterator + grp, Int32(1), sem="relaxed", scope="gpu")
            last = Int32(0)
            if old == arrivals - 1:
                cute.arch.fence_acq_rel_gpu()
                mCnt[t, lv, grp] = Int32(0)
                last = Int32(1)
            res[4] = last
        cute.arch.sync_threads()
        return res[4] != Int32(0)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(chunks: tuple, groups: tuple, pos_dtype, req_dtype, pdl: bool, arch: str, extra_options: str = ""):
        """Compile one plan's kernel over fake tensors (no GPU needed): tokens, widths and strides
        symbolic."""
        tokens = cute.sym_int()
        mk = cute.runtime.make_fake_tensor
        src = mk(Float32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
        pos = mk(pos_dtype, (tokens,), stride=(1,), assumed_align=pos_dtype.width // 8)
        req = mk(req_dtype, (tokens,), stride=(1,), assumed_align=req_dtype.width // 8)
        bufs = []
        for lv in range(MAX_MERGES):
            for _ in range(2):
                bufs.append(mk(Int32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
                            if lv < len(groups) else None)
        cnt = mk(Int32, (tokens, len(groups), cute.sym_int()), stride=(cute.sym_int64(), cute.sym_int64(), 1),
                 assumed_align=4)
        out = mk(Int32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
        kernel = TopkFusedKernel(chunks, groups, pdl)
        return cute.compile(
            kernel, src, pos, req, *bufs, cnt, out, Int32(0), Int32(1), Int32(0), Int32(1), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


class TopkClusterKernel(TopkRoundKernel):
    """A row's selection in one round by a thread-block cluster: grid ``[cl, T]``, cluster ``[cl]``,
    CTA ``r`` of row ``t`` holding the row's positions ``r·chunk ..`` in registers as a one-chunk
    round does. Each radix pass counts into the CTA's own shared-memory histogram; after a cluster
    barrier every CTA sums each bin over the cluster's CTAs (distributed shared memory) and takes the
    same decisions from the row's histogram, so the threshold is the row's, found in one launch with
    no candidates written or re-read. The key range before the first pass and the kept counts before
    the output are summed the same way; each CTA writes its kept entries at their place in the row's
    index order (a row of more than ``K`` entries fills all ``K`` slots). A row of at most ``K``
    entries (nothing to select) is written by the first CTA alone. Same bits as the rounds."""

    def __init__(self, chunk: int, cl: int, pdl: bool):
        super().__init__(chunk, True, True, pdl)
        assert 2 <= cl <= MAX_CLUSTER_CTAS and self.threads >= BINS, "cluster_plan checks the sizes"
        self.cl = cl

    @cute.jit
    def __call__(self, mSrc: cute.Tensor, mPos: cute.Tensor, mReq: cute.Tensor, mOut: cute.Tensor, n_req: Int32,
                 ratio: Int32, L: Int32, K: Int32, stream):
        self.kernel(mSrc, mPos, mReq, mOut, n_req, ratio, L, K).launch(
            grid=[self.cl, mOut.shape[0], 1], block=[self.threads, 1, 1], cluster=[self.cl, 1, 1], stream=stream,
            use_pdl=self.pdl)

    @cute.kernel
    def kernel(self, mSrc: cute.Tensor, mPos: cute.Tensor, mReq: cute.Tensor, mOut: cute.Tensor, n_req: Int32,
               ratio: Int32, L: Int32, K: Int32):
        tid, _, _ = cute.arch.thread_idx()
        rank, t, _ = cute.arch.block_idx()
        warp = tid // WARP
        lane = tid % WARP
        n = _row_length_then_wait(mPos, mReq, t, n_req, ratio, L, self.pdl)
        hist, wsum, res, rng, ext, tot = _alloc_smem(True)
        if n <= K:  # the whole row (uniform over the cluster: no barrier, no remote load)
            if rank == 0:
                self._finish(mSrc, None, mOut, hist, wsum, res, rng, t, n, K, tid, warp, lane, *self.level)
        else:
            self._select(mSrc, None, None, mOut, hist, wsum, res, rng, t, rank * self.chunk, n, Int32(0), K,
                         tid, warp, lane, True, *self.level, self.cl, rank, ext, tot)
            cute.arch.cluster_wait()  # every CTA's remote loads done: its shared memory may go

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(chunk: int, cl: int, pos_dtype, req_dtype, pdl: bool, arch: str, extra_options: str = ""):
        """Compile one (chunk, cluster size) variant over fake tensors (no GPU needed): tokens, row
        widths and strides symbolic."""
        tokens = cute.sym_int()
        mk = cute.runtime.make_fake_tensor
        src = mk(Float32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
        pos = mk(pos_dtype, (tokens,), stride=(1,), assumed_align=pos_dtype.width // 8)
        req = mk(req_dtype, (tokens,), stride=(1,), assumed_align=req_dtype.width // 8)
        out = mk(Int32, (tokens, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=4)
        kernel = TopkClusterKernel(chunk, cl, pdl)
        return cute.compile(
            kernel, src, pos, req, out, Int32(0), Int32(1), Int32(0), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


def plan(T: int, L: int, k: int, sms: int, chunk: int | None = None, max_chunk: int = MAX_CHUNK
         ) -> list[tuple[int, int]]:
    """The rounds of ``select_into``: ``kernels.triton.topk.plan``'s (shapes only), with a row split
    only while ``8·T <= sms`` (one 16,384-entry row took 12.2 µs in one CTA, 10.3 µs as four
    4,096-entry chunks + a round over their 2,048 candidates; 64 rows 13.6 µs unsplit, 16.2 µs split),
    and rows of more than 65,536 entries, when split for want of rows, cut into first-round chunks of
    4,096 entries and later ones of at most 8,192 instead of ``sqrt(L·k)``. H200, selection alone, a
    262,144-entry table: a full row 17.2 → 14.1 µs, an 8k-token context 8.5 → 6.8 µs; 65,536-entry
    rows keep 8,192-entry chunks (16.0 µs against 17.9 for B = 16). Where 4,096-entry chunks would
    make more than two first-round CTAs per SM, the first round takes 8,192-entry chunks (later rounds
    as the Triton plan): H200, fused, a 262,144-entry table, B = 8 / 16, logits + selection, 4,096 →
    8,192: an 8k-token context 8.0 / 10.9-11.4 → 7.7-7.9 / 8.7-9.0 µs, full rows at B = 8 112 → 102 µs
    (B = 4 stays at 4,096: 6.4-6.9 against 7.6 µs)."""
    max_chunk = min(max_chunk, MAX_CHUNK)
    split_sms = max(1, sms // 4)  # the Triton plan splits a row while 2·T < this
    if chunk is None and 2 * T < split_sms and L > 65536 and 2 * k <= 8192:
        if T * cdiv(L, 4096) <= 2 * sms:
            return _ttopk.plan(T, L, k, split_sms, 4096, min(max_chunk, 8192))
        return _ttopk.plan(T, L, k, split_sms, 8192, max_chunk)
    return _ttopk.plan(T, L, k, split_sms, chunk, max_chunk)


# ``select_into`` fuses the rounds of wider tables by default. H200, B = 1, selection alone / after the
# logits kernel, µs, rounds → fused: an 8k-token context in a 262,144-entry table 6.3 / 8.2 → 4.5 / 6.6-6.9
# (the merge no longer waits for the empty chunks' CTAs and kernels); a full 262,144-entry row 11.9 / 24.0
# → 12.5 / 24.8; a full 16,384-entry row 7.7 / 10.2 → 7.9 / 10.6.
FUSED_FROM = 65536


def fused_plan(rounds: list, topk: int) -> Optional[tuple]:
    """``(chunks, groups)`` of ``TopkFusedKernel`` for ``plan``'s ``rounds``: level ``l + 1`` merges
    ``groups[l] = chunk[l + 1] / topk`` CTAs' candidates, so its groups are the plan's next-round CTAs.
    ``None`` for one round, more than ``MAX_MERGES + 1`` or a ``topk`` that is not a power of two
    (a chunk would then split a CTA's candidates)."""
    if len(rounds) < 2 or len(rounds) > MAX_MERGES + 1 or topk & (topk - 1):
        return None
    chunks = tuple(c for c, _ in rounds)
    return chunks, tuple(c // topk for c in chunks[1:])


# The default of a cluster a row (``cluster_plan``): CTAs of up to CLUSTER_CHUNK entries, at most
# CLUSTER_CTAS of them a row and CLUSTER_ROWS rows. H200, graph replay, ``indexer_topk`` / the selection
# alone, µs, the rounds → a cluster of 4 / 8 / 16 CTAs (4,096 / 2,048 / 1,024 entries each), 64k context
# (16,384 entries), FP8: B = 1 9.35-9.42 / 7.06-7.18 → 8.95-9.12 / 6.70-7.14, 10.45-10.50 / 7.87-8.12,
# 15.4-15.7 / 12.4-12.9; B = 2 10.76-10.78 / 7.87 → 10.75-10.81 / 7.62, 12.05-12.46 / 8.55, 16.7 / 13.2;
# B = 4 11.65-11.67 / 7.89-8.07 → 11.31-11.33 / 7.50-7.52, 12.7 / 8.5, 18.5-18.7 / 13.2; B = 8 14.35-14.37 /
# 8.06 → 15.68-15.71 / 7.79-7.81 (the op loses though the selection gains: 1,024-thread CTAs in
# clusters start later behind the logits kernel's tail); B = 16 19.65 / 8.35 → 21.46 / 8.15; MXFP4 B = 1
# 9.95-10.02 → 9.79-9.81, B = 8 15.74-15.76 → 16.23; 32k context in a 64k table B = 1 8.66-8.70 → 8.60-8.63;
# 256k context (65,536 entries, 16 CTAs of 4,096) B = 1 / 4 12.6 / 20.6 → 16.6 / 24.8 (every cluster barrier
# waits for 16 CTAs). Every pass costs a cluster barrier and remote loads, so more, smaller CTAs lose.
CLUSTER_CHUNK = 4096
CLUSTER_CTAS = 4
CLUSTER_ROWS = 4


def cluster_plan(T: int, L: int, rounds: list, device_index: int, cluster: int | None = None
                 ) -> Optional[tuple[int, int]]:
    """``(chunk, CTAs a row)`` of ``TopkClusterKernel`` for rows of ``L`` entries, or ``None`` (the
    rounds). ``cluster=None``: where ``rounds`` split a row (two rounds or more), ``T <= CLUSTER_ROWS``,
    ``ceil(L / CLUSTER_CHUNK)`` is 2 .. ``CLUSTER_CTAS`` (a 64k-token context: four CTAs of 4,096
    entries) and all the clusters are resident at once (``sparse_attn.cluster_capacity``).
    ``cluster=0``: ``None``; ``cluster=n``: ``n`` CTAs a row (a ``ValueError`` outside 2..16, where a
    CTA's chunk, ``L / n`` rounded up to a power of two, is outside 256..16,384, or for more than
    65,535 rows: the grid's y)."""
    if cluster == 0:
        return None
    if cluster is None:
        n = cdiv(L, CLUSTER_CHUNK)
        if len(rounds) < 2 or T > CLUSTER_ROWS or not 2 <= n <= CLUSTER_CTAS:
            return None
        from .sparse_attn import cluster_capacity

        if T > cluster_capacity(device_index, n):
            return None
    else:
        n = cluster
    chunk = 1 << max(0, cdiv(L, n) - 1).bit_length()
    if not 2 <= n <= MAX_CLUSTER_CTAS or not BINS <= chunk <= MAX_CHUNK or T > 65535:
        raise ValueError(f"topk: {T} rows of {L} entries over clusters of {n} CTAs ({chunk} entries each): "
                         f"2..{MAX_CLUSTER_CTAS} CTAs of {BINS}..{MAX_CHUNK} entries, at most 65,535 rows")
    return chunk, n


def select_into(out: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor, token_to_req: torch.Tensor,
                n_req: int, compress_ratio: int, topk: int, sms: int, chunk: int | None = None,
                max_chunk: int = MAX_CHUNK, pdl: bool = False, fused: bool | None = None,
                ctas: int | None = None, cluster: int | None = None) -> torch.Tensor:
    """``kernels.triton.topk.select_topk``'s result (the same bits) from the CuTe-DSL rounds of
    ``plan``, written into int32 ``out [T, topk]`` (``T > 0``; every round may write it). ``logits``:
    fp32 ``[T, L]``, ``positions`` / ``token_to_req``: ``[T]``, all with unit stride along their last
    dimension (``select_topk`` sees to it); only positions below each row's visible count are read.
    Requires ``2·topk <= max_chunk <= 16,384``. With ``pdl`` the first round reads ``positions`` and
    ``token_to_req`` before its grid-dependency wait: the stream's previous kernel must not write
    them and must wait for its own predecessors before it lets dependents launch (the op's logits
    kernels, every kernel of this package and any kernel launched without PDL qualify). A plan of
    several rounds runs as one ``TopkFusedKernel`` where ``fused`` and ``fused_plan`` allow (its
    ticket counters: ``kernels._device.zeroed_counters``), else as one kernel per round. ``fused=None``
    fuses tables wider than ``FUSED_FROM`` entries only; its CTAs a row: ``ctas`` (tests), by default
    as many as the first round's chunks and one wave of one CTA per SM allow. Before either, a row
    the plan splits runs in one ``TopkClusterKernel`` where ``cluster_plan`` allows (``cluster``: its
    CTAs a row, 0 for none, ``None`` for ``cluster_plan``'s default, which a given ``chunk``, ``fused``
    or ``ctas`` turns off)."""
    T, L = logits.shape
    rounds = plan(T, L, topk, sms, chunk, max_chunk)
    arch = arch_name(logits.device)
    if cluster is None and (chunk is not None or fused is not None or ctas is not None):
        cluster = 0  # a forced plan of rounds
    cp = cluster_plan(T, L, rounds, logits.device.index or 0, cluster)
    if cp is not None:
        compiled = TopkClusterKernel.compile(*cp, TORCH_TO_CUTE[positions.dtype], TORCH_TO_CUTE[token_to_req.dtype],
                                             pdl, arch)
        compiled(logits, positions, token_to_req, out, n_req, compress_ratio, L, topk)
        return out
    fp = fused_plan(rounds, topk) if (L > FUSED_FROM if fused is None else fused) else None
    if fp is not None:
        chunks, groups = fp
        width = cdiv(rounds[0][1], groups[0])  # groups at level 1, the most of any level
        cnt = _device.zeroed_counters(logits.device, "topk", T * len(groups) * width)
        bufs = []
        for lv in range(MAX_MERGES):
            if lv < len(groups):
                keys, idx, _ = _ttopk.round_buffers(T, rounds[lv][1], topk, logits.device)
                bufs += [keys, idx]
            else:
                bufs += [None, None]
        compiled = TopkFusedKernel.compile(chunks, groups, TORCH_TO_CUTE[positions.dtype],
                                           TORCH_TO_CUTE[token_to_req.dtype], pdl, arch)
        # CTAs a row: at most one per SM in all (the fused plans' first chunks of 4,096 entries or more make
        # CTAs of 1,024 threads of more than 32 registers: one an SM) where T <= SMs, each
        # looping over its row's live chunks, so the chunks past a short row cost no second wave of CTAs.
        # H200, selection alone, a 262,144-entry table, one CTA per chunk → this: 8k context B = 16 4.9-5.1
        # → 4.5-4.6 µs (B = 12 4.5 → 4.4, B = 8 4.6 → 4.7), full rows B = 16 / 8 / 4 34.8 / 23.1-23.3 / 21.1-21.2
        # → 32.6 / 22.3-22.4 / 20.9, B = 1 (64 chunks, no loop) unchanged
        ctas = max(1, min(rounds[0][1], sms // T if ctas is None else ctas))
        compiled(logits, positions, token_to_req, *bufs, cnt[:T * len(groups) * width].view(T, len(groups), width),
                 out, n_req, compress_ratio, L, topk, ctas)
        return out
    src, src_idx, n_buf = logits, None, None
    for r, (ch, s) in enumerate(rounds):
        final = r == len(rounds) - 1
        first = r == 0
        if final:
            keys, idx, n_next = None, out, None
        else:
            keys, idx, n_next = _ttopk.round_buffers(T, s, topk, logits.device)
        compiled = TopkRoundKernel.compile(ch, first, final, TORCH_TO_CUTE[positions.dtype],
                                           TORCH_TO_CUTE[token_to_req.dtype], pdl, arch)
        compiled(src, src_idx, n_buf, positions if first else None, token_to_req if first else None,
                 keys, idx, n_next, None if final else out, n_req, compress_ratio, L, topk, s)
        src, src_idx, n_buf = keys, idx, n_next
    return out

"""CuTe-DSL sparse MQA with the per-head sink over paged ``fp8_ds_mla`` caches (``dsv4::sparse_attn``), Hopper.

Same contract as ``kernels.triton.attention.sparse_attn`` (docs/numerics.md §8.2): for head ``h`` of
token ``t`` and its candidates ``j`` (the SWA slots, then the compressed slots; −1 and out-of-range
slots skipped), ``s_j = scale · q[t,h]·kv_j``, ``o = Σ_j e^(s_j−m) kv_j / (Σ_j e^(s_j−m) + e^(sink[h]−m))``,
keys = values = the decoded 512-d records.

Method (one CTA = one token × one block of 64 heads × one split of the candidates; 256 threads, two
warpgroups):

* the 64 query heads (bf16, 64 KB) sit in shared memory for the CTA's life, in the 128-byte swizzled
  K-major layout wgmma reads;
* candidates come in tiles of 64, decoded into one of two bf16 ``[64 candidates, 512]`` K tiles in
  shared memory (the 128-byte swizzled layout both multiplies read). Each record (576 token bytes and
  8 scale bytes) is loaded by four threads straight into registers, 16 bytes per load (nine chunks
  and the scale bytes each: 38 registers); invalid candidates are not read and hold zeros. While
  the multiplies of tile ``i`` run on the tensor cores, the same threads decode tile ``i + 1`` from
  their registers into the other K tile (e4m3 times its UE8M0 block scale, exact; rope dims as
  stored; 16-byte stores spread evenly over the swizzled banks) and load tile ``i + 2`` into the
  registers, in two parts (``PARTS``): the dims of scale word 0 during ``S = Q·Kᵀ``, the rest and the
  scale bytes during ``O += P·V``; the slots for those loads were read a tile earlier still (a
  predicated load, no branch), so no round trip to memory sits on a tile's critical path. Before
  this form (cp.async into two staging buffers, then a decode between the multiplies of consecutive
  tiles): H200, 64k, graph replay, V4-Flash CSA B = 2 / 32 / 64 12.8 / 25.4 / 36.0 → 12.4 / 24.8 /
  35.4 µs, one CTA over 640 candidates 46.8 → 39.2 µs, HCA B = 64 35.6 → 34.1, V4-Pro CSA B = 64
  87.7 → 86.4; prefill (T = 4096) 1481 → 1506 µs. The decode in two parts instead of all of it during
  ``Q·Kᵀ`` (same bits; eighteenth session): one CTA over 640 candidates 47.0 → 44.4 µs, V4-Flash CSA
  B = 32 / 64 24.6-25.3 / 29.6-31.2 → 24.4-24.5 / 29.2, V4-Pro CSA B = 32 / 64 43.3 / 86.7-87.2 →
  41.3-41.4 / 77.5-77.9, prefill 1488-1492 → 1414-1415 µs; B <= 16 (one or two tiles a CTA)
  unchanged. 255 registers; ptxas 13.0 spills 16 bytes in the split CSA variant, 24 in the split
  SWA-only one, 4-8 in the cluster-merged ones, none in the C128 one with int64 indices;
* ``S = Q·Kᵀ`` (``wgmma`` m64n32k16, both operands from shared memory): each warpgroup computes the
  scores of half of the tile's candidates; the row maxima of the two halves meet in shared memory,
  and each warpgroup writes its half of ``P`` (bf16) into one shared ``[64, 64]`` tile;
* ``O += P·V`` (``wgmma`` m64n256k16, both operands from shared memory): ``V`` is the same shared
  tile read N-major, each warpgroup owning 256 of the 512 value dims (``O`` is 128 fp32 registers per
  thread). Before this split each warpgroup computed all of ``S`` (P in registers): H200, 64k, graph
  replay, V4-Flash CSA B = 8 / 32 / 64 16.9 / 28.8 / 40.3 → 16.6 / 27.9 / 38.7 µs, V4-Pro B = 64
  100.0 → 92.8 µs, prefill T = 4096 1710 → 1579 µs.

Splits merge in one of three ways. Where every cluster fits the GPU at once and the grid has at least
``CLUSTER_MIN_CTAS`` CTAs (``cluster_merge``), the splits of a (token, head block) are one thread-block
cluster and merge in distributed shared memory (``_cluster_merge``: each CTA leaves its fp32
accumulator and ``(m, l)`` in its own shared memory, and after a cluster barrier merges an ``n``-th of
the output from all of them; no partials in global memory, no second kernel). Where such clusters do
not fit but clusters of a run of the splits do (``cluster_run``), each cluster merges its run the same
way into one fp32 partial for the combine kernel. Otherwise every split writes its fp32 partial
``(acc, m, l)`` in the layout of the Triton kernel's, merged by its combine kernels. An unsplit CTA
applies the sink and writes bf16. The merges use the same formula (the cluster merge sums in split
order, as the looping combine kernel does; the one-shot combine kernel of the smallest steps sums as
a tree), deterministic for a given split count and cluster size.
A split may also run as ``groups`` CTAs (``GROUPS``), each decoding the whole records and computing
the same scores but multiplying ``P·V`` for, and writing, only its ``512 / groups`` slice of the value
dims: a split's 128 KB fp32 partial then leaves from ``groups`` SMs instead of one (see ``_finish``),
or, in a cluster, each cluster holds one group's splits and merges that slice (``group_cluster``):
the op's default where a single wave of split CTAs leaves most SMs idle (``split_plan``,
``value_groups``). An unsplit CTA may run as groups too, each writing its
slice of the bf16 output: no partials, no combine kernel (the op's default for SWA-only rows of two
tiles from SMs / 8 rows while eight or four groups fit one wave: ``unsplit_groups``).

Where it stands (H200, 64k context, CSA = 128 SWA + 512 compressed candidates, graph replay, the
merge included, the op; to B = 8 the twenty-second session's, above it the twenty-first's, prefill the
twentieth's): V4-Flash B = 1 / 2 / 4 / 8 / 16 / 32 / 64 8.4 / 9.8 / 11.6 / 13.4 / 17.4 / 25.0 / 29.8 µs
(FlashMLA 12.4 / - / - / 15.1 / - / 25.0 / 44.5 in issue 14's measurement), V4-Pro 13.3 / 14.2 / 17.1 /
20.5 / 30.7 / 42.3 / 75.7 µs (B = 1 / 2 11.3 / 13.4 since, op against op), SWA-only V4-Flash B = 1 /
8 / 16 / 32 / 64 6.3 / 7.9 / 9.4 / 10.5 / 12.6 µs (8 since: 7.6); prefill (T = 4096) 248 TFLOPS.
Where a one-tile CTA's time goes (clock stamps, V4-Flash CSA B = 1, ten splits, SM cycles): the slots
and then the records of its first tile 4,600, Q·Kᵀ 1,800, P·V 1,100, the softmax 940, the partial's
128 KB written 4,800.
One CTA per SM still runs both multiplies and the softmax one after another, about 4.4 µs per
64-candidate tile for one CTA alone (44.4 µs over 640 candidates) and about 3 µs a tile with every SM
busy; removing one part at a time from the cp.async form (B = 64, 5 tiles per CTA,
36 µs) saved: the decode 6.0 µs, the gather 5.7, the softmax 3.9, P·V 3.7, Q·Kᵀ 2.2. Also tried and
slower: a warp-specialized form (a producer warpgroup decoding 32-candidate tiles into a
double-buffered K tile for two consumer warpgroups): 79 against 56 µs at B = 64 then, its Q·Kᵀ on
32-wide tiles costing more than the overlap saved; each warpgroup multiplying half the dims with the
partial scores exchanged through shared memory (spilled); the splits merged by the last CTA of each
(token, head block) instead of the combine kernel (tickets, a release and an acquiring wait): 36.2 →
42.1 µs at B = 64 with two splits, 15 → 51 µs at B = 8 with ten (one CTA reads every other split's
128 KB partial alone; the cluster merge spreads the same work over every CTA of the cluster:
``cluster_merge`` has its measurements).
"""

from __future__ import annotations

import functools
import warnings

import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float32, Int32, Int64, Uint8, Uint32, const_expr
from cutlass.cute.nvgpu import OperandMajorMode, warpgroup
from cutlass.tensor_utils.layout import LayoutEnum
from cutlass.utils import hopper_helpers as sm90

from ... import layouts
from ..triton import attention as _tattn
from ..triton._common import cdiv, sm_programs
from ..triton._launch import pdl_meta
from ._common import _capability, aligned, arch_name, fresh_copy
from ._math import TORCH_TO_CUTE
from ._smem import ld, st_f32, st_shared_v4, sw128_offset

D = layouts.KV_HEAD_DIM  # 512
NOPE = layouts.KV_NOPE_DIM  # 448
TOKEN_BYTES = layouts.FP8_DS_MLA_TOKEN_BYTES  # 576
SCALE_BYTES = layouts.FP8_DS_MLA_SCALE_BYTES  # 8
BH = 64  # heads per CTA (one wgmma row block)
BN = 64  # candidates per tile
SN = BN // 2  # candidates of a tile whose scores one warpgroup computes
THREADS = 256  # two warpgroups
WG = 128
DV = D // 2  # value dims per warpgroup
CHUNKS = TOKEN_BYTES // 16  # 36 16-byte chunks of token data per record, 9 per thread of its four
FP8_CHUNKS = NOPE // 16  # the first 28 hold e4m3 dims (16 each: a quarter of a 64-dim scale block)
REC_WORDS = CHUNKS + 2  # a thread's share of a record in registers: 9 chunks x 4 words, the 8 scale bytes
TILE_BYTES = BN * D * 2  # one bf16 [64, 512] K tile
NEG_BIG = _tattn._NEG_BIG.value  # "no candidate yet" running max: the Triton kernel's (its combine assumes it)
LOG2E = _tattn.LOG2E
_ROW = LayoutEnum.ROW_MAJOR  # K-major wgmma operands
_COL = LayoutEnum.COL_MAJOR  # MN-major


PARTS = ((0, 4), (4, CHUNKS // 4))  # a record's chunk groups decoded during Q·Kᵀ / during P·V (scale word 0 / 1)


def _cp_async16(smem_addr, gmem_addr):
    cute.arch.inline_ptx("cp.async.cg.shared.global [{$r0}], [{$r1}], 16;", read_only_args=[smem_addr, gmem_addr])


def _ld_slot(addr, pred, isz: int):
    """The ``isz``-byte (4 / 8) signed index at global ``addr`` as Int64, −1 where ``pred`` is false
    (not read). (Outputs are written last: the asm's outputs may share registers with its inputs.)"""
    if isz == 8:
        return cute.arch.inline_ptx(
            "{ .reg .pred p; .reg .s64 v; setp.ne.u32 p, {$r1}, 0; mov.b64 v, -1; @p ld.global.nc.s64 v, [{$r0}];"
            " mov.b64 {$w0}, v; }",
            write_only_types=[Int64], read_only_args=[addr, Uint32(pred)])
    return cute.arch.inline_ptx(
        "{ .reg .pred p; .reg .s32 v; setp.ne.u32 p, {$r1}, 0; mov.b32 v, -1; @p ld.global.nc.s32 v, [{$r0}];"
        " cvt.s64.s32 {$w0}, v; }",
        write_only_types=[Int64], read_only_args=[addr, Uint32(pred)])


def _ld_rec(addr, pred, words: int):
    """``words`` (2 / 4) 32-bit words of a cache record at global ``addr`` (read-only path, not kept
    in L1), zeros where ``pred`` is false (not read)."""
    regs = ", ".join(f"v{i}" for i in range(words))
    return cute.arch.inline_ptx(
        f"{{ .reg .pred p; .reg .b32 v<{words}>; setp.ne.u32 p, {{$r1}}, 0;"
        + "".join(f" mov.b32 v{i}, 0;" for i in range(words))
        + f" @p ld.global.nc.L1::no_allocate.v{words}.u32 {{{regs}}}, [{{$r0}}];"
        + "".join(f" mov.b32 {{$w{i}}}, v{i};" for i in range(words)) + " }",
        write_only_types=[Uint32] * words, read_only_args=[addr, Uint32(pred)])


def _st_bf16(space: str, addr, *vals):
    """Two or four fp32 ``vals`` rounded to bf16 and stored as one 32-bit word / 8 bytes (the first
    value lowest) at ``addr`` in state space ``space`` ("shared" / "global")."""
    words = len(vals) // 2
    regs = ", ".join(f"w{i}" for i in range(words))
    cvt = "".join(f" cvt.rn.bf16x2.f32 w{i}, {{$r{2 * i + 2}}}, {{$r{2 * i + 1}}};" for i in range(words))
    dst = "w0" if words == 1 else f"{{{regs}}}"
    cute.arch.inline_ptx(f"{{ .reg .b32 {regs};{cvt} st.{space}{'' if words == 1 else f'.v{words}'}.b32 [{{$r0}}],"
                         f" {dst}; }}", read_only_args=[addr, *vals])


def _e4m3x8_bf16(w0, w1, scale):
    """Eight e4m3 bytes (``w0`` bytes 0-3, then ``w1``) times the fp32 power of two ``scale``: four
    bf16x2 words, element 0 in the low half of the first (exact: e4m3 · 2^k has 4 significant bits)."""
    return cute.arch.inline_ptx(
        "{ .reg .b16 l0, h0, l1, h1, x<8>; .reg .b32 a, b, c, d; .reg .f32 f<8>;"
        " mov.b32 {l0, h0}, {$r0}; mov.b32 {l1, h1}, {$r1};"
        " cvt.rn.f16x2.e4m3x2 a, l0; cvt.rn.f16x2.e4m3x2 b, h0;"
        " cvt.rn.f16x2.e4m3x2 c, l1; cvt.rn.f16x2.e4m3x2 d, h1;"
        " mov.b32 {x0, x1}, a; mov.b32 {x2, x3}, b; mov.b32 {x4, x5}, c; mov.b32 {x6, x7}, d;"
        " cvt.f32.f16 f0, x0; cvt.f32.f16 f1, x1; cvt.f32.f16 f2, x2; cvt.f32.f16 f3, x3;"
        " cvt.f32.f16 f4, x4; cvt.f32.f16 f5, x5; cvt.f32.f16 f6, x6; cvt.f32.f16 f7, x7;"
        " mul.rn.f32 f0, f0, {$r2}; mul.rn.f32 f1, f1, {$r2}; mul.rn.f32 f2, f2, {$r2}; mul.rn.f32 f3, f3, {$r2};"
        " mul.rn.f32 f4, f4, {$r2}; mul.rn.f32 f5, f5, {$r2}; mul.rn.f32 f6, f6, {$r2}; mul.rn.f32 f7, f7, {$r2};"
        " cvt.rn.bf16x2.f32 {$w0}, f1, f0; cvt.rn.bf16x2.f32 {$w1}, f3, f2;"
        " cvt.rn.bf16x2.f32 {$w2}, f5, f4; cvt.rn.bf16x2.f32 {$w3}, f7, f6; }",
        write_only_types=[Uint32, Uint32, Uint32, Uint32],
        read_only_args=[w0, w1, scale],
    )


class SparseAttnKernel:
    """One launch configuration; see ``compile`` for the cache key."""

    def __init__(self, swa_bs: int, comp_bs: int, has_comp: bool, split: bool, pdl: bool, cluster: int = 0,
                 cluster_part: bool = False, groups: int = 1):
        self.swa_bs = swa_bs
        self.comp_bs = comp_bs
        self.has_comp = has_comp
        self.split = split
        self.pdl = pdl
        # > 0: each run of this many splits of a (token, head block) is one cluster, merged in it: into the
        # output where the cluster holds every split, else (cluster_part) into one partial per cluster,
        # which the combine kernel merges
        self.cluster = cluster
        self.cluster_part = cluster_part
        # > 1: each split (or the unsplit CTA) is this many CTAs, each multiplying P·V for D / groups of
        # the value dims (every one decodes the whole records and computes the same scores) and writing
        # that slice of the split's partial (or of the output); with a cluster, a cluster holds one
        # group's splits and merges that slice
        self.groups = groups

    @cute.jit
    def __call__(self, mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split: Int32,
                 swa_cap: Int64, comp_cap: Int64, qk_scale: Float32, splits: Int32, stream):
        T = mQ.shape[0]
        H = mQ.shape[1]
        cluster = {"cluster": [1, self.cluster, 1]} if self.cluster > 0 else {}  # (a trace-time choice)
        self.kernel(mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split, swa_cap, comp_cap,
                    qk_scale).launch(grid=[T, splits, (H + BH - 1) // BH * self.groups], block=[THREADS, 1, 1],
                                     stream=stream,
                                     use_pdl=self.pdl, **cluster)

    @cute.jit
    def _slot(self, swa_addr, comp_addr, isz: cutlass.Constexpr, W, j0, end, tid):
        """The global slot of this thread's candidate of the tile starting at ``j0`` (thread ``tid``
        serves candidate ``j0 + tid / 4``), −1 past ``end``; ``swa_addr`` / ``comp_addr`` are the
        token's index rows, ``isz`` bytes per index. One predicated load without a branch: issued a
        tile before ``_load`` needs it, so its latency stays off the tile's critical path."""
        j = j0 + tid // 4
        addr = swa_addr + Int64(j) * isz
        if const_expr(self.has_comp):
            addr = cutlass.select_(j < W, addr, comp_addr + Int64(j - W) * isz)
        return _ld_slot(addr, j < end, isz)

    @cute.jit
    def _load(self, slot, swa_base, comp_base, swa_page, comp_page, swa_cap, comp_cap, W, j0, rec, tid,
              part: cutlass.Constexpr):
        """This thread's share of the record of its candidate of the tile starting at ``j0`` (slot
        ``slot``, from ``_slot``) into the registers ``rec``: 16-byte chunks ``q, q+4, .., q+32``
        (``q = tid % 4``) and the record's 8 scale bytes; zeros for an invalid candidate (−1, past
        its cache: not read). Plain loads: issued a tile before ``_decode`` uses them, their latency
        hides behind that tile's multiplies. Returns whether the candidate is valid. Only the chunk
        groups ``PARTS[part]`` (part 1 with the scale bytes)."""
        q = tid % 4
        is_swa = j0 + tid // 4 < W
        ok = (slot >= 0) & (slot < cutlass.select_(is_swa, swa_cap, comp_cap))
        s = cutlass.select_(ok, slot, Int64(0))
        page_off = swa_base + (s // self.swa_bs) * swa_page  # block sizes are compile-time constants
        k = s % self.swa_bs
        bs = Int64(self.swa_bs)
        if const_expr(self.has_comp):
            page_off = cutlass.select_(is_swa, page_off, comp_base + (s // self.comp_bs) * comp_page)
            k = cutlass.select_(is_swa, k, s % self.comp_bs)
            bs = cutlass.select_(is_swa, bs, Int64(self.comp_bs))
        src = page_off + k * TOKEN_BYTES + Int64(q * 16)
        for i in cutlass.range_constexpr(*PARTS[part]):
            w0, w1, w2, w3 = _ld_rec(src + Int64(64 * i), ok, 4)
            rec[4 * i] = w0
            rec[4 * i + 1] = w1
            rec[4 * i + 2] = w2
            rec[4 * i + 3] = w3
        if const_expr(part == 1):
            s0, s1 = _ld_rec(page_off + bs * TOKEN_BYTES + k * SCALE_BYTES, ok, 2)
            rec[CHUNKS] = s0
            rec[CHUNKS + 1] = s1
        return ok

    @cute.jit
    def _decode(self, rec, ok, k_base, valid, v0, tid, part: cutlass.Constexpr):
        """``_load``'s registers → this thread's 16-byte chunks of its candidate's row (``tid / 4``) of
        the bf16 ``[64, 512]`` K tile at ``k_base`` (e4m3 x their UE8M0 block scale, exact; rope dims
        as stored; zeros for an invalid candidate, whose registers are zeros) and its ``valid`` flag.
        Chunk ``q + 4i`` of the record is dims ``16(q + 4i) ..`` (scale block ``i``) for ``i < 7``,
        rope dims ``448 + 8(q + 4(i − 7)) ..`` after; a warp's 16-byte stores spread evenly over the
        swizzled banks (four wavefronts per store, the least for 512 bytes). ``part`` as ``_load``'s
        (the flag with part 0)."""
        c = tid // 4
        q = tid % 4
        if const_expr(part == 0):
            if q == 0:
                valid[v0 + c] = Int32(ok)
        for i in cutlass.range_constexpr(*PARTS[part]):
            if const_expr(i < FP8_CHUNKS // 4):
                word = rec[CHUNKS + i // 4]
                sb = (word >> (8 * (i % 4))) & Uint32(0xFF)
                scale = (sb << 23).bitcast(Float32)  # 2^(byte − 127)
                ch = 2 * (q + 4 * i)  # 8-dim chunk of the tile row
                w0, w1, w2, w3 = _e4m3x8_bf16(rec[4 * i], rec[4 * i + 1], scale)
                st_shared_v4(k_base + Int32(sw128_offset(c, ch)), w0, w1, w2, w3)
                w0, w1, w2, w3 = _e4m3x8_bf16(rec[4 * i + 2], rec[4 * i + 3], scale)
                st_shared_v4(k_base + Int32(sw128_offset(c, ch + 1)), w0, w1, w2, w3)
            else:  # rope dims: bf16 as stored
                ch = NOPE // 8 + q + 4 * (i - FP8_CHUNKS // 4)
                st_shared_v4(k_base + Int32(sw128_offset(c, ch)), rec[4 * i], rec[4 * i + 1], rec[4 * i + 2],
                              rec[4 * i + 3])

    @cute.kernel
    def kernel(self, mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split: Int32,
               swa_cap: Int64, comp_cap: Int64, qk_scale: Float32):
        tid, _, _ = cute.arch.thread_idx()
        t, sp, z = cute.arch.block_idx()
        hb = z // self.groups
        grp = z % self.groups  # this CTA's slice of the value dims
        dv = DV // self.groups  # value dims per warpgroup
        wg = tid // WG
        wtid = tid % WG
        H = mQ.shape[1]
        W = mSwaIdx.shape[1]
        K = Int32(0)
        if const_expr(self.has_comp):
            K = mCompIdx.shape[1]
        if const_expr(self.pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()

        # ---- shared memory ----
        q_layout = sm90.make_smem_layout_a(_ROW, (BH, BN, D), BFloat16, 1)
        k_layout = sm90.make_smem_layout_b(_ROW, (BH, BN, D), BFloat16, 2)  # (N = candidates, K = dims, tile)
        v_layout = sm90.make_smem_layout_b(_COL, (BH, D, BN), BFloat16, 2)  # (N = dims, K = candidates, tile)
        smem = cutlass.memory.SmemAllocator()
        # the 128-byte swizzle on the pointers (as wgmma descriptors want it); sw128_offset writes the
        # same bytes by hand
        sQ = smem.allocate_tensor(BFloat16, q_layout.outer, byte_alignment=1024, swizzle=q_layout.inner)
        sK = smem.allocate_tensor(BFloat16, k_layout.outer, byte_alignment=1024, swizzle=k_layout.inner)
        sV = cute.make_tensor(sK.iterator, v_layout.outer)  # the same bytes, read N-major by P·V
        valid = smem.allocate_tensor(Int32, cute.make_layout(2 * BN), byte_alignment=16)  # per K tile
        p_layout = sm90.make_smem_layout_a(_ROW, (BH, DV, BN), BFloat16, 1)
        sP = smem.allocate_tensor(BFloat16, p_layout.outer, byte_alignment=1024, swizzle=p_layout.inner)
        red = smem.allocate_tensor(Float32, cute.make_layout(4 * BH), byte_alignment=16)  # [max | sum][wg][row]
        q_base = sQ.iterator.toint()
        k_base = sK.iterator.toint()

        # ---- the CTA's candidates ----
        start = sp * per_split
        end = cutlass.min(start + per_split, W + K)
        n_tiles = (end - start + BN - 1) // BN
        isz = mSwaIdx.element_type.width // 8
        swa_addr = mSwaIdx.iterator.toint() + Int64(t) * Int64(mSwaIdx.stride[0]) * isz
        swa_base = mSwa.iterator.toint()
        swa_page = Int64(mSwa.stride[0])
        comp_addr, comp_base, comp_page = swa_addr, swa_base, swa_page  # unused without a compressed cache
        if const_expr(self.has_comp):
            comp_addr = mCompIdx.iterator.toint() + Int64(t) * Int64(mCompIdx.stride[0]) * isz
            comp_base = mComp.iterator.toint()
            comp_page = Int64(mComp.stride[0])

        # ---- queries into shared memory with 16-byte cp.async (heads past H: zeros) ----
        h0 = hb * BH
        q_row0 = mQ.iterator.toint() + Int64(t) * Int64(mQ.stride[0]) * 2
        for i in cutlass.range_constexpr(BH * (D // 8) // THREADS):
            u = tid + i * THREADS
            r = u // (D // 8)
            ch = u % (D // 8)
            dst = q_base + Int32(sw128_offset(r, ch))
            if h0 + r < H:
                _cp_async16(dst, q_row0 + Int64(h0 + r) * Int64(mQ.stride[1]) * 2 + Int64(ch * 16))
            else:
                st_shared_v4(dst, Uint32(0), Uint32(0), Uint32(0), Uint32(0))
        cute.arch.cp_async_commit_group()
        # tile 0 into K tile 0 (while the queries land), tile 1 into registers, tile 2's slots
        rec = cute.make_rmem_tensor(REC_WORDS, Uint32)
        slot = self._slot(swa_addr, comp_addr, isz, W, start, end, tid)
        args = (swa_base, comp_base, swa_page, comp_page, swa_cap, comp_cap, W)
        ok = self._load(slot, *args, start, rec, tid, 0)
        self._load(slot, *args, start, rec, tid, 1)
        slot_next = self._slot(swa_addr, comp_addr, isz, W, start + BN, end, tid)
        self._decode(rec, ok, k_base, valid, 0, tid, 0)
        self._decode(rec, ok, k_base, valid, 0, tid, 1)
        ok = self._load(slot_next, *args, start + BN, rec, tid, 0)
        self._load(slot_next, *args, start + BN, rec, tid, 1)
        slot_next = self._slot(swa_addr, comp_addr, isz, W, start + 2 * BN, end, tid)
        cute.arch.cp_async_wait_group(0)
        # generic-proxy writes of sQ / sK made visible to wgmma (ptxas: MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S)
        cute.arch.fence_view_async_shared()

        # ---- MMAs ----
        # each warpgroup computes S for its half of the tile's candidates (SN of them); both read all of
        # P from shared memory
        qk_mma = sm90.make_trivial_tiled_mma(BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                             (1, 1, 1), (BH, SN))
        pv_mma = sm90.make_trivial_tiled_mma(BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.MN, Float32,
                                             (1, 1, 1), (BH, dv))
        thr_qk = qk_mma.get_slice(wtid)
        thr_pv = pv_mma.get_slice(wtid)
        tSrQ = qk_mma.make_fragment_A(thr_qk.partition_A(sQ[None, None, 0]))
        tSrK0 = qk_mma.make_fragment_B(thr_qk.partition_B(cute.local_tile(sK[None, None, 0], (SN, D), (wg, 0))))
        tSrK1 = qk_mma.make_fragment_B(thr_qk.partition_B(cute.local_tile(sK[None, None, 1], (SN, D), (wg, 0))))
        v_blk = grp * 2 + wg  # the warpgroup's value dims: dv·v_blk ..
        tOrV0 = pv_mma.make_fragment_B(thr_pv.partition_B(cute.local_tile(sV[None, None, 0], (dv, BN), (v_blk, 0))))
        tOrV1 = pv_mma.make_fragment_B(thr_pv.partition_B(cute.local_tile(sV[None, None, 1], (dv, BN), (v_blk, 0))))
        tOrP = pv_mma.make_fragment_A(thr_pv.partition_A(sP[None, None, 0]))
        acc_s = cute.make_rmem_tensor(thr_qk.partition_shape_C((BH, SN)), Float32)
        acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((BH, dv)), Float32)
        # (row, col) of each accumulator element: rows 16·warp + lane/4 (+8), columns 2·(lane%4) (+1) + 8·j
        cS = thr_qk.partition_C(cute.make_identity_tensor((BH, SN)))
        cO = thr_pv.partition_C(cute.make_identity_tensor((BH, dv)))
        acc_o.fill(0.0)
        qk_mma.set(warpgroup.Field.ACCUMULATE, True)
        pv_mma.set(warpgroup.Field.ACCUMULATE, True)
        m_i = cute.make_rmem_tensor(2, Float32)
        l_i = cute.make_rmem_tensor(2, Float32)
        for r in cutlass.range_constexpr(2):
            m_i[r] = Float32(NEG_BIG)
            l_i[r] = Float32(0.0)

        for it in cutlass.range(n_tiles):
            buf = it % 2
            # K tile `buf` (tile it) decoded and fenced by all; both warpgroups' last P·V finished
            # reading K tile 1 − buf and P
            cute.arch.sync_threads()
            # S = Q·Kᵀ, in flight while this thread decodes part 0 of tile it + 1 into the other K tile
            # and loads part 0 of tile it + 2 into its registers
            acc_s.fill(0.0)
            warpgroup.fence()
            if buf == 0:
                _mma_issue(qk_mma, acc_s, tSrQ, tSrK0)
            else:
                _mma_issue(qk_mma, acc_s, tSrQ, tSrK1)
            if it + 1 < n_tiles:
                self._decode(rec, ok, k_base + Int32((1 - buf) * TILE_BYTES), valid, (1 - buf) * BN, tid, 0)
                ok = self._load(slot_next, *args, start + (it + 2) * BN, rec, tid, 0)
            warpgroup.wait_group(0)

            # the softmax's proxy fence and barrier also publish part 0 of tile it + 1's decode
            _online_softmax(acc_s, acc_o, sP.iterator.toint(), red, m_i, l_i, cS, valid, buf * BN, qk_scale, wg,
                            wtid)

            # O += P·V
            warpgroup.fence()
            if buf == 0:
                _mma_issue(pv_mma, acc_o, tOrP, tOrV0)
            else:
                _mma_issue(pv_mma, acc_o, tOrP, tOrV1)
            # the rest of tile it + 1's decode and tile it + 2's loads while P·V runs, then the slots of tile
            # it + 3; the decode published to wgmma by the proxy fence and the next tile's barrier
            if it + 1 < n_tiles:
                self._decode(rec, ok, k_base + Int32((1 - buf) * TILE_BYTES), valid, (1 - buf) * BN, tid, 1)
                self._load(slot_next, *args, start + (it + 2) * BN, rec, tid, 1)
                slot_next = self._slot(swa_addr, comp_addr, isz, W, start + (it + 3) * BN, end, tid)
                cute.arch.fence_view_async_shared()
            warpgroup.wait_group(0)

        _row_sums(l_i, red, cO, wg, wtid)
        if const_expr(self.cluster > 0):
            _cluster_merge(self.cluster, self.cluster_part, acc_o, m_i, l_i, cO, q_base, k_base, mSink, mOut, mPart,
                           mM, mL, t, sp, h0, H, wg, wtid, tid, self.groups, grp)
        else:
            _finish(self.split, acc_o, m_i, l_i, cO, q_base, mSink, mOut, mPart, mM, mL, t, sp, h0, H, wg, wtid, tid,
                    v_blk * dv, grp == 0, self.groups, grp)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(swa_bs: int, comp_bs: int, has_comp: bool, split: bool, idx_dtype, pdl: bool, arch: str,
                extra_options: str = "", cluster: int = 0, cluster_part: bool = False, groups: int = 1):
        """Compile one variant over fake tensors (no GPU needed): tokens, heads, widths, pages and
        strides are symbolic; ``cluster`` > 0 (with ``split``): clusters of that many splits, merged
        within the cluster: all of a (token, head block)'s splits, no partials in global memory, or
        (``cluster_part``) a run of them into one partial for the combine kernel; ``groups`` > 1: each
        split, or the unsplit CTA, as that many CTAs, one slice of the value dims each (with ``cluster``,
        a cluster holds one group of its splits and merges that slice)."""
        if groups not in GROUPS:
            raise ValueError(f"sparse_attn: {groups} value-dim groups (one of {GROUPS})")
        if (cluster and not split) or (cluster_part and not cluster):
            raise ValueError(f"sparse_attn: cluster {cluster} (cluster_part {cluster_part}) without splits "
                             "(or a cluster) to merge")
        mk = cute.runtime.make_fake_tensor
        T = cute.sym_int()
        H = cute.sym_int()
        q = mk(BFloat16, (T, H, D), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=16)
        swa = mk(Uint8, (cute.sym_int(), cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=16)
        swa_idx = mk(idx_dtype, (T, cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=idx_dtype.width // 8)
        comp = comp_idx = None
        if has_comp:
            comp = mk(Uint8, (cute.sym_int(), cute.sym_int()), stride=(cute.sym_int64(), 1), assumed_align=16)
            comp_idx = mk(idx_dtype, (T, cute.sym_int()), stride=(cute.sym_int64(), 1),
                          assumed_align=idx_dtype.width // 8)
        sink = mk(Float32, (H,), stride=(1,), assumed_align=4)
        out = mk(BFloat16, (T, H, D), stride=(cute.sym_int64(), D, 1), assumed_align=16)
        part = m = l_ = None
        if split and (cluster == 0 or cluster_part):
            S = cute.sym_int()
            part = mk(Float32, (T, S, H, D), stride=(cute.sym_int64(), cute.sym_int64(), D, 1), assumed_align=16)
            m = mk(Float32, (T, S, H), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
            l_ = mk(Float32, (T, S, H), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
        kernel = SparseAttnKernel(swa_bs, comp_bs, has_comp, split, pdl, cluster, cluster_part, groups)
        return cute.compile(
            kernel, q, swa, swa_idx, comp, comp_idx, sink, out, part, m, l_,
            Int32(64), Int64(1), Int64(1), Float32(1.0), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


@cute.jit
def _mma_issue(mma, acc, tA, tB):
    """Issue ``acc += A·B`` over the fragments' K blocks as one commit group (the caller waits; it
    zeroes ``S`` before ``Q·Kᵀ``). Both MMAs always accumulate: their accumulate field is set once,
    outside the branches over K tiles."""
    for kb in cutlass.range_constexpr(cute.size(tA, mode=[2])):
        cute.gemm(mma, acc, tA[None, None, kb], tB[None, None, kb], acc)
    warpgroup.commit_group()


@cute.jit
def _online_softmax(acc_s, acc_o, p_base, red, m_i, l_i, cS, valid, v0, qk_scale, wg, wtid):
    """One tile's online softmax (base 2) for a warpgroup holding the scores of its half of the
    candidates (columns ``SN·wg ..``), on the thread's two rows (the four lanes of a quad share a row):
    scores of invalid candidates (``valid[col] == 0``) to −inf; the row maxima of both halves meet in
    ``red`` (one barrier); ``O`` rescaled; ``P`` to shared memory as bf16 in the swizzled K-major
    layout P·V reads (then a barrier: both halves written and visible to wgmma). ``l_i`` sums this
    half's columns only (``_row_sums`` adds the two)."""
    row_max = cute.make_rmem_tensor(2, Float32)
    for r in cutlass.range_constexpr(2):
        row_max[r] = m_i[r]
    for i in cutlass.range_constexpr(cute.size(acc_s)):
        r = (i // 2) % 2
        s = acc_s[i] * qk_scale
        if valid[v0 + cS[i][1] + wg * SN] == 0:
            s = -Float32.inf
        acc_s[i] = s
        row_max[r] = cute.arch.fmax(row_max[r], s)
    for r in cutlass.range_constexpr(2):
        mx = row_max[r]
        mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=1))
        mx = cute.arch.fmax(mx, cute.arch.shuffle_sync_bfly(mx, offset=2))
        row_max[r] = mx
        if wtid % 4 == 0:
            red[wg * BH + cS[2 * r][0]] = mx
    cute.arch.sync_threads()
    alpha = cute.make_rmem_tensor(2, Float32)
    for r in cutlass.range_constexpr(2):
        mx = cute.arch.fmax(row_max[r], red[(1 - wg) * BH + cS[2 * r][0]])
        alpha[r] = cute.math.exp2(m_i[r] - mx, fastmath=True)
        m_i[r] = mx
        l_i[r] = l_i[r] * alpha[r]
    for j in cutlass.range_constexpr(cute.size(acc_s) // 2):
        i = 2 * j
        r = (i // 2) % 2
        p0 = cute.math.exp2(acc_s[i] - m_i[r], fastmath=True)
        p1 = cute.math.exp2(acc_s[i + 1] - m_i[r], fastmath=True)
        l_i[r] = l_i[r] + p0 + p1
        col = cS[i][1] + wg * SN
        _st_bf16("shared", p_base + Int32(sw128_offset(cS[i][0], col // 8) + (col % 8) * 2), p0, p1)
    if cute.arch.vote_any_sync((alpha[0] != Float32(1.0)) | (alpha[1] != Float32(1.0))):
        for i in cutlass.range_constexpr(cute.size(acc_o)):
            acc_o[i] = acc_o[i] * alpha[(i // 2) % 2]
    cute.arch.fence_view_async_shared()
    cute.arch.sync_threads()


@cute.jit
def _row_sums(l_i, red, cO, wg, wtid):
    """``l_i`` summed over the quad's lanes and both warpgroups' halves of the candidates (through
    ``red``): each row's sum over all of the CTA's candidates."""
    for r in cutlass.range_constexpr(2):
        s = l_i[r]
        s = s + cute.arch.shuffle_sync_bfly(s, offset=1)
        s = s + cute.arch.shuffle_sync_bfly(s, offset=2)
        l_i[r] = s
    for r in cutlass.range_constexpr(2):
        if wtid % 4 == 0:
            red[2 * BH + wg * BH + cO[2 * r][0]] = l_i[r]
    cute.arch.sync_threads()
    for r in cutlass.range_constexpr(2):
        l_i[r] = l_i[r] + red[2 * BH + (1 - wg) * BH + cO[2 * r][0]]


@cute.jit
def _sink_factor(m, l, sink_ln):
    """The factor that turns a row's accumulator (running max ``m`` and sum ``l``, base 2) into its
    output with the per-head sink (``sink_ln``, natural log) in the denominator:
    ``a / (l·a + e^(sink − m'))`` with ``m' = max(m, sink)``, ``a = 2^(m − m')``; 0 for an empty set
    under a −inf sink."""
    sink = sink_ln * Float32(LOG2E)
    mx = cute.arch.fmax(m, sink)
    a = cute.math.exp2(m - mx, fastmath=True)
    den = l * a + cute.math.exp2(sink - mx, fastmath=True)
    inv = Float32(0.0)
    if den > Float32(0.0):
        inv = Float32(1.0) / den
    return a * inv


ROW_PAD = 16  # bytes after each staged bf16 output row: the eight rows of a warp's fragment store hit distinct banks


@cute.jit
def _finish(split: cutlass.Constexpr, acc_o, m_i, l_i, cO, q_base, mSink, mOut, mPart, mM, mL, t, sp, h0, H, wg,
            wtid, tid, col0, write_ml, groups: cutlass.Constexpr = 1, grp=0):
    """After ``_row_sums``: this CTA's fp32 partials ``(acc, m, l)`` (split), written from the fragment as
    pairs of value dims, or the output with the sink applied (bf16), staged in shared memory (over the
    freed query and K tiles, padded 1 KB rows) and written as 16-byte stores, a warp's consecutive.
    H200, graph replay, against the fragment's own 4-byte stores (same bits): prefill (T = 4096) 1407 →
    1383 µs, V4-Pro B = 64 CSA / HCA / SWA-only 76.8 / 49.5 / 19.6 → 75.2 / 44.0 / 14.8, one CTA over 640
    candidates 41.3 → 40.1. The split partials stay as they are: staged and written the same way (or as
    one bulk copy per row) they took longer, 12.0 → 13.1 (13.8) µs at V4-Flash CSA B = 1 with ten splits:
    a split writes 128 KB from one SM, bound by that SM's write bandwidth (clock stamps: 4,800 cycles as
    fragment stores, 8,300 as bulk copies). ``col0``: the warpgroup's first value dim; ``write_ml``: this CTA
    writes the split's ``(m, l)`` (one of a split's value-dim groups); unsplit, the CTA writes the
    output's value dims of its group ``grp`` of ``groups`` (``D / groups`` from ``grp · D / groups``)."""
    if const_expr(split):
        n_split = mPart.shape[1]
        part_base = mPart.iterator.toint()
        for r in cutlass.range_constexpr(2):
            h = h0 + cO[2 * r][0]
            if h < H:
                row = part_base + ((Int64(t) * n_split + sp) * H + h) * (D * 4)
                for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
                    i = 4 * j + 2 * r
                    st_f32("global", row + Int64((col0 + cO[i][1]) * 4), acc_o[i], acc_o[i + 1])
                if wg == 0:
                    if wtid % 4 == 0:
                        if write_ml:
                            mM[t, sp, h] = m_i[r]
                            mL[t, sp, h] = l_i[r]
    else:
        # 64 padded rows, 66,560 bytes from the query tile's start: past it into the K tiles, which the
        # kernel's shared memory holds right after it (both freed: every multiply was waited for)
        pitch = D * 2 + ROW_PAD
        for r in cutlass.range_constexpr(2):
            row = cO[2 * r][0]
            f = Float32(0.0)
            if h0 + row < H:
                f = _sink_factor(m_i[r], l_i[r], mSink[h0 + row])
            for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
                i = 4 * j + 2 * r
                _st_bf16("shared", q_base + Int32(row * pitch + (col0 + cO[i][1]) * 2), acc_o[i] * f,
                         acc_o[i + 1] * f)
        cute.arch.sync_threads()
        dst = mOut.iterator.toint() + (Int64(t) * H + h0) * (D * 2)
        if const_expr(groups == 1):
            for c in cutlass.range(tid, cutlass.min(Int32(BH), H - h0) * (D // 8), THREADS, unroll=8):  # 8 dims
                v0, v1, v2, v3 = ld("shared", q_base + Int32((c // (D // 8)) * pitch + (c % (D // 8)) * 16), Float32,
                                    4)
                st_f32("global", dst + Int64(c) * 16, v0, v1, v2, v3)
        else:
            gd = D // groups  # the group's value dims, from g0
            g0 = grp * gd
            for c in cutlass.range(tid, cutlass.min(Int32(BH), H - h0) * (gd // 8), THREADS, unroll=8):
                rw, ch = c // (gd // 8), c % (gd // 8)
                v0, v1, v2, v3 = ld("shared", q_base + Int32(rw * pitch + g0 * 2 + ch * 16), Float32, 4)
                st_f32("global", dst + Int64(rw * (D * 2) + g0 * 2 + ch * 16), v0, v1, v2, v3)


ACC_ROW_BYTES = D * 4  # a row of the CTA's fp32 [64, 512] accumulator in shared memory
ML_BYTES = 2 * BH * 4  # the CTA's running max and sum per row, fp32, read by the whole cluster
FIN_OFF = ML_BYTES  # then each row's sink factor, then the splits' weights, [split][row]
WTS_OFF = FIN_OFF + BH * 4
GROUPS = (1, 2, 4, 8)  # value-dim groups a split or an unsplit CTA may run as (P·V down to m64n32 per warpgroup)
MAX_CLUSTER = 16  # CTAs per cluster on sm_90 (8 portable, 16 with the non-portable size allowed)
CLUSTER_MIN_CTAS = 32  # the cluster merge from this many CTAs (cluster_merge), of groups above it (group_cluster)
CHUNKS_IN_FLIGHT = 16  # 16-byte remote loads a thread of the cluster merge issues before it uses one


def _acc_offset(row, chunk):
    """Byte offset of 16-byte ``chunk`` (0..127: value dims 4·chunk ..) of ``row`` of the fp32
    ``[64, 512]`` accumulator in shared memory: the chunk index XOR the row's low three bits, so the
    eight rows of a warp's 8-byte accumulator stores take the fewest wavefronts (two). With value-dim
    groups the accumulator is the group's ``[64, 512 / groups]`` slice, chunks 0 .. 128 / groups − 1
    (at least 16) at the same row pitch."""
    return row * ACC_ROW_BYTES + (chunk ^ (row % 8)) * 16


@cute.jit
def _cluster_merge(n: cutlass.Constexpr, to_part: cutlass.Constexpr, acc_o, m_i, l_i, cO, q_base, k_base, mSink,
                   mOut, mPart, mM, mL, t, sp, h0, H, wg, wtid, tid, groups: cutlass.Constexpr = 1, grp=0):
    """A cluster of ``n`` splits of one (token, head block) (rank = split % ``n``) merged in distributed
    shared memory. Without ``to_part`` the cluster holds every split and writes the bf16 output: no
    partials in global memory, no combine kernel. With ``to_part`` the cluster holds a run of ``n`` out
    of more splits (the op's default where a cluster of all of them would not fit the GPU at once, or a
    forced cluster size) and cluster ``run = split // n`` writes its merge as one
    fp32 partial ``(acc, m, l)`` (``mPart[t, run]``, ``mM``, ``mL``; the rank-0 CTA writes ``(m, l)``)
    for the combine kernel: an ``n``-th of the partial bytes the combine kernel reads. Each CTA
    leaves its accumulator (fp32 ``[64, 512]``, over the freed K tiles) and its rows' ``(m, l)``
    (over the freed query tile) in its own shared memory; after one cluster barrier each CTA merges
    an ``n``-th of the ``[heads, 512]`` output from every CTA's accumulator, in split order, as
    ``kernels.triton.attention.combine_splits``' looping kernel does (``m = max_s m_s``,
    ``l = Σ_s 2^(m_s − m)·l_s``, ``acc = Σ_s 2^(m_s − m)·acc_s``, then the sink; ``to_part``: no sink), and
    writes it; a second cluster barrier keeps every CTA's shared memory alive until all have read it.
    Every remote load of a step is issued before any is used (``n`` is a compile-time constant;
    ``CHUNKS_IN_FLIGHT`` 16-byte loads per thread at a time): one round trip per step, not one per
    split. With ``groups`` value-dim groups the cluster holds group ``grp`` of its splits: each CTA's
    accumulator is ``[64, 512 / groups]`` (value dims from ``grp · 512 / groups``), merged the same way
    into that slice (the ``(m, l)`` of ``to_part`` written by group 0: every group's are the same)."""
    gd = D // groups  # the CTA's value dims, from g0
    g0 = 0
    ml_writer = True  # to_part: this CTA's group writes the run's (m, l)
    if const_expr(groups > 1):
        g0 = grp * gd
        ml_writer = grp == 0
    # this CTA's accumulator and (m, l); the freed tiles (the last P·V was waited for by both warpgroups
    # before _row_sums' barrier)
    for r in cutlass.range_constexpr(2):
        row = cO[2 * r][0]
        if wg == 0:
            if wtid % 4 == 0:
                st_f32("shared", q_base + Int32(row * 4), m_i[r])
                st_f32("shared", q_base + Int32(BH * 4 + row * 4), l_i[r])
        for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
            i = 4 * j + 2 * r
            col = wg * (gd // 2) + cO[i][1]
            st_f32("shared", k_base + Int32(_acc_offset(row, col // 4) + (col % 4) * 4), acc_o[i], acc_o[i + 1])
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()
    # per row: the splits' weights and the sink factor (to_part: the run's (m, l) instead), from every CTA's (m, l)
    rank = sp % n
    run = sp // n
    rows = cutlass.min(Int32(BH), H - h0)
    if tid < rows:
        ms = cute.make_rmem_tensor(n, Float32)
        ls = cute.make_rmem_tensor(n, Float32)
        for s in cutlass.range_constexpr(n):
            ms[s] = ld("shared", q_base + Int32(tid * 4), Float32, rank=s)
            ls[s] = ld("shared", q_base + Int32(BH * 4 + tid * 4), Float32, rank=s)
        m = Float32(NEG_BIG)
        for s in cutlass.range_constexpr(n):
            m = cute.arch.fmax(m, ms[s])
        l = Float32(0.0)
        for s in cutlass.range_constexpr(n):
            a = cute.math.exp2(ms[s] - m, fastmath=True)
            l = l + a * ls[s]
            st_f32("shared", q_base + Int32(WTS_OFF + s * BH * 4) + tid * 4, a)
        if const_expr(to_part):
            if rank == 0:
                if ml_writer:
                    mM[t, run, h0 + tid] = m
                    mL[t, run, h0 + tid] = l
        else:
            st_f32("shared", q_base + Int32(FIN_OFF + tid * 4), _sink_factor(m, l, mSink[h0 + tid]))
    cute.arch.sync_threads()
    # this CTA's n-th of the rows' 16-byte chunks, u chunks per thread and step
    u = max(1, CHUNKS_IN_FLIGHT // n)
    total = rows * (gd // 4)
    per = (total + n - 1) // n
    c_end = cutlass.min(rank * per + per, total)
    out_base = mOut.iterator.toint()
    part_row0 = Int64(0)
    if const_expr(to_part):
        part_row0 = (Int64(t) * mPart.shape[1] + run) * H + h0
    vals = cute.make_rmem_tensor(4 * u * n, Float32)
    for c0 in cutlass.range(rank * per + tid, c_end, THREADS * u):
        for k in cutlass.range_constexpr(u):
            c = cutlass.min(c0 + k * THREADS, c_end - 1)  # past the end: a repeat of the last chunk, not stored
            src = k_base + Int32(_acc_offset(c // (gd // 4), c % (gd // 4)))
            for s in cutlass.range_constexpr(n):
                v0, v1, v2, v3 = ld("shared", src, Float32, 4, rank=s)
                vals[4 * (k * n + s)] = v0
                vals[4 * (k * n + s) + 1] = v1
                vals[4 * (k * n + s) + 2] = v2
                vals[4 * (k * n + s) + 3] = v3
        for k in cutlass.range_constexpr(u):
            c = c0 + k * THREADS
            if c < c_end:
                row = c // (gd // 4)
                acc = cute.make_rmem_tensor(4, Float32)
                acc.fill(0.0)
                for s in cutlass.range_constexpr(n):
                    w = ld("shared", q_base + Int32(WTS_OFF + s * BH * 4) + row * 4, Float32)
                    for e in cutlass.range_constexpr(4):
                        acc[e] = acc[e] + w * vals[4 * (k * n + s) + e]
                if const_expr(to_part):
                    dst = mPart.iterator.toint() + ((part_row0 + row) * D + _plus(g0, (c % (gd // 4)) * 4)) * 4
                    st_f32("global", dst, acc[0], acc[1], acc[2], acc[3])
                else:
                    f = ld("shared", q_base + Int32(FIN_OFF) + row * 4, Float32)
                    dst = out_base + ((Int64(t) * H + h0 + row) * D + _plus(g0, (c % (gd // 4)) * 4)) * 2
                    _st_bf16("global", dst, acc[0] * f, acc[1] * f, acc[2] * f, acc[3] * f)
    cute.arch.cluster_arrive()
    cute.arch.cluster_wait()


def _plus(a, b):
    """``a + b``, or ``b`` where ``a`` is the trace-time 0 (no add in the kernel)."""
    return b if isinstance(a, int) and a == 0 else a + b


def supports(q: torch.Tensor, swa_cache: torch.Tensor, comp_cache) -> bool:
    """Whether this kernel can run the call: a Hopper GPU (wgmma), and caches whose base and page
    stride allow 16-byte record loads (every ``kv_insert``-made cache does; a view at an odd offset
    goes to the Triton kernel)."""
    if q.device.type != "cuda" or _capability(q.device)[0] != 9:
        return False
    for c in (swa_cache, comp_cache):
        if c is not None and c.numel() and (c.stride(1) != 1 or not aligned(c, 16, (0,))):
            return False
    return True


def preferred(q: torch.Tensor, n_cand: int) -> bool:
    """Whether the op takes this kernel over the Triton one (given ``supports``) for ``n_cand``
    candidates a token (SWA + compressed index columns): from two (token, 64-head block) CTAs on, or
    from two 64-candidate tiles, where one token's splits run as value-dim groups (``split_plan``).
    H200, 64k context, graph replay: V4-Flash CSA B = 1 (640 candidates, one 64-head block) 9.4 against
    the Triton kernel's 11.1 µs (one CTA a split, before groups, 11.4: the Triton kernel's 16-head
    programs fill the GPU better), SWA-only B = 1 (128) 6.4 against 8.7; V4-Pro B = 1 13.4 against 20.3
    µs, V4-Flash B = 8 / 32 / 64 16.6 / 27.9 / 38.7 against 24.6 / 47.3 / 67.7 µs."""
    return q.shape[0] * cdiv(q.shape[1], BH) >= 2 or n_cand > BN


def splits_for(T: int, H: int, n_cand: int, sms: int) -> tuple[int, int]:
    """(splits, candidates per split): one CTA per SM at most (its ~200 KB of shared memory), so the
    candidates of each (token, head block) split in as many whole 64-candidate tiles as leave no SM
    idle within one wave."""
    ctas = T * cdiv(H, BH)
    tiles = max(1, cdiv(n_cand, BN))
    splits = max(1, min(tiles, sms // max(ctas, 1)))
    per_split = cdiv(tiles, splits) * BN
    return max(1, cdiv(n_cand, per_split)), per_split


def value_groups(ctas: int, sms: int) -> int:
    """The value-dim groups (``GROUPS``) for ``ctas`` split CTAs whose partials the combine kernel
    (or a cluster: ``group_cluster``) merges: the most whose CTAs fill at most half the SMs, else two
    where they fill at most five eighths. A split CTA's fp32 partial (128 KB, 64 rows × 512) leaves one
    SM at that SM's write bandwidth (clock stamps, V4-Flash CSA B = 1: 4,800 cycles, as long as Q·Kᵀ,
    softmax and P·V together); each group writes a ``groups``-th of it, and decodes the same records again. H200, 64k
    context, graph replay, V4-Flash, groups 1 → the chosen (the best measured of 2 / 4 / 8 in every
    case; µs): CSA B = 1 (10 CTAs) 11.4 → 9.4 (4; 9.8 at 8), B = 2 (20) 13.5 → 11.7 (2; 12.0 at 4),
    B = 4 (40) 13.4 → 12.0 (2; 15.6 at 4), SWA-only B = 1 (2) 9.3 → 6.4 (8), B = 8 (16) 10.2 → 8.1
    (4; 8.7 at 8), HCA B = 1 11.6 → 9.4 (4); V4-Pro CSA B = 1 (36 CTAs) 14.0 → 13.4 (2; 15.8 at 4)."""
    for g in reversed(GROUPS[1:]):
        if ctas * g <= sms // 2:
            return g
    return 2 if ctas * 2 <= sms * 5 // 8 else 1


def unsplit_groups(ctas: int, tiles: int, sms: int) -> int:
    """Value-dim groups for ``ctas`` (token, head block) rows of ``tiles`` (2 ..
    ``UNSPLIT_GROUPS_MAX_TILES``) candidate tiles run unsplit, each group writing its slice of the bf16
    output (no partials, no combine kernel): where eight groups of them would fill the SMs (``ctas ≥
    SMs / 8``), the most of 8 / 4 whose CTAs fit one wave; else 1 (the split plan). H200, 64k context,
    graph replay, the op's previous plan of two splits (its groups) → unsplit groups (µs): V4-Flash
    SWA-only B = 16 (2) 10.11 → 9.38 (8), B = 24 / 32 (1, clusters of 2) 11.61 / 11.91 → 10.16 / 10.53
    (4), B = 33 11.94 → 10.49; V4-Pro B = 8 / 12 / 16 (2 / 1 / 1) 9.89 / 11.18 / 11.31 → 9.25 / 9.73 /
    10.07. Fewer rows lost: B = 9 / 12 (two splits as two groups) 8.81 / 9.23 against 9.03 / 9.37 at 8
    groups, B = 8 (four groups) 7.97 against 8.97; so did 2 groups (B = 64: 12.55 against 12.73) and
    ten-tile CSA rows (B = 64: 30.70 against 45.48 unsplit)."""
    if not 2 <= tiles <= UNSPLIT_GROUPS_MAX_TILES or ctas < sms // 8:
        return 1
    for g in (8, 4):
        if ctas * g <= sms:
            return g
    return 1


UNSPLIT_GROUPS_MAX_TILES = 2  # candidate tiles a row may have to run unsplit as groups (measured: SWA-only rows)


def split_plan(T: int, H: int, n_cand: int, sms: int, device_index: int) -> tuple[int, int, int]:
    """The op's default (splits, candidates per split, value-dim groups): ``splits_for``'s splits run
    as ``value_groups`` groups where that gives more than one; else, where its splits do not all merge
    within one cluster (``cluster_merge``), half as many splits as two groups each where
    ``value_groups`` allows it (V4-Flash CSA B = 8: ten splits merged in clusters of five 15.6 µs,
    five splits as two groups 14.3); else one group. Rows of two tiles run unsplit as ``unsplit_groups``
    groups where that gives more than one. (``launch_plan`` then picks the clusters: ``group_cluster``
    for groups, ``cluster_merge`` / ``cluster_run`` for one.)"""
    n_split, per_split = splits_for(T, H, n_cand, sms)
    ctas = T * cdiv(H, BH)
    plan = n_split, per_split, 1
    if n_split > 1:
        g = value_groups(ctas * n_split, sms)
        if g > 1:
            plan = n_split, per_split, g
        else:
            half = cdiv(cdiv(n_cand, BN), cdiv(n_split, 2)) * BN  # half the splits, whole tiles
            n_half = cdiv(n_cand, half)
            g = value_groups(ctas * n_half, sms)
            if n_half > 1 and g > 1 and not cluster_merge(T, H, n_split, device_index):
                plan = n_half, half, g
    tiles = cdiv(n_cand, BN)
    g = unsplit_groups(ctas, tiles, sms)
    return (1, tiles * BN, g) if g > 1 else plan


_CAPACITY: dict = {}  # (device index, cluster size) -> clusters resident at once
_QUERY_FAILED: set = set()  # devices whose occupancy query failed (warned once)


def cluster_capacity(device_index: int, n: int) -> int:
    """How many clusters of ``n`` CTAs, one CTA per SM (the kernel's shared memory), the GPU runs at
    once (``cuOccupancyMaxActiveClusters`` through CuTe DSL's ``HardwareInfo``, which compiles and
    loads a small kernel: a cluster is placed within one GPC, so this is not ``SMs // n``); 0 past
    ``MAX_CLUSTER``, and 0 with one warning where the query fails (the combine kernel then merges, and
    ``topk.cluster_plan`` keeps the rounds).
    Cached per device and size, failures too (the op calls this at every split launch)."""
    if not 2 <= n <= MAX_CLUSTER:
        return 0
    key = (device_index, n)
    if key not in _CAPACITY:
        try:
            from cuda.bindings import driver
            from cutlass.utils import HardwareInfo

            with torch.cuda.device(device_index):
                if int(driver.cuCtxGetCurrent()[1]) == 0:  # the query runs in the current context: torch's
                    ctx = driver.cuDevicePrimaryCtxRetain(driver.cuDeviceGet(device_index)[1])[1]
                    driver.cuCtxSetCurrent(ctx)
                _CAPACITY[key] = int(HardwareInfo(device_index).get_max_active_clusters(n))
        except Exception as e:  # an old driver, no cuda-python
            if device_index not in _QUERY_FAILED:
                _QUERY_FAILED.add(device_index)
                warnings.warn(f"the cluster occupancy query failed on cuda:{device_index} ({e!r}); no thread-block "
                              "clusters there (sparse_attn's splits merge through the combine kernel, the top-k "
                              "selection runs in rounds)", stacklevel=2)
            _CAPACITY[key] = 0
    return _CAPACITY[key]


def cluster_merge(T: int, H: int, n_split: int, device_index: int, groups: int = 1) -> bool:
    """Whether the ``n_split`` splits of each (token, head block) (and value-dim group, of ``groups``)
    merge within their cluster: every
    cluster resident at once (``cluster_capacity``; a second wave of clusters doubles the time) and at
    least ``CLUSTER_MIN_CTAS`` CTAs, below which the combine kernel's partials are small and the two
    merges cost the same or the cluster's more. H200, 64k context, graph replay, the kernel with the
    combine kernel → merged in the cluster: V4-Flash CSA B = 16 (5 splits) 19.9 → 17.4 µs, B = 64 (2)
    36.6 → 29.5, SWA-only B = 64 (2) 17.8 → 12.7, HCA B = 64 33.9 → 29.1, V4-Pro CSA B = 8 (6) 23.4 →
    20.2, B = 32 (2) 50.5 → 45.1; CSA B = 1 / 2 / 4 (10, 20, 40 CTAs) 11.8 / 13.1 / 13.4 → 12.2 / 12.7 /
    13.3, SWA-only B = 1 / 8 9.1 / 10.4 → 10.2 / 10.6. (CSA B = 8 and 32 split 10 and 4 ways: 8 and 32
    clusters, more than the H200's 7 and 30.) Each cluster size is its own compiled variant (its
    remote loads are unrolled): the first launch at a new split count compiles it, a few seconds."""
    ctas = T * cdiv(H, BH) * groups
    return n_split > 1 and ctas * n_split >= CLUSTER_MIN_CTAS and ctas <= cluster_capacity(device_index, n_split)


def cluster_run(T: int, H: int, n_split: int, device_index: int, groups: int = 1) -> int:
    """Where ``cluster_merge`` declines for want of room (a cluster of every split does not fit the GPU
    at once): the largest cluster size ``c`` (a divisor of ``n_split``, 2 .. ``n_split − 1``) whose
    ``n_split / c`` clusters per (token, head block) (and value-dim group, of ``groups``) are all
    resident at once; its clusters merge
    their runs of ``c`` splits into one partial each, which the combine kernel merges (``_cluster_merge``
    with ``to_part``). 0: none (too few CTAs, as for ``cluster_merge``, or no size fits). H200, 64k
    context, graph replay, the op, every split's partial → runs merged in clusters (the outputs there
    differed at most in bf16 subnormals, ≤ 6.4e-39; in general they agree within one bf16 rounding, the
    partial sums being re-associated): V4-Flash CSA B = 10 / 12 (10 splits; clusters of 5 / 2) 17.8 /
    18.1 → 16.0 / 16.3 µs, B = 32 (4; 2) 24.4-24.6 → 24.2, HCA B = 32 24.1 → 23.3-23.5; no change at CSA
    B = 8 (15.4, clusters of 5), HCA B = 8 (15.3-15.4 → 15.2) and V4-Pro CSA B = 16 (4 splits a head
    block; 30.5-30.6)."""
    ctas = T * cdiv(H, BH) * groups
    if n_split < 4 or ctas * n_split < CLUSTER_MIN_CTAS:
        return 0
    for c in range(min(n_split // 2, MAX_CLUSTER), 1, -1):
        if n_split % c == 0 and ctas * (n_split // c) <= cluster_capacity(device_index, c):
            return c
    return 0


def group_cluster(T: int, H: int, n_split: int, groups: int, device_index: int) -> int:
    """The cluster size for the op's plan of ``n_split`` splits as ``groups`` value-dim groups, each
    cluster holding one group's splits (``_cluster_merge`` on a ``512 / groups`` slice): the one-group
    rules over ``T · ⌈H / 64⌉ · groups`` rows, all the splits where ``cluster_merge`` allows (no
    partials, no combine kernel), else ``cluster_run``'s runs into partials; 0 (every split's partial
    to the combine kernel) with at most ``CLUSTER_MIN_CTAS`` CTAs (one group allows exactly that many)
    or where no size fits. H200, 64k context, graph replay, the combine
    kernel over every split → the cluster merge (µs): V4-Flash CSA B = 1 (10 splits × 4 groups, 40
    CTAs) 9.64 → 8.10 (clusters of 5 into partials 9.24), B = 2 (× 2) 11.69 → 9.91 (10.91), B = 8 (5
    × 2) 14.26 → 13.51; HCA B = 1 / 2 / 8 9.64 / 11.50 / 14.88 → 8.33 / 9.57 / 13.65; SWA-only B = 4 /
    8 (2 × 8 / 4, 64 CTAs) 7.22 / 8.20 → 6.95 / 7.56, V4-Pro B = 4 7.99 → 7.34; V4-Pro CSA B = 1 (18 ×
    2; 18 > ``MAX_CLUSTER``) 13.43 → 11.29 in runs of 9. With 16 / 32 CTAs (SWA-only B = 1 / 2) the
    combine kernel was faster: 6.47 / 6.61 against 6.73 / 6.84."""
    if T * cdiv(H, BH) * groups * n_split <= CLUSTER_MIN_CTAS:
        return 0
    if cluster_merge(T, H, n_split, device_index, groups):
        return n_split
    return cluster_run(T, H, n_split, device_index, groups)


def launch_plan(T: int, H: int, n_cand: int, sms: int, device_index: int, splits: int | None = None,
                cluster: bool | int | None = None, groups: int | None = None) -> tuple[int, int, int, int, int]:
    """(splits, candidates per split, cluster size (0: none), value-dim groups, partials the combine
    kernel merges (1: none)) of a ``sparse_attn`` call of ``T`` tokens, ``H`` heads and ``n_cand``
    candidates a token on a GPU of ``sms`` SMs, from its arguments ``splits``, ``cluster`` and
    ``groups`` (see ``sparse_attn``; no GPU needed but ``cluster_capacity``'s query). ValueError: groups
    outside ``GROUPS``, a cluster size that cannot hold the splits."""
    planned = splits is None and cluster is None and groups is None
    if planned:
        n_split, per_split, groups = split_plan(T, H, n_cand, sms, device_index)
    else:
        n_split, per_split = splits_for(T, H, n_cand, sms)
    if splits is not None:
        per_split = cdiv(cdiv(max(n_cand, 1), splits), BN) * BN  # whole tiles
        n_split = max(1, cdiv(n_cand, per_split))
    groups = 1 if groups is None else groups
    if groups != 1:
        if groups not in GROUPS:
            raise ValueError(f"sparse_attn: {groups} value-dim groups need one of {GROUPS}")
        if cluster is None:  # the plan's groups merge in clusters where those fit; forced groups do not
            cluster = group_cluster(T, H, n_split, groups, device_index) if planned else 0
    if cluster is None:
        cluster = n_split if cluster_merge(T, H, n_split, device_index) else cluster_run(T, H, n_split, device_index)
    elif cluster is True or cluster is False:
        cluster = n_split if cluster else 0
    split = n_split > 1
    if cluster and split and (cluster > MAX_CLUSTER or n_split % cluster or cluster < 2):
        raise ValueError(f"sparse_attn: {n_split} splits cannot merge within clusters of {cluster} "
                         f"(a divisor of the split count, 2 to {MAX_CLUSTER})")
    cluster = cluster if split else 0
    runs = n_split // cluster if cluster else n_split  # partials the combine kernel merges (1: none)
    return n_split, per_split, cluster, groups, runs


def sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale: float, swa_block_size: int,
                comp_block_size: int, splits: int | None = None, pdl: bool | None = None,
                cluster: bool | int | None = None, groups: int | None = None) -> torch.Tensor:
    """``kernels.triton.attention.sparse_attn``'s result from the wgmma kernel (``supports`` must hold).
    ``splits`` forces the number of candidate splits (tests); ``pdl``: programmatic dependent launch
    (default: as the package's Triton kernels, ``_launch.pdl_meta``); ``cluster``: how the splits merge
    (``_cluster_merge``). ``True``: all of a (token, head block)'s splits within one cluster;
    ``False``: through the combine kernel; an int ``c``: clusters of ``c`` splits (``c`` = the split
    count is ``True``; a proper divisor merges each cluster's run into one partial for the combine
    kernel). Default: ``cluster_merge``, else ``cluster_run``, else the combine kernel. With more than
    one split, a forced cluster of more than ``MAX_CLUSTER`` splits, or an int below 2 or that does not
    divide the split count, is a ``ValueError`` (with one split ``cluster`` is ignored); a forced
    cluster needs a GPU that holds it (``cluster_capacity`` > 0), else the launch fails. ``groups``
    (``GROUPS``): each split runs as that many CTAs, each multiplying ``P·V`` for ``512 / groups`` of the
    value dims and writing that slice of the split's partial, or, unsplit, of the output (each decodes
    the whole records and computes the same scores): a split CTA's 128 KB fp32 partial leaves one SM
    at that SM's write bandwidth, one ``groups``-th of it from each of ``groups`` SMs. With a cluster
    each cluster holds one group of its splits and merges that slice. Default: ``split_plan``'s splits
    and groups, merged in clusters where ``group_cluster`` gives a size, where none of ``splits``,
    ``cluster`` and ``groups`` is given; else one group, and forced groups without a forced cluster
    merge through the combine kernel."""
    T, H, _ = q.shape
    out = torch.empty((T, H, D), dtype=torch.bfloat16, device=q.device)
    if T == 0:
        return out
    if q.stride(-1) != 1 or not aligned(q, 8, (0, 1)):  # 16-byte aligned bf16 rows for cp.async
        q = fresh_copy(q)
    has_comp = (comp_indices is not None and comp_indices.shape[1] > 0 and comp_cache is not None
                and comp_cache.shape[0] > 0)  # a cache without pages has nothing to attend to
    if has_comp and comp_indices.dtype != swa_indices.dtype:  # one index dtype, wide enough for both
        dt = torch.promote_types(swa_indices.dtype, comp_indices.dtype)
        swa_indices, comp_indices = swa_indices.to(dt), comp_indices.to(dt)
    swa_indices = swa_indices.contiguous()
    if has_comp:
        comp_indices = comp_indices.contiguous()
    sink = sink.contiguous()
    W = swa_indices.shape[1]
    K = comp_indices.shape[1] if has_comp else 0
    n_split, per_split, cluster, groups, runs = launch_plan(T, H, W + K, sm_programs(q.device), q.device.index,
                                                            splits, cluster, groups)
    split = n_split > 1
    if pdl is None:
        pdl = pdl_meta(q.device.index) is not None
    part = m = l_ = None
    if runs > 1:
        part = torch.empty((T, runs, H, D), dtype=torch.float32, device=q.device)
        m = torch.empty((T, runs, H), dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
    compiled = SparseAttnKernel.compile(swa_block_size, comp_block_size if has_comp else 1, has_comp, split,
                                        TORCH_TO_CUTE[swa_indices.dtype], pdl, arch_name(q.device), cluster=cluster,
                                        cluster_part=runs > 1 and cluster > 0, groups=groups)
    compiled(q, swa_cache, swa_indices, comp_cache if has_comp else None, comp_indices if has_comp else None, sink,
             out, part, m, l_, per_split, swa_cache.shape[0] * swa_block_size,
             (comp_cache.shape[0] * comp_block_size) if has_comp else 0, scale * LOG2E, n_split)
    if runs > 1:
        _tattn.combine_splits(part, m, l_, sink, out)
    return out

"""CuTe-DSL sparse MQA with the per-head sink over paged ``fp8_ds_mla`` caches (``dsv4::sparse_attn``), Hopper.

Same contract as ``kernels.triton.attention.sparse_attn`` (docs/numerics.md §8.2): for head ``h`` of
token ``t`` and its candidates ``j`` (the SWA slots, then the compressed slots; −1 and out-of-range
slots skipped), ``s_j = scale · q[t,h]·kv_j``, ``o = Σ_j e^(s_j−m) kv_j / (Σ_j e^(s_j−m) + e^(sink[h]−m))``,
keys = values = the decoded 512-d records.

Method (one CTA = one token × one block of 64 heads × one split of the candidates; 256 threads, two
warpgroups):

* the 64 query heads (bf16, 64 KB) sit in shared memory for the CTA's life, in the 128-byte swizzled
  K-major layout wgmma reads;
* candidates come in tiles of 64. Each tile's records (576 token bytes and 8 scale bytes each) are
  gathered with 16-byte ``cp.async`` (four threads per record: one slot load, one address) into one of
  two staging buffers; tile ``i + 1``'s gather is issued once tile ``i`` is decoded, so it is in
  flight while tile ``i`` is multiplied (issued after the decode's proxy fence, which ptxas emits as
  ``MEMBAR.ALL.CTA`` + ``FENCE.VIEW.ASYNC.S``; issuing it before the decode measured the same). The
  slots it needs were loaded into registers a tile earlier (a predicated load, no branch), so no
  index round trip to memory sits between a tile's multiplies and the next tile's decode;
* the decode turns the staged e4m3 bytes times their UE8M0 block scales (exact) and the bf16 rope dims
  into one bf16 ``[64 candidates, 512]`` tile in shared memory with 16-byte stores (a quarter warp
  per 128-byte row: no bank conflicts). Invalid candidates decode to zeros;
* ``S = Q·Kᵀ`` (``wgmma`` m64n32k16, both operands from shared memory): each warpgroup computes the
  scores of half of the tile's candidates; the row maxima of the two halves meet in shared memory,
  and each warpgroup writes its half of ``P`` (bf16) into one shared ``[64, 64]`` tile;
* ``O += P·V`` (``wgmma`` m64n256k16, both operands from shared memory): ``V`` is the same shared
  tile read N-major, each warpgroup owning 256 of the 512 value dims (``O`` is 128 fp32 registers per
  thread). Before this split each warpgroup computed all of ``S`` (P in registers): H200, 64k, graph
  replay, V4-Flash CSA B = 8 / 32 / 64 16.9 / 28.8 / 40.3 → 16.6 / 27.9 / 38.7 µs, V4-Pro B = 64
  100.0 → 92.8 µs, prefill T = 4096 1710 → 1579 µs.

Splits write fp32 partials ``(acc, m, l)`` in the layout of the Triton kernel's, merged by its
combine kernels; an unsplit CTA applies the sink and writes bf16.

Where it stands (H200, 64k context, CSA = 128 SWA + 512 compressed candidates, graph replay, partial
merge included, kernel against kernel on the same inputs): V4-Flash B = 1 / 8 / 32 / 64 12.2 / 16.6 /
27.9 / 38.7 µs (the Triton kernel 11.0 / 24.6 / 47.3 / 67.7; FlashMLA 12.4 / 15.1 / 25.0 / 44.5 in
issue 14's measurement), V4-Pro B = 1 / 64 13.4 / 92.8 against 20.3 / 204.6 µs; prefill (T = 4096)
219 TFLOPS. One CTA per SM runs gather, decode, both multiplies and the softmax one after another
(``ncu``, an earlier form: about a quarter of the issue slots used). Tried and slower: a
warp-specialized form (a producer warpgroup decoding 32-candidate tiles into a double-buffered K tile
for two consumer warpgroups): 79 against 56 µs at B = 64 then, its Q·Kᵀ on 32-wide tiles costing more
than the overlap saved; each warpgroup multiplying half the dims with the partial scores exchanged
through shared memory (spilled).
"""

from __future__ import annotations

import functools

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
from ._common import _capability, arch_name
from ._math import TORCH_TO_CUTE

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
STAGE_REC = TOKEN_BYTES + 16  # staged record: 576 token bytes, then the 8 scale bytes (16-byte aligned)
CHUNKS = TOKEN_BYTES // 16  # 36 16-byte chunks of token data per record
NEG_BIG = _tattn._NEG_BIG.value  # "no candidate yet" running max: the Triton kernel's (its combine assumes it)
LOG2E = _tattn.LOG2E
_ROW = LayoutEnum.ROW_MAJOR  # K-major wgmma operands
_COL = LayoutEnum.COL_MAJOR  # MN-major


def _cp_async16(smem_addr, gmem_addr):
    cute.arch.inline_ptx("cp.async.cg.shared.global [{$r0}], [{$r1}], 16;", read_only_args=[smem_addr, gmem_addr])


def _cp_async8(smem_addr, gmem_addr):
    cute.arch.inline_ptx("cp.async.ca.shared.global [{$r0}], [{$r1}], 8;", read_only_args=[smem_addr, gmem_addr])


def _ld_shared_v2(addr):
    return cute.arch.inline_ptx("ld.shared.v2.b32 { {$w0}, {$w1} }, [{$r0}];", write_only_types=[Uint32, Uint32],
                                read_only_args=[addr])


def _ld_shared_v4(addr):
    return cute.arch.inline_ptx("ld.shared.v4.b32 { {$w0}, {$w1}, {$w2}, {$w3} }, [{$r0}];",
                                write_only_types=[Uint32, Uint32, Uint32, Uint32], read_only_args=[addr])


def _st_shared_v4(addr, a, b, c, d):
    cute.arch.inline_ptx("st.shared.v4.b32 [{$r0}], { {$r1}, {$r2}, {$r3}, {$r4} };", read_only_args=[addr, a, b, c, d])


def _ld_slot(addr, pred, isz: int):
    """The ``isz``-byte (4 / 8) signed index at global ``addr`` as Int64, −1 where ``pred`` is false
    (not read)."""
    if isz == 8:
        return cute.arch.inline_ptx(
            "{ .reg .pred p; setp.ne.u32 p, {$r1}, 0; mov.b64 {$w0}, -1; @p ld.global.nc.s64 {$w0}, [{$r0}]; }",
            write_only_types=[Int64], read_only_args=[addr, Uint32(pred)])
    return cute.arch.inline_ptx(
        "{ .reg .pred p; .reg .s32 v; setp.ne.u32 p, {$r1}, 0; mov.b32 v, -1; @p ld.global.nc.s32 v, [{$r0}];"
        " cvt.s64.s32 {$w0}, v; }",
        write_only_types=[Int64], read_only_args=[addr, Uint32(pred)])


def _st_global_v2_f32(addr, a, b):
    cute.arch.inline_ptx("st.global.v2.f32 [{$r0}], { {$r1}, {$r2} };", read_only_args=[addr, a, b])


def _st_bf16x2(space: str, addr, lo, hi):
    """``lo``, ``hi`` rounded to bf16 and stored as one 32-bit word (``lo`` in the low half) at ``addr`` in
    state space ``space`` ("shared" / "global")."""
    cute.arch.inline_ptx(f"{{ .reg .b32 w; cvt.rn.bf16x2.f32 w, {{$r2}}, {{$r1}}; st.{space}.b32 [{{$r0}}], w; }}",
                         read_only_args=[addr, lo, hi])


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


def _tile_offset(row, chunk):
    """Byte offset of 16-byte ``chunk`` (0..63: dims 8·chunk .. +7) of ``row`` (0..63) in a bf16
    ``[64, 512]`` tile laid out as the 128-byte swizzled K-major wgmma layout (``make_smem_layout_a/b``
    of a (64, 512) tile): 64-dim column blocks of 8 KB, 128-byte rows, the 16-byte chunk index XOR the
    row's low three bits (the tile starts 1,024-byte aligned)."""
    return (chunk // 8) * 8192 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16)


class SparseAttnKernel:
    """One launch configuration; see ``compile`` for the cache key."""

    def __init__(self, swa_bs: int, comp_bs: int, has_comp: bool, split: bool, pdl: bool):
        self.swa_bs = swa_bs
        self.comp_bs = comp_bs
        self.has_comp = has_comp
        self.split = split
        self.pdl = pdl

    @cute.jit
    def __call__(self, mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split: Int32,
                 swa_cap: Int64, comp_cap: Int64, qk_scale: Float32, splits: Int32, stream):
        T = mQ.shape[0]
        H = mQ.shape[1]
        self.kernel(mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split, swa_cap, comp_cap,
                    qk_scale).launch(
            grid=[T, splits, (H + BH - 1) // BH],
            block=[THREADS, 1, 1],
            stream=stream,
            use_pdl=self.pdl,
        )

    @cute.jit
    def _slot(self, swa_addr, comp_addr, isz: cutlass.Constexpr, W, j0, end, tid):
        """The global slot of this thread's candidate of the tile starting at ``j0`` (thread ``tid``
        serves candidate ``j0 + tid / 4``), −1 past ``end``; ``swa_addr`` / ``comp_addr`` are the
        token's index rows, ``isz`` bytes per index. One predicated load without a branch: issued a
        tile before ``_gather`` needs it, so its latency stays off the tile's critical path."""
        j = j0 + tid // 4
        addr = swa_addr + Int64(j) * isz
        if const_expr(self.has_comp):
            addr = cutlass.select_(j < W, addr, comp_addr + Int64(j - W) * isz)
        return _ld_slot(addr, j < end, isz)

    @cute.jit
    def _gather(self, slot, swa_base, comp_base, swa_page, comp_page, swa_cap, comp_cap, W, j0, stage_base,
                valid_stage, buf, tid):
        """cp.async of the records of candidates ``j0 .. j0+63`` (this thread's: ``slot``, from
        ``_slot``) into staging buffer ``buf`` and their valid flags into ``valid_stage``: four threads
        per candidate, each copying every fourth of the record's 36 16-byte token chunks and the first
        one its 8 scale bytes; invalid candidates are not read."""
        c = tid // 4
        q = tid % 4
        is_swa = j0 + c < W
        ok = (slot >= 0) & (slot < cutlass.select_(is_swa, swa_cap, comp_cap))
        if q == 0:
            valid_stage[buf * BN + c] = Int32(ok)
        if ok:
            bs = Int64(self.swa_bs)
            base = swa_base
            page = swa_page
            if const_expr(self.has_comp):
                if not is_swa:
                    bs = Int64(self.comp_bs)
                    base = comp_base
                    page = comp_page
            page_off = base + (slot // bs) * page
            k = slot % bs
            src = page_off + k * TOKEN_BYTES + Int64(q * 16)
            dst = stage_base + Int32((buf * BN + c) * STAGE_REC + q * 16)
            for i in cutlass.range_constexpr((CHUNKS + 3) // 4):
                if const_expr(4 * i + 3 < CHUNKS):
                    _cp_async16(dst + Int32(64 * i), src + Int64(64 * i))
                else:
                    if 4 * i + q < CHUNKS:
                        _cp_async16(dst + Int32(64 * i), src + Int64(64 * i))
            if q == 0:
                _cp_async8(stage_base + Int32((buf * BN + c) * STAGE_REC + TOKEN_BYTES),
                           page_off + bs * TOKEN_BYTES + k * SCALE_BYTES)

    @cute.jit
    def _decode(self, stage_base, k_base, valid_stage, valid, buf, tid):
        """Staged tile → the bf16 ``[64, 512]`` K tile (zeros for invalid candidates) and ``valid``.
        Thread ``tid`` decodes 16-byte chunk ``tid % 8`` of every 64-dim block of candidates
        ``tid / 8`` and ``tid / 8 + 32``: the block (e4m3 or rope) is the same for the whole CTA at each
        step, and the 8 lanes of a quarter warp write one 128-byte row (no bank conflicts)."""
        ch = tid % 8
        for h in cutlass.range_constexpr(2):
            c = tid // 8 + 32 * h
            ok = valid_stage[buf * BN + c] != 0
            if ch == 0:
                valid[c] = Int32(ok)
            rec = stage_base + Int32((buf * BN + c) * STAGE_REC)
            for blk in cutlass.range_constexpr(D // 64):
                dst = k_base + Int32(_tile_offset(c, blk * 8 + ch))
                if const_expr(blk < NOPE // 64):
                    x0, x1 = _ld_shared_v2(rec + Int32(blk * 64 + ch * 8))
                    sb = Int32(cute.arch.inline_ptx("ld.shared.u8 {$w0}, [{$r0}];", write_only_types=[Uint32],
                                                    read_only_args=[rec + Int32(TOKEN_BYTES + blk)]))
                    w0, w1, w2, w3 = _e4m3x8_bf16(x0, x1, (sb << 23).bitcast(Float32))  # 2^(byte − 127)
                else:  # rope dims: bf16 as stored
                    w0, w1, w2, w3 = _ld_shared_v4(rec + Int32(NOPE + ch * 16))
                z = Uint32(0)
                _st_shared_v4(dst, cutlass.select_(ok, w0, z), cutlass.select_(ok, w1, z), cutlass.select_(ok, w2, z),
                              cutlass.select_(ok, w3, z))

    @cute.kernel
    def kernel(self, mQ, mSwa, mSwaIdx, mComp, mCompIdx, mSink, mOut, mPart, mM, mL, per_split: Int32,
               swa_cap: Int64, comp_cap: Int64, qk_scale: Float32):
        tid, _, _ = cute.arch.thread_idx()
        t, sp, hb = cute.arch.block_idx()
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
        k_layout = sm90.make_smem_layout_b(_ROW, (BH, BN, D), BFloat16, 1)  # (N = candidates, K = dims)
        v_layout = sm90.make_smem_layout_b(_COL, (BH, D, BN), BFloat16, 1)  # (N = dims, K = candidates)
        smem = cutlass.memory.SmemAllocator()
        # the 128-byte swizzle on the pointers (as wgmma descriptors want it); _tile_offset writes the
        # same bytes by hand
        sQ = smem.allocate_tensor(BFloat16, q_layout.outer, byte_alignment=1024, swizzle=q_layout.inner)
        sK = smem.allocate_tensor(BFloat16, k_layout.outer, byte_alignment=1024, swizzle=k_layout.inner)
        sV = cute.make_tensor(sK.iterator, v_layout.outer)  # the same bytes, read N-major by P·V
        stage = smem.allocate_tensor(Uint8, cute.make_layout(2 * BN * STAGE_REC), byte_alignment=128)
        valid_stage = smem.allocate_tensor(Int32, cute.make_layout(2 * BN), byte_alignment=16)
        valid = smem.allocate_tensor(Int32, cute.make_layout(BN), byte_alignment=16)
        p_layout = sm90.make_smem_layout_a(_ROW, (BH, DV, BN), BFloat16, 1)
        sP = smem.allocate_tensor(BFloat16, p_layout.outer, byte_alignment=1024, swizzle=p_layout.inner)
        red = smem.allocate_tensor(Float32, cute.make_layout(4 * BH), byte_alignment=16)  # [max | sum][wg][row]
        q_base = sQ.iterator.toint()
        k_base = sK.iterator.toint()
        stage_base = stage.iterator.toint()

        # ---- the CTA's candidates ----
        start = sp * per_split
        end = cutlass.min(start + per_split, W + K)
        n_tiles = (end - start + BN - 1) // BN
        isz = mSwaIdx.element_type.width // 8
        swa_addr = mSwaIdx.iterator.toint() + Int64(t) * Int64(mSwaIdx.stride[0]) * isz
        comp_addr = swa_addr
        if const_expr(self.has_comp):
            comp_addr = mCompIdx.iterator.toint() + Int64(t) * Int64(mCompIdx.stride[0]) * isz
        swa_base = mSwa.iterator.toint()
        comp_base = swa_base
        if const_expr(self.has_comp):
            comp_base = mComp.iterator.toint()
        swa_page = Int64(mSwa.stride[0])
        comp_page = swa_page
        if const_expr(self.has_comp):
            comp_page = Int64(mComp.stride[0])

        # ---- queries into shared memory with 16-byte cp.async (heads past H: zeros) ----
        h0 = hb * BH
        q_row0 = mQ.iterator.toint() + Int64(t) * Int64(mQ.stride[0]) * 2
        for i in cutlass.range_constexpr(BH * (D // 8) // THREADS):
            u = tid + i * THREADS
            r = u // (D // 8)
            ch = u % (D // 8)
            dst = q_base + Int32(_tile_offset(r, ch))
            if h0 + r < H:
                _cp_async16(dst, q_row0 + Int64(h0 + r) * Int64(mQ.stride[1]) * 2 + Int64(ch * 16))
            else:
                _st_shared_v4(dst, Uint32(0), Uint32(0), Uint32(0), Uint32(0))
        # tile 0's gather joins the queries' group; tile 1's slots are loaded now, used a tile later
        self._gather(self._slot(swa_addr, comp_addr, isz, W, start, end, tid), swa_base, comp_base, swa_page, comp_page,
                     swa_cap, comp_cap, W, start, stage_base, valid_stage, 0, tid)
        cute.arch.cp_async_commit_group()
        slot_next = self._slot(swa_addr, comp_addr, isz, W, start + BN, end, tid)

        # ---- MMAs ----
        # each warpgroup computes S for its half of the tile's candidates (SN of them); both read all of
        # P from shared memory
        qk_mma = sm90.make_trivial_tiled_mma(BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                             (1, 1, 1), (BH, SN))
        pv_mma = sm90.make_trivial_tiled_mma(BFloat16, BFloat16, OperandMajorMode.K, OperandMajorMode.MN, Float32,
                                             (1, 1, 1), (BH, DV))
        thr_qk = qk_mma.get_slice(wtid)
        thr_pv = pv_mma.get_slice(wtid)
        tSrQ = qk_mma.make_fragment_A(thr_qk.partition_A(sQ[None, None, 0]))
        tSrK = qk_mma.make_fragment_B(thr_qk.partition_B(cute.local_tile(sK[None, None, 0], (SN, D), (wg, 0))))
        tOrV = pv_mma.make_fragment_B(thr_pv.partition_B(cute.local_tile(sV[None, None, 0], (DV, BN), (wg, 0))))
        tOrP = pv_mma.make_fragment_A(thr_pv.partition_A(sP[None, None, 0]))
        acc_s = cute.make_rmem_tensor(thr_qk.partition_shape_C((BH, SN)), Float32)
        acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((BH, DV)), Float32)
        # (row, col) of each accumulator element: rows 16·warp + lane/4 (+8), columns 2·(lane%4) (+1) + 8·j
        cS = thr_qk.partition_C(cute.make_identity_tensor((BH, SN)))
        cO = thr_pv.partition_C(cute.make_identity_tensor((BH, DV)))
        acc_o.fill(0.0)
        m_i = cute.make_rmem_tensor(2, Float32)
        l_i = cute.make_rmem_tensor(2, Float32)
        for r in cutlass.range_constexpr(2):
            m_i[r] = Float32(NEG_BIG)
            l_i[r] = Float32(0.0)

        for it in cutlass.range(n_tiles):
            buf = it % 2
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()  # staging[buf] landed for all; the last P·V finished reading sK
            self._decode(stage_base, k_base, valid_stage, valid, buf, tid)
            # generic-proxy writes of sQ / sK made visible to wgmma (ptxas: MEMBAR.ALL.CTA +
            # FENCE.VIEW.ASYNC.S); the next tile's gather goes after it, into the other staging buffer
            cute.arch.fence_view_async_shared()
            cute.arch.sync_threads()
            if it + 1 < n_tiles:
                self._gather(slot_next, swa_base, comp_base, swa_page, comp_page, swa_cap, comp_cap, W,
                             start + (it + 1) * BN, stage_base, valid_stage, 1 - buf, tid)
            cute.arch.cp_async_commit_group()
            slot_next = self._slot(swa_addr, comp_addr, isz, W, start + (it + 2) * BN, end, tid)  # two tiles ahead

            # S = Q·Kᵀ
            warpgroup.fence()
            qk_mma.set(warpgroup.Field.ACCUMULATE, False)
            for kb in cutlass.range_constexpr(cute.size(tSrQ, mode=[2])):
                cute.gemm(qk_mma, acc_s, tSrQ[None, None, kb], tSrK[None, None, kb], acc_s)
                qk_mma.set(warpgroup.Field.ACCUMULATE, True)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

            _online_softmax(acc_s, acc_o, sP.iterator.toint(), red, m_i, l_i, cS, valid, qk_scale, wg, wtid)

            # O += P·V
            warpgroup.fence()
            pv_mma.set(warpgroup.Field.ACCUMULATE, True)
            for kb in cutlass.range_constexpr(cute.size(tOrP, mode=[2])):
                cute.gemm(pv_mma, acc_o, tOrP[None, None, kb], tOrV[None, None, kb], acc_o)
            warpgroup.commit_group()
            warpgroup.wait_group(0)

        cute.arch.cp_async_wait_group(0)  # no copy outlives the CTA (one without tiles: the queries')
        _finish(self.split, acc_o, m_i, l_i, cO, red, mSink, mOut, mPart, mM, mL, t, sp, h0, H, wg, wtid)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(swa_bs: int, comp_bs: int, has_comp: bool, split: bool, idx_dtype, pdl: bool, arch: str,
                extra_options: str = ""):
        """Compile one variant over fake tensors (no GPU needed): tokens, heads, widths, pages and
        strides are symbolic."""
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
        if split:
            S = cute.sym_int()
            part = mk(Float32, (T, S, H, D), stride=(cute.sym_int64(), cute.sym_int64(), D, 1), assumed_align=16)
            m = mk(Float32, (T, S, H), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
            l_ = mk(Float32, (T, S, H), stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
        kernel = SparseAttnKernel(swa_bs, comp_bs, has_comp, split, pdl)
        return cute.compile(
            kernel, q, swa, swa_idx, comp, comp_idx, sink, out, part, m, l_,
            Int32(64), Int64(1), Int64(1), Float32(1.0), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


@cute.jit
def _online_softmax(acc_s, acc_o, p_base, red, m_i, l_i, cS, valid, qk_scale, wg, wtid):
    """One tile's online softmax (base 2) for a warpgroup holding the scores of its half of the
    candidates (columns ``SN·wg ..``), on the thread's two rows (the four lanes of a quad share a row):
    scores of invalid candidates (``valid[col] == 0``) to −inf; the row maxima of both halves meet in
    ``red`` (one barrier); ``O`` rescaled; ``P`` to shared memory as bf16 in the swizzled K-major
    layout P·V reads (then a barrier: both halves written and visible to wgmma). ``l_i`` sums this
    half's columns only (``_finish`` adds the two)."""
    row_max = cute.make_rmem_tensor(2, Float32)
    for r in cutlass.range_constexpr(2):
        row_max[r] = m_i[r]
    for i in cutlass.range_constexpr(cute.size(acc_s)):
        r = (i // 2) % 2
        s = acc_s[i] * qk_scale
        if valid[cS[i][1] + wg * SN] == 0:
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
        _st_bf16x2("shared", p_base + Int32(_tile_offset(cS[i][0], col // 8) + (col % 8) * 2), p0, p1)
    if cute.arch.vote_any_sync((alpha[0] != Float32(1.0)) | (alpha[1] != Float32(1.0))):
        for i in cutlass.range_constexpr(cute.size(acc_o)):
            acc_o[i] = acc_o[i] * alpha[(i // 2) % 2]
    cute.arch.fence_view_async_shared()
    cute.arch.sync_threads()


@cute.jit
def _finish(split: cutlass.Constexpr, acc_o, m_i, l_i, cO, red, mSink, mOut, mPart, mM, mL, t, sp, h0, H, wg, wtid):
    """Row sums over the quad and both warpgroups' halves (through ``red``), then this CTA's fp32
    partials ``(acc, m, l)`` (split) or the output with the sink applied (bf16), written as pairs of
    value dims."""
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
    col0 = wg * DV
    if const_expr(split):
        n_split = mPart.shape[1]
        part_base = mPart.iterator.toint()
        for r in cutlass.range_constexpr(2):
            h = h0 + cO[2 * r][0]
            if h < H:
                row = part_base + ((Int64(t) * n_split + sp) * H + h) * (D * 4)
                for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
                    i = 4 * j + 2 * r
                    _st_global_v2_f32(row + Int64((col0 + cO[i][1]) * 4), acc_o[i], acc_o[i + 1])
                if wg == 0:
                    if wtid % 4 == 0:
                        mM[t, sp, h] = m_i[r]
                        mL[t, sp, h] = l_i[r]
    else:
        out_base = mOut.iterator.toint()
        for r in cutlass.range_constexpr(2):
            h = h0 + cO[2 * r][0]
            if h < H:
                sink = mSink[h] * Float32(LOG2E)
                m = cute.arch.fmax(m_i[r], sink)
                a = cute.math.exp2(m_i[r] - m, fastmath=True)
                den = l_i[r] * a + cute.math.exp2(sink - m, fastmath=True)
                inv = Float32(0.0)
                if den > Float32(0.0):
                    inv = Float32(1.0) / den
                f = a * inv
                row = out_base + (Int64(t) * H + h) * (D * 2)
                for j in cutlass.range_constexpr(cute.size(acc_o) // 4):
                    i = 4 * j + 2 * r
                    _st_bf16x2("global", row + Int64((col0 + cO[i][1]) * 2), acc_o[i] * f, acc_o[i + 1] * f)


def supports(q: torch.Tensor, swa_cache: torch.Tensor, comp_cache) -> bool:
    """Whether this kernel can run the call: a Hopper GPU (wgmma), and caches whose base and page
    stride allow 16-byte ``cp.async`` (every ``kv_insert``-made cache does; a view at an odd offset
    goes to the Triton kernel)."""
    if q.device.type != "cuda" or _capability(q.device)[0] != 9:
        return False
    for c in (swa_cache, comp_cache):
        if c is not None and c.numel() and (c.data_ptr() % 16 or c.stride(0) % 16 or c.stride(1) != 1):
            return False
    return True


def preferred(q: torch.Tensor) -> bool:
    """Whether the op takes this kernel over the Triton one (given ``supports``): from two (token,
    64-head block) CTAs on. H200, 64k context, CSA (640 candidates): V4-Flash B = 1 12.2 against
    11.0 µs (one token's 64 heads: the Triton kernel's 16-head programs fill the GPU better), V4-Pro
    B = 1 13.4 against 20.3 µs, V4-Flash B = 8 / 32 / 64 16.6 / 27.9 / 38.7 against 24.6 / 47.3 / 67.7 µs."""
    return q.shape[0] * cdiv(q.shape[1], BH) >= 2


def splits_for(T: int, H: int, n_cand: int, sms: int) -> tuple[int, int]:
    """(splits, candidates per split): one CTA per SM at most (its ~200 KB of shared memory), so the
    candidates of each (token, head block) split in as many whole 64-candidate tiles as leave no SM
    idle within one wave."""
    ctas = T * cdiv(H, BH)
    tiles = max(1, cdiv(n_cand, BN))
    splits = max(1, min(tiles, sms // max(ctas, 1)))
    per_split = cdiv(tiles, splits) * BN
    return max(1, cdiv(n_cand, per_split)), per_split


def sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale: float, swa_block_size: int,
                comp_block_size: int, splits: int | None = None, pdl: bool | None = None) -> torch.Tensor:
    """``kernels.triton.attention.sparse_attn``'s result from the wgmma kernel (``supports`` must hold).
    ``splits`` forces the number of candidate splits (tests); ``pdl``: programmatic dependent launch
    (default: as the package's Triton kernels, ``_launch.pdl_meta``)."""
    T, H, _ = q.shape
    out = torch.empty((T, H, D), dtype=torch.bfloat16, device=q.device)
    if T == 0:
        return out
    if q.stride(-1) != 1 or q.stride(0) % 8 or q.stride(1) % 8 or q.data_ptr() % 16:
        # 16-byte aligned rows for cp.async (a fresh tensor: .contiguous() keeps a misaligned view)
        q = torch.empty(q.shape, dtype=q.dtype, device=q.device).copy_(q)
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
    n_split, per_split = splits_for(T, H, W + K, sm_programs(q.device))
    if splits is not None:
        per_split = cdiv(cdiv(max(W + K, 1), splits), BN) * BN  # whole tiles
        n_split = max(1, cdiv(W + K, per_split))
    split = n_split > 1
    if pdl is None:
        pdl = pdl_meta(q.device.index) is not None
    part = m = l_ = None
    if split:
        part = torch.empty((T, n_split, H, D), dtype=torch.float32, device=q.device)
        m = torch.empty((T, n_split, H), dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
    compiled = SparseAttnKernel.compile(swa_block_size, comp_block_size if has_comp else 1, has_comp, split,
                                        TORCH_TO_CUTE[swa_indices.dtype], pdl, arch_name(q.device))
    compiled(q, swa_cache, swa_indices, comp_cache if has_comp else None, comp_indices if has_comp else None, sink,
             out, part, m, l_, per_split, swa_cache.shape[0] * swa_block_size,
             (comp_cache.shape[0] * comp_block_size) if has_comp else 0, scale * LOG2E, n_split)
    if split:
        _tattn.combine_splits(part, m, l_, sink, out)
    return out

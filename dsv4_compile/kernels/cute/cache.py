"""CuTe-DSL ``kv_insert`` / ``kv_rope_insert``: bf16 ``kv [T, 512]`` → the ``fp8_ds_mla`` paged record.

Bit-exact with ``reference.cache.kv_insert`` / ``kv_rope_insert`` (and so with the Triton kernel).
Layout: one warp per token, ``TOKENS_PER_CTA`` tokens per CTA; lane ``l`` owns dims ``16l .. 16l+15``
of the row (two 128-bit loads). Lanes 0-27 hold the 448 nope dims, four lanes per 64-block: the
block amax is a two-step butterfly, and each lane writes its 16 e4m3 bytes with one 128-bit store at
``k·576 + 16l`` in its page. Lanes 28-31 hold the 64 rope dims: rotated (``kv_rope_insert``) or
passed through, 32 bf16 bytes each as two 128-bit stores at ``k·576 + 448 + 32(l − 28)``. The seven
exponent bytes and the zero pad byte are OR-ed together across lanes by shuffles and written by lane
0 as one 64-bit store at ``bs·576 + k·8``. No shared memory, no 256-bit accesses (sm_100+ only), so
one source serves sm_90a and sm_100a.

Slots −1 and slots past the cache (``>= num_blocks·bs``) skip the whole token: no cache byte is
touched (its kv row is still read: the slot, kv and table loads are issued together). The 128-bit
stores need 16-byte aligned pages (``data_ptr`` and ``stride(0)`` multiples of 16; FlashMLA pages
are multiples of 576); ``supports`` says when, and the launcher falls back to the Triton kernel
otherwise.

Numerics (``_math``): RoPE products and sums are separately rounded ``mul.rn`` / ``add.rn`` in the
reference's order, rounded to bf16 (RNE); exponents from the fp32 bits of the floored amax; values
``x·2^-e`` → ``cvt.rn.satfinite.e4m3x2.f32`` (saturates to ±448; NaN stays NaN).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float32, Int32, Int64, Uint8, const_expr

from ... import layouts
from ...reference import quant as _ref_quant
from ._common import aligned, arch_name, fresh_copy
from ._math import TORCH_TO_CUTE, ceil_log2_ratio, e4m3x4, group_max, mul_rn, pow2, rope_pairs

ELEMS = 16  # kv elements per lane: 16 e4m3 bytes = one 128-bit store
WARP = 32
TOKENS_PER_CTA = 4  # one warp per token
TOKEN_BYTES = layouts.FP8_DS_MLA_TOKEN_BYTES  # 576
SCALE_BYTES = layouts.FP8_DS_MLA_SCALE_BYTES  # 8
NOPE_BLOCKS = layouts.KV_NOPE_BLOCKS  # 7
NOPE_LANES = layouts.KV_NOPE_DIM // ELEMS  # 28
BLOCK_LANES = layouts.KV_QUANT_BLOCK // ELEMS  # 4 lanes per 64-block
ROPE_DIM = layouts.ROPE_DIM  # 64
PAGE_ALIGN = 16  # bytes: page starts and strides the 128-bit stores need
FP8_MAX = layouts.FP8_E4M3_MAX

assert layouts.KV_HEAD_DIM == WARP * ELEMS and ROPE_DIM == (WARP - NOPE_LANES) * ELEMS
assert TOKEN_BYTES % PAGE_ALIGN == 0 and layouts.KV_NOPE_DIM % PAGE_ALIGN == 0


class KVInsertKernel:
    """Static configuration of one compiled variant; see ``compile`` for the cache key."""

    def __init__(self, block_size: int, rope: bool):
        self.block_size = block_size
        self.rope = rope

    @cute.jit
    def __call__(
        self,
        mKV: cute.Tensor,  # [T, 512] bf16, last stride 1
        mPos: Optional[cute.Tensor],  # [T] int32/int64 (RoPE) or None
        mCS: Optional[cute.Tensor],  # [max_pos, 64] fp32/bf16 [cos | sin] (RoPE) or None
        mCache: cute.Tensor,  # [num_blocks, page_bytes] uint8, 16-byte aligned pages
        mSlot: cute.Tensor,  # [T] int32/int64
        stream,
    ):
        assert mKV.element_type == BFloat16
        self.kernel(mKV, mPos, mCS, mCache, mSlot).launch(
            grid=[cute.ceil_div(mKV.shape[0], TOKENS_PER_CTA), 1, 1],
            block=[TOKENS_PER_CTA * WARP, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        mKV: cute.Tensor,
        mPos: Optional[cute.Tensor],
        mCS: Optional[cute.Tensor],
        mCache: cute.Tensor,
        mSlot: cute.Tensor,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % WARP
        t = bidx * TOKENS_PER_CTA + tidx // WARP
        bs = self.block_size
        # A token past T skips its warp. Its slot, kv row and (RoPE) table row are all loaded up
        # front, so the four loads overlap instead of waiting on the slot; then a −1 slot or a slot
        # past the cache skips the warp without a store (warp-uniform, so the shuffles below
        # always see all 32 lanes).
        if t < mKV.shape[0]:
            slot = Int64(mSlot[t])
            # ---- kv: 16 bf16 per lane, two 128-bit loads ----
            rKV = cute.make_rmem_tensor((ELEMS,), BFloat16)
            cute.autovec_copy(cute.local_tile(mKV[t, None], (ELEMS,), (lane,)), rKV)
            half = ELEMS // 2
            if const_expr(self.rope):
                rC = cute.make_rmem_tensor((half,), mCS.element_type)
                rS = cute.make_rmem_tensor((half,), mCS.element_type)
                # NaN cos/sin unless the position is a row of the table: an out-of-range position
                # (host checks bypassed) never reads outside it and stores NaN rope dims, never a
                # plausible rotation (as in the Triton kernel)
                rC.fill(float("nan"))
                rS.fill(float("nan"))
                if lane >= NOPE_LANES:
                    pos = Int64(mPos[t])
                    if pos >= 0:
                        if pos < Int64(mCS.shape[0]):
                            cs_row = mCS[pos, None]
                            chunk = lane - NOPE_LANES
                            cute.autovec_copy(cute.local_tile(cs_row, (half,), (chunk,)), rC)
                            cute.autovec_copy(cute.local_tile(cs_row, (half,), (chunk + ROPE_DIM // ELEMS,)), rS)

            if slot >= 0:
                if slot < Int64(mCache.shape[0]) * bs:
                    page = mCache[slot // bs, None]  # this page's bytes (row stride = cache.stride(0))
                    k = Int32(slot % bs)
                    x = cute.make_rmem_tensor((ELEMS,), Float32)
                    x.store(rKV.load().to(Float32))

                    # ---- FP8 e4m3 of the nope dims, one UE8M0 exponent per 4-lane 64-block ----
                    # (the rope lanes run the same shuffles, their exponent is discarded)
                    amax = cute.math.abs(x[0])
                    for i in cutlass.range_constexpr(1, ELEMS):
                        amax = cute.arch.fmax(amax, cute.math.abs(x[i]))
                    amax = cute.arch.fmax(group_max(amax, BLOCK_LANES), Float32(layouts.FP8_AMAX_FLOOR))
                    e = ceil_log2_ratio(amax, _ref_quant.FP8_MAX_EXP, _ref_quant.FP8_MAX_MANT)
                    inv = pow2(-e)

                    # ---- scale record: byte b (b < 7) = e_b + 127, byte 7 = 0; two words OR-ed
                    # over the 4 blocks of each half warp, word 1 brought to lane 0 ----
                    byte = cutlass.select_(lane < NOPE_LANES, e + layouts.UE8M0_BIAS, Int32(0))
                    word = byte << (8 * ((lane // BLOCK_LANES) % 4))
                    word = word | cute.arch.shuffle_sync_bfly(word, offset=BLOCK_LANES)
                    word = word | cute.arch.shuffle_sync_bfly(word, offset=2 * BLOCK_LANES)
                    word_hi = cute.arch.shuffle_sync_bfly(word, offset=WARP // 2)

                    if lane < NOPE_LANES:
                        # 16 e4m3 bytes: one 128-bit store at k·576 + 16·lane
                        words = cute.make_rmem_tensor((ELEMS // 4,), Int32)
                        for j in cutlass.range_constexpr(ELEMS // 4):
                            # no clamp: the cast's .satfinite saturates to ±448 exactly as a clamp
                            # would, and keeps NaN NaN (a clamp would turn it into a plausible -448)
                            v = [mul_rn(x[4 * j + m], inv) for m in range(4)]
                            words[j] = e4m3x4(v[0], v[1], v[2], v[3]).bitcast(Int32)
                        gNope = cute.local_tile(page, (ELEMS,), (k * (TOKEN_BYTES // ELEMS) + lane,))
                        cute.autovec_copy(words, cute.recast_tensor(gNope, Int32))
                        if lane == 0:
                            # the 8-byte scale record: one 64-bit store at bs·576 + k·8
                            rScale = cute.make_rmem_tensor((2,), Int32)
                            rScale[0] = word
                            rScale[1] = word_hi
                            gScale = cute.local_tile(page, (SCALE_BYTES,), (bs * (TOKEN_BYTES // SCALE_BYTES) + k,))
                            cute.autovec_copy(rScale, cute.recast_tensor(gScale, Int32))
                    else:
                        # ---- rope dims: 16 bf16 per lane, rotated in fp32 (rounded to bf16) or
                        # passed through; two 128-bit stores at k·576 + 448 + 32·(lane − 28) ----
                        rOut = rKV
                        if const_expr(self.rope):
                            c = cute.make_rmem_tensor((half,), Float32)
                            s = cute.make_rmem_tensor((half,), Float32)
                            c.store(rC.load().to(Float32))
                            s.store(rS.load().to(Float32))
                            rope_pairs(x, c, s, half)
                            rOut = cute.make_rmem_tensor((ELEMS,), BFloat16)
                            rOut.store(x.load().to(BFloat16))
                        rope_tile = k * (TOKEN_BYTES // (2 * ELEMS)) + layouts.KV_NOPE_DIM // (2 * ELEMS)
                        gRope = cute.local_tile(page, (2 * ELEMS,), (rope_tile + lane - NOPE_LANES,))
                        cute.autovec_copy(rOut, cute.recast_tensor(gRope, BFloat16))

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(block_size: int, rope: bool, slot_dtype, pos_dtype, cs_dtype, arch: str, extra_options: str = ""):
        """Compile one variant over fake tensors (no GPU needed): tokens, table rows, pages and page
        bytes are symbolic; strides carry the divisibility the 128-bit accesses rely on.
        ``pos_dtype`` / ``cs_dtype`` are ignored without RoPE. ``extra_options`` (e.g. ``--keep-ptx
        --dump-dir D``) is for the compile check."""
        tokens = cute.sym_int()
        mk = cute.runtime.make_fake_tensor
        kv_div = 128 // BFloat16.width
        kv = mk(BFloat16, (tokens, layouts.KV_HEAD_DIM), stride=(cute.sym_int64(divisibility=kv_div), 1),
                assumed_align=16)
        cache = mk(Uint8, (cute.sym_int(), cute.sym_int()), stride=(cute.sym_int64(divisibility=PAGE_ALIGN), 1),
                   assumed_align=PAGE_ALIGN)
        slots = mk(slot_dtype, (tokens,), stride=(1,), assumed_align=slot_dtype.width // 8)
        pos = cs = None
        if rope:
            cs_div = math.gcd(128 // cs_dtype.width, ROPE_DIM // 2)
            pos = mk(pos_dtype, (tokens,), stride=(1,), assumed_align=pos_dtype.width // 8)
            cs = mk(cs_dtype, (cute.sym_int(), ROPE_DIM), stride=(cute.sym_int64(divisibility=cs_div), 1),
                    assumed_align=cs_div * cs_dtype.width // 8)
        kernel = KVInsertKernel(block_size, rope)
        return cute.compile(
            kernel, kv, pos, cs, cache, slots,
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def supports(kv: torch.Tensor, cos_sin_cache: Optional[torch.Tensor], kv_cache: torch.Tensor) -> bool:
    """Whether these inputs take the CuTe kernel (else the Triton one): bf16 ``[T, 512]`` rows, a
    64-wide fp32/bf16 table, and 16-byte aligned cache pages (the 128-bit record stores)."""
    return (
        kv.dtype == torch.bfloat16 and kv.dim() == 2 and kv.shape[1] == layouts.KV_HEAD_DIM
        and (cos_sin_cache is None
             or (cos_sin_cache.dtype in (torch.float32, torch.bfloat16) and cos_sin_cache.shape[-1] == ROPE_DIM))
        and kv_cache.dtype == torch.uint8 and kv_cache.dim() == 2
        and (kv_cache.shape[1] <= 1 or kv_cache.stride(1) == 1)
        and aligned(kv_cache, PAGE_ALIGN, (0,))
    )


def kv_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size: int) -> None:
    """``kv_insert`` (``positions is None``) or ``kv_rope_insert`` into ``kv_cache`` in place, as the
    Triton ``kernels.triton.cache.kv_insert`` (to which it falls back when ``supports`` says no)."""
    rope = positions is not None
    if not supports(kv, cos_sin_cache if rope else None, kv_cache):
        from ..triton import cache as _triton

        _triton.kv_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)
        return
    if kv.shape[0] == 0 or kv_cache.shape[0] == 0:
        return
    kv_div = 128 // (8 * kv.element_size())
    if kv.stride(1) != 1 or not aligned(kv, kv_div, (0,)):
        kv = fresh_copy(kv)
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    cs = None
    if rope:
        cs_div = math.gcd(128 // (8 * cos_sin_cache.element_size()), ROPE_DIM // 2)
        cs = cos_sin_cache
        if cs.stride(-1) != 1 or not aligned(cs, cs_div, (0,)):
            cs = fresh_copy(cs)
        if positions.stride(0) != 1:
            positions = positions.contiguous()
    compiled = KVInsertKernel.compile(
        block_size, rope, TORCH_TO_CUTE[slot_mapping.dtype],
        TORCH_TO_CUTE[positions.dtype] if rope else None, TORCH_TO_CUTE[cs.dtype] if rope else None,
        arch_name(kv.device),
    )
    compiled(kv, positions, cs, kv_cache, slot_mapping)

"""CuTe-DSL fused lightning-indexer query kernel: RoPE → round → [Hadamard → round] → FP8 or MXFP4 → weights.

Bit-exact with ``reference.indexer_q_rope_{fp8,mxfp4}`` (and so with the Triton kernel). Layout: a
CTA handles one token and ``heads_per_cta`` heads; each (token, head) row of ``D`` elements is split
over ``D / 16`` consecutive lanes of one warp, 16 elements per lane. A lane reads its 16 q values with
128-bit loads (two for bf16), its cos/sin halves with 128-bit loads, and writes its 16 FP8 bytes with
one 128-bit store (MXFP4: 8 packed bytes, one 64-bit store). The Hadamard stages inside a lane's 16
elements run in registers, the wider ones and the amax reductions through butterfly shuffles among
the row's lanes. No 256-bit accesses (sm_100+ only), so one source serves sm_90a and sm_100a; only
the E2M1 conversion differs (software round-to-nearest-even on sm_90a, ``cvt.*.e2m1x2`` on sm_100a).

Numerics: every fp32 product and sum the reference rounds separately is an explicitly rounded
``mul.rn`` / ``add.rn`` (PTX never contracts ``.rn`` operations into an FMA), in the reference's
order; scale exponents come from fp32 bits (``reference.quant``); the FP8 cast is
``cvt.rn.satfinite.e4m3x2.f32`` after the clamp (the helpers shared with the other kernels: ``_math``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import cutlass
import cutlass.cute as cute
import torch
from cutlass import Float32, Int32, Int64, Uint8, Uint32, const_expr

from ... import layouts
from ...reference import quant as _ref_quant
from ._common import aligned, arch_name, fresh_copy, use_hw_e2m1
from ._math import (TORCH_TO_CUTE, add_rn, ceil_log2_ratio, clamp, e4m3x4, group_any, group_max, mul_rn,
                    pow2, rope_pairs, sub_rn)

ELEMS = 16  # q elements per lane: 16 FP8 bytes = one 128-bit store
THREADS = 128  # per CTA
FP8_MAX = layouts.FP8_E4M3_MAX
E2M1_MAX = layouts.E2M1_MAX


# ---------------------------------------------------------------------------------------------
# E2M1 conversions (the shared bit-exact helpers live in ``_math``)
# ---------------------------------------------------------------------------------------------
def _e2m1x2_hw(lo, hi):
    """sm_100+: ``cvt.rn.satfinite.e2m1x2.f32``; ``lo`` in the low nibble of the returned byte."""
    return cute.arch.inline_ptx(
        "{ .reg .b8 t; cvt.rn.satfinite.e2m1x2.f32 t, {$r1}, {$r0}; cvt.u32.u8 {$w0}, t; }",
        write_only_types=[Uint32],
        read_only_args=[lo, hi],
    )


def _e2m1_code_sw(v):
    """E2M1 nibble of fp32 ``v`` (|v| <= 6): round-to-nearest-even, sign from the sign bit
    (``reference.quant.e2m1_codes``). Same piecewise form as the Triton kernel's: the exact argument
    rne(2a) / rne(a - 2) / rne(a/2 - 2) is rounded by adding 2^23 + base (base 0 / 4 / 6) and the code
    read from the low mantissa bits."""
    a = cute.math.abs(v)
    lo2 = a < Float32(2.0)
    lo4 = a < Float32(4.0)
    t = Float32(cutlass.select_(lo2, mul_rn(a, Float32(2.0)), cutlass.select_(
        lo4, sub_rn(a, Float32(2.0)), sub_rn(mul_rn(a, Float32(0.5)), Float32(2.0)))))
    magic = Float32(cutlass.select_(lo2, Float32(8388608.0),
                                    cutlass.select_(lo4, Float32(8388612.0), Float32(8388614.0))))
    code = Float32(add_rn(t, magic)).bitcast(Int32) & 7
    sign = (v.bitcast(Int32) >> 31) & 1
    return code | (sign << 3)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
class IndexerQKernel:
    """Static configuration of one compiled variant; see ``compile`` for the cache key."""

    def __init__(
        self,
        q_dtype,
        num_heads: int,
        head_dim: int,
        rope_dim: int,
        mxfp4: bool,
        hadamard: bool,
        hw_e2m1: bool,
    ):
        assert supported_dims(head_dim, rope_dim), (head_dim, rope_dim)
        self.q_dtype = q_dtype
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.mxfp4 = mxfp4
        self.hadamard = hadamard
        self.hw_e2m1 = hw_e2m1 and mxfp4
        self.lanes_per_row = head_dim // ELEMS
        self.heads_per_cta = min(THREADS // self.lanes_per_row, 1 << (num_heads - 1).bit_length())
        self.num_threads = self.heads_per_cta * self.lanes_per_row
        self.nope_lanes = (head_dim - rope_dim) // ELEMS
        self.hadamard_scale = head_dim**-0.5  # rounded to fp32 when traced, as the reference's scalar

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [T, H, D] q dtype, last stride 1
        mPos: cute.Tensor,  # [T] int32/int64
        mCS: cute.Tensor,  # [max_pos, R] fp32/bf16 [cos | sin]
        mW: cute.Tensor,  # [T, H] any float dtype, any strides
        mOut: cute.Tensor,  # int32 words: FP8 [T, H, D/4] (4 e4m3 bytes), MXFP4 [T, H, D/8] (8 nibbles)
        mScale: Optional[cute.Tensor],  # MXFP4: [T, H, D/32] UE8M0 bytes; FP8: None
        mWOut: cute.Tensor,  # [T, H] fp32
        weight_scale: Float32,
        stream,
    ):
        assert mQ.element_type == self.q_dtype
        self.kernel(mQ, mPos, mCS, mW, mOut, mScale, mWOut, weight_scale).launch(
            grid=[mQ.shape[0], cute.ceil_div(self.num_heads, self.heads_per_cta), 1],
            block=[self.num_threads, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mPos: cute.Tensor,
        mCS: cute.Tensor,
        mW: cute.Tensor,
        mOut: cute.Tensor,
        mScale: Optional[cute.Tensor],
        mWOut: cute.Tensor,
        weight_scale: Float32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        t, head_block, _ = cute.arch.block_idx()
        lane = tidx % self.lanes_per_row
        h = head_block * self.heads_per_cta + tidx // self.lanes_per_row
        # Rows past the last head load the last head's row (all lanes of a row must take part in
        # the shuffles) and store nothing.
        h_ld = h
        if const_expr(self.num_heads % self.heads_per_cta != 0):
            h_ld = cutlass.min(h, self.num_heads - 1)

        # ---- q: 16 elements per lane, 128-bit loads ----
        rQ = cute.make_rmem_tensor((ELEMS,), self.q_dtype)
        cute.autovec_copy(cute.local_tile(mQ[t, h_ld, None], (ELEMS,), (lane,)), rQ)
        x = cute.make_rmem_tensor((ELEMS,), Float32)
        x.store(rQ.load().to(Float32))

        # ---- RoPE on the trailing rope_dim dims, (even, odd) pairs, fp32 ----
        half = ELEMS // 2
        rC = cute.make_rmem_tensor((half,), mCS.element_type)
        rS = cute.make_rmem_tensor((half,), mCS.element_type)
        if lane >= self.nope_lanes:
            # an out-of-range position never reads outside the table; its rotated dims come out NaN
            # (never a plausible rotation), as in the Triton kernel
            rC.fill(float("nan"))
            rS.fill(float("nan"))
            pos = Int64(mPos[t])
            if pos >= 0:
                if pos < Int64(mCS.shape[0]):
                    cs_row = mCS[pos, None]
                    chunk = lane - self.nope_lanes
                    cute.autovec_copy(cute.local_tile(cs_row, (half,), (chunk,)), rC)
                    cute.autovec_copy(cute.local_tile(cs_row, (half,), (chunk + self.rope_dim // ELEMS,)), rS)
            c = cute.make_rmem_tensor((half,), Float32)
            s = cute.make_rmem_tensor((half,), Float32)
            c.store(rC.load().to(Float32))
            s.store(rS.load().to(Float32))
            rope_pairs(x, c, s, half)
            # round to the input dtype before any amax (docs/numerics.md §3.3)
            if const_expr(self.q_dtype is not Float32):
                x.store(x.load().to(self.q_dtype).to(Float32))

        # ---- optional Hadamard: Sylvester butterflies, stage h = 1, 2, 4, ... as the reference ----
        if const_expr(self.hadamard):
            for stage in cutlass.range_constexpr(ELEMS.bit_length() - 1):  # inside the lane's registers
                hstep = 1 << stage
                for base in cutlass.range_constexpr(0, ELEMS, 2 * hstep):
                    for j in cutlass.range_constexpr(hstep):
                        a = x[base + j]
                        b = x[base + j + hstep]
                        x[base + j] = add_rn(a, b)
                        x[base + j + hstep] = sub_rn(a, b)
            for stage in cutlass.range_constexpr(self.lanes_per_row.bit_length() - 1):  # across lanes
                lane_step = 1 << stage  # partner lane = lane ^ lane_step holds element k ± 16·lane_step
                upper = (lane & lane_step) != 0
                for i in cutlass.range_constexpr(ELEMS):
                    own = x[i]
                    other = cute.arch.shuffle_sync_bfly(own, offset=lane_step)
                    if upper:
                        x[i] = sub_rn(other, own)  # (a, b) = (partner, own) → a − b
                    else:
                        x[i] = add_rn(own, other)
            for i in cutlass.range_constexpr(ELEMS):
                x[i] = mul_rn(x[i], Float32(self.hadamard_scale))
            if const_expr(self.q_dtype is not Float32):
                x.store(x.load().to(self.q_dtype).to(Float32))

        w = mul_rn(mW[t, h_ld].to(Float32), weight_scale)
        amax = cute.math.abs(x[0])
        for i in cutlass.range_constexpr(1, ELEMS):
            amax = cute.arch.fmax(amax, cute.math.abs(x[i]))

        if const_expr(not self.mxfp4):
            # ---- FP8 e4m3, one UE8M0 scale per (token, head), folded into the weights ----
            amax = cute.arch.fmax(group_max(amax, self.lanes_per_row), Float32(layouts.FP8_AMAX_FLOOR))
            e = ceil_log2_ratio(amax, _ref_quant.FP8_MAX_EXP, _ref_quant.FP8_MAX_MANT)
            inv = pow2(-e)
            words = cute.make_rmem_tensor((ELEMS // 4,), Int32)
            for j in cutlass.range_constexpr(ELEMS // 4):
                # no clamp: the cast's .satfinite saturates to ±448 as a clamp would and keeps NaN
                v = [mul_rn(x[4 * j + m], inv) for m in range(4)]
                words[j] = e4m3x4(v[0], v[1], v[2], v[3]).bitcast(Int32)
            if h < self.num_heads:
                cute.autovec_copy(words, cute.local_tile(mOut[t, h, None], (ELEMS // 4,), (lane,)))
                if lane == 0:
                    mWOut[t, h] = mul_rn(w, pow2(e))
        else:
            # ---- MXFP4: 32-element blocks (2 lanes), E2M1 nibbles, UE8M0 byte per block ----
            block_lanes = layouts.MXFP4_BLOCK // ELEMS
            amax = cute.arch.fmax(group_max(amax, block_lanes), Float32(layouts.MXFP4_AMAX_FLOOR))
            e = ceil_log2_ratio(amax, _ref_quant.E2M1_MAX_EXP, _ref_quant.E2M1_MAX_MANT)
            e = cutlass.max(cutlass.min(e, layouts.MXFP4_EXP_MAX), layouts.MXFP4_EXP_MIN)
            # a block holding a NaN (the fmax above skips it) gets the E8M0 NaN scale byte: it dequantizes
            # to NaN, never to a plausible value (E2M1 has no NaN; the NaN's nibble is whatever the clamp
            # makes of it)
            nan = Int32(0)
            for i in cutlass.range_constexpr(ELEMS):
                nan = nan | Int32(x[i] != x[i])
            nan = group_any(nan, block_lanes)
            inv = pow2(-e)
            words = cute.make_rmem_tensor((ELEMS // 8,), Int32)
            for j in cutlass.range_constexpr(ELEMS // 8):
                word = Int32(0)
                for m in cutlass.range_constexpr(4):
                    lo = clamp(mul_rn(x[8 * j + 2 * m], inv), E2M1_MAX)
                    hi = clamp(mul_rn(x[8 * j + 2 * m + 1], inv), E2M1_MAX)
                    if const_expr(self.hw_e2m1):
                        byte = _e2m1x2_hw(lo, hi).bitcast(Int32)
                    else:
                        byte = _e2m1_code_sw(lo) | (_e2m1_code_sw(hi) << 4)
                    word = word | (byte << (8 * m))
                words[j] = word
            if h < self.num_heads:
                cute.autovec_copy(words, cute.local_tile(mOut[t, h, None], (ELEMS // 8,), (lane,)))
                if lane % block_lanes == 0:
                    mScale[t, h, lane // block_lanes] = Uint8(cutlass.select_(nan != 0, Int32(0xFF),
                                                                              e + layouts.UE8M0_BIAS))
                if lane == 0:
                    mWOut[t, h] = w

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def compile(
        q_dtype,
        pos_dtype,
        cs_dtype,
        w_dtype,
        num_heads: int,
        head_dim: int,
        rope_dim: int,
        mxfp4: bool,
        hadamard: bool,
        arch: str,
        hw_e2m1: bool,
        extra_options: str = "",
    ):
        """Compile one variant over fake tensors (no GPU needed): tokens and table rows are
        symbolic, strides carry the divisibility the 128-bit accesses rely on. ``extra_options``
        (e.g. ``--keep-ptx --dump-dir D``) is for the compile check."""
        tokens = cute.sym_int()
        table_rows = cute.sym_int()
        q_div = math.gcd(128 // q_dtype.width, head_dim)
        cs_div = math.gcd(128 // cs_dtype.width, rope_dim // 2)
        mk = cute.runtime.make_fake_tensor
        q = mk(q_dtype, (tokens, num_heads, head_dim),
               stride=(cute.sym_int64(divisibility=q_div), cute.sym_int64(divisibility=q_div), 1),
               assumed_align=q_div * q_dtype.width // 8)
        pos = mk(pos_dtype, (tokens,), stride=(1,), assumed_align=pos_dtype.width // 8)
        cs = mk(cs_dtype, (table_rows, rope_dim), stride=(cute.sym_int64(divisibility=cs_div), 1),
                assumed_align=cs_div * cs_dtype.width // 8)
        w = mk(w_dtype, (tokens, num_heads), stride=(cute.sym_int64(), cute.sym_int64()),
               assumed_align=w_dtype.width // 8)
        words = head_dim // (8 if mxfp4 else 4)
        out = mk(Int32, (tokens, num_heads, words), stride=(num_heads * words, words, 1), assumed_align=16)
        nb = head_dim // layouts.MXFP4_BLOCK
        scale = mk(Uint8, (tokens, num_heads, nb), stride=(num_heads * nb, nb, 1), assumed_align=4) if mxfp4 else None
        w_out = mk(Float32, (tokens, num_heads), stride=(num_heads, 1), assumed_align=4)
        kernel = IndexerQKernel(q_dtype, num_heads, head_dim, rope_dim, mxfp4, hadamard, hw_e2m1)
        return cute.compile(
            kernel, q, pos, cs, w, out, scale, w_out, Float32(0.0),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True),
            options=f"--enable-tvm-ffi --gpu-arch {arch} {extra_options}".strip(),
        )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def supported_dims(head_dim: int, rope_dim: int) -> bool:
    """Shapes this kernel covers: a row is 2..32 lanes of 16 elements (D in 32..512, a power of two)
    and the rotated tail starts and ends on a lane boundary."""
    lanes = head_dim // ELEMS
    return (
        head_dim % ELEMS == 0 and 2 <= lanes <= 32 and lanes & (lanes - 1) == 0
        and rope_dim % ELEMS == 0 and 0 < rope_dim <= head_dim
    )


def supports(q: torch.Tensor, cos_sin_cache: torch.Tensor) -> bool:
    """Whether these inputs take the CuTe kernel (else the Triton one)."""
    return (
        q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and cos_sin_cache.dtype in (torch.float32, torch.bfloat16)
        and supported_dims(q.shape[-1], cos_sin_cache.shape[-1])
    )


def _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, mxfp4, out, scale, w_out):
    t, h, d = q.shape
    if t == 0 or h == 0:
        return
    rot = cos_sin_cache.shape[-1]
    q_div = math.gcd(128 // (8 * q.element_size()), d)
    if q.stride(-1) != 1 or not aligned(q, q_div, (0, 1)):
        q = fresh_copy(q)
    cs_div = math.gcd(128 // (8 * cos_sin_cache.element_size()), rot // 2)
    cs = cos_sin_cache
    if cs.stride(-1) != 1 or not aligned(cs, cs_div, (0,)):
        cs = fresh_copy(cs)
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    arch = arch_name(q.device)
    compiled = IndexerQKernel.compile(
        TORCH_TO_CUTE[q.dtype], TORCH_TO_CUTE[positions.dtype], TORCH_TO_CUTE[cs.dtype],
        TORCH_TO_CUTE[weights.dtype], h, d, rot, mxfp4, hadamard, arch, mxfp4 and use_hw_e2m1(arch),
    )
    compiled(q, positions, cs, weights, out.view(torch.int32), scale, w_out, float(weight_scale))


def indexer_q_rope_fp8(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False):
    """As ``dsv4::indexer_q_rope_fp8``: ``(q_fp8 e4m3 [T, H, D], weights_out fp32 [T, H])``."""
    if not supports(q, cos_sin_cache):
        from ..triton import indexer_q as _triton

        return _triton.indexer_q_rope_fp8(q, positions, cos_sin_cache, weights, weight_scale, hadamard)
    t, h, d = q.shape
    q_fp8 = torch.empty((t, h, d), dtype=torch.float8_e4m3fn, device=q.device)
    w_out = torch.empty((t, h), dtype=torch.float32, device=q.device)
    _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, False,
            q_fp8.view(torch.uint8), None, w_out)
    return q_fp8, w_out


def indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale: float, hadamard: bool = False):
    """As ``dsv4::indexer_q_rope_mxfp4``: ``(packed uint8 [T, H, D/2], scale uint8 [T, H, D/32],
    weights_out fp32 [T, H])``."""
    if not supports(q, cos_sin_cache):
        from ..triton import indexer_q as _triton

        return _triton.indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale, hadamard)
    t, h, d = q.shape
    packed = torch.empty((t, h, d // 2), dtype=torch.uint8, device=q.device)
    scale = torch.empty((t, h, d // layouts.MXFP4_BLOCK), dtype=torch.uint8, device=q.device)
    w_out = torch.empty((t, h), dtype=torch.float32, device=q.device)
    _launch(q, positions, cos_sin_cache, weights, weight_scale, hadamard, True, packed, scale, w_out)
    return packed, scale, w_out

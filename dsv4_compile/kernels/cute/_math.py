"""Bit-exact scalar building blocks shared by the CuTe-DSL kernels (trace-time helpers, inlined).

Every fp32 product and sum the reference rounds separately is an explicitly rounded ``mul.rn`` /
``add.rn`` (PTX never contracts ``.rn`` operations into an FMA); scale exponents come from fp32
bits (``reference.quant``). The FP8 cast is ``cvt.rn.satfinite.e4m3x2.f32`` with no clamp before
it: it saturates finite values to ±448 and keeps NaN (e4m3 0x7F / 0xFF). The MXFP4 path still
clamps to ±6 (``clamp``) before its E2M1 encoding.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import torch
from cutlass import BFloat16, Float8E4M3FN, Float16, Float32, Int32, Int64, Uint32
from cutlass.cute.nvgpu import OperandMajorMode
from cutlass.utils import hopper_helpers as sm90

TORCH_TO_CUTE = {
    torch.bfloat16: BFloat16,
    torch.float16: Float16,
    torch.float32: Float32,
    torch.int32: Int32,
    torch.int64: Int64,
}

_RN = cute.RoundingMode.NEAREST_EVEN


def mul_rn(a, b):
    return cute.math.mul(a, b, rounding=_RN)


def add_rn(a, b):
    return cute.math.add(a, b, rounding=_RN)


def sub_rn(a, b):
    # a − b rounded once: negation is exact, so this is sub.rn
    return cute.math.add(a, -b, rounding=_RN)


def ceil_log2_ratio(amax, max_exp: int, max_mant: int):
    """``reference.quant.ceil_log2_ratio`` on one fp32 normal."""
    bits = amax.bitcast(Int32)
    exp = ((bits >> 23) & 0xFF) - 127
    return exp - max_exp + cutlass.select_((bits & 0x7FFFFF) > max_mant, Int32(1), Int32(0))


def pow2(e):
    """fp32 ``2^e`` from its bits (``reference.quant.pow2``)."""
    return ((e + 127) << 23).bitcast(Float32)


def clamp(v, bound: float):
    return cute.arch.fmin(cute.arch.fmax(v, Float32(-bound)), Float32(bound))


def e4m3x4(a, b, c, d):
    """Four fp32 → four e4m3 bytes (RNE, saturating) packed in a word, ``a`` in the low byte."""
    return cute.arch.inline_ptx(
        "{ .reg .b16 lo, hi;"
        " cvt.rn.satfinite.e4m3x2.f32 lo, {$r1}, {$r0};"
        " cvt.rn.satfinite.e4m3x2.f32 hi, {$r3}, {$r2};"
        " mov.b32 {$w0}, {lo, hi}; }",
        write_only_types=[Uint32],
        read_only_args=[a, b, c, d],
    )


def visible_entries(req, pos, n_req, ratio, L):
    """(whether the token is real, its visible entries) of a token of request ``req`` at position
    ``pos`` (Int64): ``min((pos + 1) // ratio, L)``, 0 for a padding token (request outside
    ``[0, n_req)`` or a negative position); docs/numerics.md §7.2."""
    ok = (req >= 0) & (req < n_req) & (pos >= 0)
    return ok, cutlass.select_(ok, cutlass.min((pos + 1) // Int64(ratio), Int64(L)), Int64(0))


def _group_reduce(v, lanes: int, combine):
    """``combine`` of ``v`` over ``lanes`` consecutive lanes (a power of two, aligned group), by
    butterfly shuffles: every lane of the group ends with the result."""
    off = 1
    while off < lanes:
        v = combine(v, cute.arch.shuffle_sync_bfly(v, offset=off))
        off *= 2
    return v


def group_any(flag, lanes: int):
    """Int32 ``flag`` (0 / 1) OR-ed over ``lanes`` consecutive lanes (``_group_reduce``)."""
    return _group_reduce(flag, lanes, lambda a, b: a | b)


def group_max(v, lanes: int):
    """Max of ``v`` over ``lanes`` consecutive lanes (``_group_reduce``)."""
    return _group_reduce(v, lanes, cute.arch.fmax)


def rope_pairs(x, c, s, pairs: int):
    """GPT-J rotation of the fp32 register pairs ``(x[2k], x[2k+1])``, ``k < pairs``, by fp32
    ``c[k], s[k]``, in place: ``(xe·c − xo·s, xe·s + xo·c)``, every product and sum rounded once
    (``reference.rope``)."""
    for k in range(pairs):
        xe = x[2 * k]
        xo = x[2 * k + 1]
        x[2 * k] = sub_rn(mul_rn(xe, c[k]), mul_rn(xo, s[k]))
        x[2 * k + 1] = add_rn(mul_rn(xe, s[k]), mul_rn(xo, c[k]))


def e4m3_wgmma(sA, sB, wtid, m: int, n: int):
    """An ``m x n`` e4m3 wgmma tile (Hopper; both operands K-major in shared memory, ``sA`` ``[m, K,
    ...]`` and ``sB`` ``[n, K, ...]`` in wgmma's swizzled layouts), for warpgroup thread ``wtid``: (tiled
    MMA, the A and B fragments, an fp32 accumulator, the (row, column) of each accumulator element)."""
    mma = sm90.make_trivial_tiled_mma(Float8E4M3FN, Float8E4M3FN, OperandMajorMode.K, OperandMajorMode.K,
                                      Float32, (1, 1, 1), (m, n))
    thr = mma.get_slice(wtid)
    frag_a = mma.make_fragment_A(thr.partition_A(sA))
    frag_b = mma.make_fragment_B(thr.partition_B(sB))
    acc = cute.make_rmem_tensor(thr.partition_shape_C((m, n)), Float32)
    return mma, frag_a, frag_b, acc, thr.partition_C(cute.make_identity_tensor((m, n)))

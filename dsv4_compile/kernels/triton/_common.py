"""Triton building blocks shared by the dsv4 kernels, each bit-exact with ``dsv4_compile.reference``.

* ``ceil_log2_ratio`` / ``pow2``: UE8M0 exponents from fp32 bits (no log2, no division).
* ``fp8_quant_rows``: the UE8M0 FP8 quantization of one block per row (``fp8_block_quant``).
* ``e2m1_code_sw``: software E2M1 round-to-nearest-even (Hopper has no ``cvt.*.e2m1x2``).
* ``e2m1x2_hw``: the sm_100 hardware conversion, used only behind an arch check.
* ``rope_pairs``: the RoPE rotation on (even, odd) pairs.
* ``fwht``: the Sylvester butterfly in the reference's stage order.

Kernels that use these are launched with ``enable_fp_fusion=False``: the reference rounds every
fp32 product and sum separately, and an FMA would round once (and break bit-exactness).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ... import layouts
from ...reference import quant as _ref_quant
from .. import _device

# jit code reads module globals only as tl.constexpr instances
FP8_MAX = tl.constexpr(layouts.FP8_E4M3_MAX)
FP8_MAX_EXP = tl.constexpr(_ref_quant.FP8_MAX_EXP)
FP8_MAX_MANT = tl.constexpr(_ref_quant.FP8_MAX_MANT)
E2M1_MAX_EXP = tl.constexpr(_ref_quant.E2M1_MAX_EXP)
E2M1_MAX_MANT = tl.constexpr(_ref_quant.E2M1_MAX_MANT)

LAUNCH_OPTS = {"enable_fp_fusion": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of every launched kernel (programmatic dependent launch, sm_90+; ``PDL`` is the
    kernels' last parameter, set by ``_launch.PreBound`` together with the ``launch_pdl`` option, False
    under the interpreter and below sm_90, which have no grid-dependency control). With ``PDL``:
    ``griddepcontrol.wait``: nothing below runs before
    the previous kernel on the stream has completed and its writes are visible (so a kernel launched
    with ``launch_pdl`` reads and writes exactly as a normally launched one); then
    ``griddepcontrol.launch_dependents``: the next kernel, if launched with ``launch_pdl``, may be
    scheduled now, so its launch and CTA setup overlap this kernel's run instead of following it.
    Both are no-ops in a kernel launched without ``launch_pdl``."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def ceil_log2_ratio(amax, MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr):
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    return exp - MAX_EXP + ((bits & 0x7FFFFF) > MAX_MANT).to(tl.int32)


@triton.jit
def pow2(e):
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8_quant_rows(x, amax_floor):
    """UE8M0 FP8 of fp32 ``x [R, B]``, one block per row (columns past the block zero): ``(q e4m3
    [R, B], scale fp32 [R] = 2^e)``, ``e = ceil(log2(max(amax, floor) / 448))``, ``q = clamp(x·2^-e,
    ±448)`` with NaN kept (docs/numerics.md §4.1, §4.2)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor)
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
    v = tl.clamp(x * pow2(-e)[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return v.to(tl.float8e4nv), pow2(e)


@triton.jit
def e2m1_code_sw(v):
    """Nibble of fp32 ``v`` (|v| <= 6), round-to-nearest-even, sign from the sign bit.

    Piecewise: on [0, 2) the code is rne(2a), on [2, 4) 4 + rne(a - 2), on [4, 6] 6 + rne(a/2 - 2).
    Each argument is exact (a doubling, or a Sterbenz subtraction), and adding it to 2^23 + base
    (base 0 / 4 / 6, even, so ties keep their parity) rounds it to an integer in the low mantissa
    bits: about half the instructions of seven threshold compares."""
    a = tl.abs(v)
    lo2 = a < 2.0
    lo4 = a < 4.0
    t = tl.where(lo2, a * 2.0, tl.where(lo4, a - 2.0, a * 0.5 - 2.0))
    magic = tl.where(lo2, 8388608.0, tl.where(lo4, 8388612.0, 8388614.0))
    code = (t + magic).to(tl.int32, bitcast=True) & 0x7
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 3)


@triton.jit
def e2m1x2_hw(lo, hi):
    """sm_100+: ``cvt.rn.satfinite.e2m1x2.f32`` packs (hi, lo) into one byte, lo in the low nibble."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b8 t; cvt.rn.satfinite.e2m1x2.f32 t, $2, $1; cvt.u32.u8 $0, t; }",
        constraints="=r,f,f",
        args=[lo, hi],
        dtype=tl.uint32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def rope_pairs(xe, xo, c, s):
    """GPT-J rotation of one pair in fp32: (xe·c − xo·s, xe·s + xo·c)."""
    return xe * c - xo * s, xe * s + xo * c


@triton.jit
def _fwht_stage(y, ROWS: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    y = tl.reshape(y, [ROWS, D // (2 * H), 2, H])
    a, b = tl.split(tl.permute(y, [0, 1, 3, 2]))
    y = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
    return tl.reshape(y, [ROWS, D])


@triton.jit
def fwht(y, ROWS: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr):
    """Unnormalized Walsh-Hadamard of each row of ``y [ROWS, D]`` (fp32), stage h = 1, 2, 4, ..."""
    for s in tl.static_range(LOG2_D):
        y = _fwht_stage(y, ROWS, D, 1 << s)
    return y


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host ints. Launchers use this, not ``triton.cdiv``: in recent Triton that is
    a ``constexpr_function``, whose every call from Python unwraps its arguments (a few µs each, and a
    launcher makes several per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` for host ints ``n >= 1`` (0 for 0, as
    ``triton.next_power_of_2``), without ``triton.next_power_of_2``'s constexpr-function cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_programs(device: torch.device) -> int:
    """The SM count launchers size their grids by: the GPU's, or 8 off the GPU and under the
    interpreter (small shapes still exercise splitting)."""
    if device.type != "cuda" or interpreting():
        return 8
    return _device.sm_count(_device.index(device))


def use_hw_e2m1(device: torch.device) -> bool:
    """Hardware E2M1 conversion only on sm_100+ (``DSV4_E2M1=software`` forces the software path)."""
    if _device.software_e2m1_forced():
        return False
    if device.type != "cuda" or interpreting():
        return False
    return _device.capability(_device.index(device))[0] >= 10

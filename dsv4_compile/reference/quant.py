"""FP8 e4m3 with UE8M0 power-of-two scales, and MXFP4 (E2M1 + UE8M0), bit-exact (docs/numerics.md §4.1-§4.3).

The scale exponent ``e = ceil(log2(amax / M))`` (M = 448 for e4m3, 6 for E2M1) is computed exactly
from the fp32 bits of ``amax`` instead of through ``log2`` of a rounded quotient: with
``amax = m·2^E`` and ``M = m_M·2^E_M`` (m, m_M in [1, 2)), ``e = E − E_M + (m > m_M)``. This is the
real-number definition, it needs ``amax`` normal (the floors guarantee it), and the kernels use the
same integer arithmetic, so GPU and CPU agree on every scale byte.
"""

from __future__ import annotations

import struct

import torch

from .. import layouts


def float_bits(value: float) -> tuple[int, int]:
    """(unbiased exponent, 23-bit mantissa field) of ``value`` as an fp32 normal number."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits >> 23) & 0xFF) - 127, bits & 0x7FFFFF


FP8_MAX_EXP, FP8_MAX_MANT = float_bits(layouts.FP8_E4M3_MAX)  # 448 = 1.75 · 2^8
E2M1_MAX_EXP, E2M1_MAX_MANT = float_bits(layouts.E2M1_MAX)  # 6 = 1.5 · 2^2


def ceil_log2_ratio(amax: torch.Tensor, max_exp: int, max_mant: int) -> torch.Tensor:
    """Exact ``ceil(log2(amax / M))`` for fp32 normal ``amax`` and ``M`` given by its bit fields."""
    bits = amax.to(torch.float32).contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    return exp - max_exp + ((bits & 0x7FFFFF) > max_mant).to(torch.int32)


def pow2(e: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^e`` for integer ``e`` in [-126, 127], built from its bits (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_split(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``2^e``, ``2^-e``) for e in [-126, 126]."""
    return pow2(e), pow2(-e)


def fp8_block_quant(x: torch.Tensor, block: int, scale_floor: float = layouts.FP8_AMAX_FLOOR):
    """UE8M0 FP8 quantization of ``x [..., D]`` in blocks of ``block`` elements.

    ``amax = max(max|b|, scale_floor)`` (the floor applies to amax, as ``act_quant``'s 1e-4),
    ``e = ceil(log2(amax/448))``, ``q = clamp(b·2^-e, ±448)`` cast to e4m3 (RNE). Returns
    ``(q float8_e4m3fn [..., D], scale fp32 [..., D/block] = 2^e)``.
    """
    xf = x.to(torch.float32).unflatten(-1, (-1, block))
    amax = xf.abs().amax(dim=-1).clamp_min(scale_floor)
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
    scale, inv = pow2_split(e)
    q = (xf * inv.unsqueeze(-1)).clamp(-layouts.FP8_E4M3_MAX, layouts.FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn).flatten(-2).contiguous(), scale.contiguous()


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 nibble (sign << 3 | magnitude code) of fp32 ``v``, round-to-nearest-even, saturating.

    Magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} have codes 0..7; ties go to the even code (0.25 → 0,
    0.75 → 2, 1.25 → 2, 1.75 → 4, 2.5 → 4, 3.5 → 6, 5 → 6). The sign is the float's sign bit, so
    −0 and small negatives encode as 0x8 (as ``cvt.rn.satfinite.e2m1x2.f32``).
    """
    a = v.abs()
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def mxfp4_quant(x: torch.Tensor):
    """MXFP4 of ``x [..., D]`` (D % 32 == 0): 32-element blocks, ``amax`` floored at 6·2^-126,
    ``e = clamp(ceil(log2(amax/6)), -127, 127)``, elements ``x·2^-e`` → E2M1.

    Returns ``(packed uint8 [..., D/2], scale uint8 [..., D/32] = e + 127)``; element 2j is the low
    nibble of byte j, element 2j+1 the high nibble. A block holding a NaN gets the E8M0 NaN scale
    byte 0xFF (E2M1 has no NaN), so it dequantizes to NaN, never to a plausible value.
    """
    xf = x.to(torch.float32).unflatten(-1, (-1, layouts.MXFP4_BLOCK))
    nan = xf.isnan()
    # the amax of the block's numbers (as the GPU max, which skips NaN); a NaN block is marked below
    amax = torch.where(nan, 0.0, xf.abs()).amax(dim=-1).clamp_min(layouts.MXFP4_AMAX_FLOOR)
    e = ceil_log2_ratio(amax, E2M1_MAX_EXP, E2M1_MAX_MANT).clamp(layouts.MXFP4_EXP_MIN, layouts.MXFP4_EXP_MAX)
    # For finite inputs e stays within [-126, 126], where 2^-e is an fp32 normal.
    _, inv = pow2_split(e)
    v = (xf * inv.unsqueeze(-1)).clamp(-layouts.E2M1_MAX, layouts.E2M1_MAX)
    nib = e2m1_codes(v).flatten(-2)
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    scale = torch.where(nan.any(dim=-1), 0xFF, e + layouts.UE8M0_BIAS).to(torch.uint8)
    return packed.contiguous(), scale.contiguous()


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4_dequant(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., D]`` values of an MXFP4 tensor (for tests and gathers)."""
    lut = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32, device=packed.device)
    lo = lut[(packed & 0xF).long()]
    hi = lut[(packed >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2).unflatten(-1, (-1, layouts.MXFP4_BLOCK))
    s = pow2(scale.to(torch.int32) - layouts.UE8M0_BIAS)
    return (vals * s.unsqueeze(-1)).flatten(-2)

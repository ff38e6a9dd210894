"""``dsv4::fp8_block_quant`` and ``dsv4::mxfp4_quant``: the quantization primitives (docs/numerics.md
§4.1-§4.3)."""

from __future__ import annotations

import torch

from .. import layouts, reference
from ._lib import FLOAT_DTYPES, check_tensor, checks_needed, qualname, register_cuda


def _check_fp8(x, block, scale_floor):
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if x.shape[-1] % block:
        raise ValueError(f"x's last dim {x.shape[-1]} is not a multiple of block {block}")
    if not scale_floor > 0:
        raise ValueError(f"scale_floor must be positive (it keeps the scale a normal fp32), got {scale_floor}")


@torch.library.custom_op(qualname("fp8_block_quant"), mutates_args=())
def fp8_block_quant(
    x: torch.Tensor, block: int, scale_floor: float = layouts.FP8_AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quantization with UE8M0 (power-of-two) scales, per ``block`` elements of the last dim.

    Per block: ``amax = max(max|x|, scale_floor)``, ``e = ceil(log2(amax/448))`` computed exactly from
    the fp32 bits, ``q = clamp(x·2^-e, ±448)`` cast to e4m3 with round-to-nearest-even
    (docs/numerics.md §4.1, §4.2). Dequantize with ``q · scale``.

    Args:
        x: ``[..., D]`` bf16 / fp16 / fp32, at least 1 dim.
        block: elements per scale (a positive int dividing ``D``): 64 for K=V nope, 128 for the
            indexer and the output projection.
        scale_floor: lower bound of each block's amax (> 0; it keeps the scale an fp32 normal):
            ``layouts.FP8_AMAX_FLOOR`` = 1e-4 (K=V, indexer), ``INV_ROPE_AMAX_FLOOR`` = 1e-10
            (output projection).

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn ``[..., D]`` and ``scale`` fp32 ``[..., D/block]`` = ``2^e``,
        both fresh and contiguous.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``x`` is not a float tensor of at least 1 dim; ``block`` is not a positive int or
            does not divide ``D``; ``scale_floor`` is not positive.

    Source:
        ``act_quant`` with ``scale_fmt="ue8m0"`` of the DeepSeek-V4 reference ``kernel.py`` (amax
        floor 1e-4) and vLLM's ``per_token_group_quant_fp8(..., use_ue8m0=True)``; the 1e-10 floor
        is that of vLLM's ``fused_inv_rope_fp8_quant``.
    """
    _check_fp8(x, block, scale_floor)
    return reference.fp8_block_quant(x, block, scale_floor)


@register_cuda(fp8_block_quant)
def _fp8_block_quant_cuda(x, block, scale_floor=layouts.FP8_AMAX_FLOOR):
    if checks_needed():
        _check_fp8(x, block, scale_floor)
    from ..kernels.triton import primitives

    return primitives.fp8_block_quant(x, block, scale_floor)


@fp8_block_quant.register_fake
def _fp8_block_quant_fake(x, block, scale_floor=layouts.FP8_AMAX_FLOOR):
    _check_fp8(x, block, scale_floor)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(x.shape[:-1] + (x.shape[-1] // block,), dtype=torch.float32, device=x.device)
    return q, s


def _check_mxfp4(x):
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    if x.shape[-1] % layouts.MXFP4_BLOCK:
        raise ValueError(f"x's last dim must be a multiple of {layouts.MXFP4_BLOCK} for MXFP4, got {x.shape[-1]}")


@torch.library.custom_op(qualname("mxfp4_quant"), mutates_args=())
def mxfp4_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization: 32-element blocks of E2M1 values sharing one UE8M0 scale.

    Per block: ``amax = max(max|x|, 6·2^-126)``, ``e = clamp(ceil(log2(amax/6)), −127, 127)``; each
    element ``clamp(x·2^-e, ±6)`` becomes the E2M1 nibble ``sign << 3 | code`` (round-to-nearest-even,
    the float's sign bit kept, so −0 is ``0x8``); element ``2j`` is the low nibble of byte ``j``,
    element ``2j+1`` the high nibble (docs/numerics.md §4.3).

    Args:
        x: ``[..., D]`` bf16 / fp16 / fp32, ``D`` a multiple of 32.

    Returns:
        ``(packed, scale)``: ``packed`` uint8 ``[..., D/2]`` and ``scale`` uint8 ``[..., D/32]``
        (``e + 127``; byte ``j`` covers elements ``32j .. 32j+31``), both fresh and contiguous.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``x`` is not a float tensor of at least 1 dim; ``D`` is not a multiple of 32.

    Source:
        ``fp4_act_quant`` of the DeepSeek-V4 reference ``kernel.py`` (the indexer's MXFP4
        quantization-aware training) and the E2M1 conversion of vLLM's MXFP4 indexer kernels (PTX
        ``cvt.rn.satfinite.e2m1x2.f32``); the MX block format of the OCP Microscaling spec.
    """
    _check_mxfp4(x)
    return reference.mxfp4_quant(x)


@register_cuda(mxfp4_quant)
def _mxfp4_quant_cuda(x):
    if checks_needed():
        _check_mxfp4(x)
    from ..kernels.triton import primitives

    return primitives.mxfp4_quant(x)


@mxfp4_quant.register_fake
def _mxfp4_quant_fake(x):
    _check_mxfp4(x)
    d = x.shape[-1]
    packed = torch.empty(x.shape[:-1] + (d // 2,), dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[:-1] + (d // layouts.MXFP4_BLOCK,), dtype=torch.uint8, device=x.device)
    return packed, scale


def _check_norm_quant(x, weight, eps, block, scale_floor):
    from .compressor import _check_norm

    _check_norm(x, weight, eps)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block!r}")
    _check_fp8(x, block, scale_floor)


@torch.library.custom_op(qualname("rms_norm_fp8_quant"), mutates_args=())
def rms_norm_fp8_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, block: int = 128, scale_floor: float = layouts.FP8_AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted RMSNorm, rounded to ``x.dtype``, then FP8 e4m3 with UE8M0 scales per ``block``.

    Equals ``fp8_block_quant(rms_norm(x, weight, eps), block, scale_floor)`` bit for bit: the
    fixed-order norm of ``dsv4::rms_norm`` (docs/numerics.md §6.4), then the quantization of
    ``dsv4::fp8_block_quant`` (§4.1, §4.2), in one pass over ``x``. What ``lowerings/norm_quant.py``
    (``PassConfig(rms_norm_quant=True)``; off by default, no faster at decode sizes on an H200) turns a
    plain RMSNorm feeding an activation quant into (DSv4's ``q_norm`` before the FP8 ``q_proj``;
    docs/numerics.md §4.5).

    Args:
        x: ``[..., D]`` bf16 / fp16 / fp32, ``D <= 8192`` a multiple of ``block``; any strides.
        weight: ``[D]`` bf16 / fp16 / fp32 on ``x``'s device.
        eps: a positive Python number added to the mean square (1e-6 in DSv4).
        block: elements per scale, a power of two of at least 16 (128: the FP8 GEMM's 1x128 blocks).
        scale_floor: lower bound of each block's amax (> 0), ``layouts.FP8_AMAX_FLOOR`` = 1e-4.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn ``[..., D]`` and ``scale`` fp32 ``[..., D/block]`` = ``2^e``,
        both fresh and contiguous.

    Mutates:
        Nothing.

    Raises:
        ValueError: the conditions of ``rms_norm`` (``x``, ``weight``, ``eps``) and of
            ``fp8_block_quant`` (``block`` divides ``D``, ``scale_floor`` positive); ``block`` not a
            power of two of at least 16.

    Source:
        The DeepSeek-V4 reference's ``q_norm`` followed by ``act_quant`` (1x128 blocks, UE8M0) before
        its FP8 ``wq_b``; vLLM fuses the same pair (RMSNorm + per-token-group FP8 quant).
    """
    _check_norm_quant(x, weight, eps, block, scale_floor)
    return reference.compressor.rms_norm_fp8_quant(x, weight, eps, block, scale_floor)


@register_cuda(rms_norm_fp8_quant, strided=("x",))
def _rms_norm_fp8_quant_cuda(x, weight, eps, block=128, scale_floor=layouts.FP8_AMAX_FLOOR):
    if checks_needed():
        _check_norm_quant(x, weight, eps, block, scale_floor)
    from ..kernels.triton import compressor

    return compressor.rms_norm_fp8_quant(x, weight, eps, block, scale_floor)


@rms_norm_fp8_quant.register_fake
def _rms_norm_fp8_quant_fake(x, weight, eps, block=128, scale_floor=layouts.FP8_AMAX_FLOOR):
    _check_norm_quant(x, weight, eps, block, scale_floor)
    return _fp8_block_quant_fake(x, block, scale_floor)

"""``dsv4::fp8_block_quant`` and ``dsv4::mxfp4_quant``: the quantization primitives (spec §4.1, §4.5)."""

from __future__ import annotations

import torch

from .. import layouts, reference
from ._lib import FLOAT_DTYPES, check_tensor, qualname


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
    """UE8M0 FP8 e4m3 quantization of ``x [..., D]`` per ``block`` elements.

    ``amax`` of each block is floored at ``scale_floor`` (1e-4 for KV / indexer, 1e-10 for the
    output projection), ``scale = 2^ceil(log2(amax/448))``, ``q = clamp(x/scale, ±448)`` (RNE).
    Returns ``(q float8_e4m3fn [..., D], scale fp32 [..., D/block])``.
    """
    _check_fp8(x, block, scale_floor)
    return reference.fp8_block_quant(x, block, scale_floor)


@fp8_block_quant.register_kernel("cuda")
def _fp8_block_quant_cuda(x, block, scale_floor=layouts.FP8_AMAX_FLOOR):
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
    """MXFP4 of ``x [..., D]``: 32-element blocks, UE8M0 scale ``2^ceil(log2(amax/6))``, E2M1 values
    (round-to-nearest-even, sign kept). Returns ``(packed uint8 [..., D/2], scale uint8 [..., D/32])``,
    element 2j in the low nibble of byte j."""
    _check_mxfp4(x)
    return reference.mxfp4_quant(x)


@mxfp4_quant.register_kernel("cuda")
def _mxfp4_quant_cuda(x):
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

"""FP8 projections (docs/numerics.md §4.5): an ``nn.Linear`` whose weight is kept as the checkpoint
stores it — e4m3 ``[N, K]`` plus an fp32 ``scale`` buffer ``[ceil(N/128), K/128]`` (one per 128x128
block) — runs as ``fp8_block_quant(x, 128)`` (1x128 activation blocks, UE8M0) then
``dsv4::fp8_block_gemm``. ``state_dict`` then holds ``<name>.weight`` (e4m3) and ``<name>.scale``
(fp32): DeepSeek's checkpoint names, loadable again."""

from __future__ import annotations

import torch
from torch import nn

dsv4 = torch.ops.dsv4
FP8 = torch.float8_e4m3fn
BLOCK = 128


def is_fp8(lin: nn.Linear) -> bool:
    return lin.weight.dtype == FP8


def set_linear_format(lin: nn.Linear, fp8: bool, dtype=torch.bfloat16) -> None:
    """Give ``lin`` FP8 storage (e4m3 weight + fp32 ``scale`` buffer) or back ``dtype`` storage (no
    scale), uninitialized: a load that follows fills it. A no-op when it already has that format."""
    if fp8 == is_fp8(lin):
        return
    n, k = lin.weight.shape
    dev = lin.weight.device
    if fp8:
        lin.weight = nn.Parameter(torch.empty(n, k, dtype=FP8, device=dev), requires_grad=False)
        lin.register_buffer("scale", torch.empty(-(-n // BLOCK), -(-k // BLOCK), dtype=torch.float32, device=dev))
    else:
        lin.weight = nn.Parameter(torch.empty(n, k, dtype=dtype, device=dev), requires_grad=False)
        del lin._buffers["scale"]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 ``[T, N]`` = ``x [T, K]`` (bf16) through an FP8 weight: activations quantized per token in
    1x128 blocks, then the block-scaled GEMM."""
    xq, xs = dsv4.fp8_block_quant(x, BLOCK)
    return dsv4.fp8_block_gemm(xq, xs, weight, scale)


def project(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` for a bf16 linear, ``fp8_linear`` for an FP8 one (``x`` 2-D)."""
    return fp8_linear(x, lin.weight, lin.scale) if is_fp8(lin) else lin(x)

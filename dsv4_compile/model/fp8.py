"""FP8 projections (docs/numerics.md §4.5): an ``nn.Linear`` whose weight is kept as the checkpoint
stores it — e4m3 ``[N, K]`` plus an fp32 ``scale`` buffer ``[ceil(N/128), K/128]`` (one per 128x128
block) — runs as ``fp8_block_quant(x, 128)`` (1x128 activation blocks, UE8M0) then
``dsv4::fp8_block_gemm``. ``state_dict`` then holds ``<name>.weight`` (e4m3) and ``<name>.scale``
(fp32): DeepSeek's checkpoint names, loadable again."""

from __future__ import annotations

import torch
from torch import nn

from .. import layouts

dsv4 = torch.ops.dsv4
FP8 = torch.float8_e4m3fn
BLOCK = layouts.WEIGHT_BLOCK


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


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 [N, K], fp32 [ceil(N/128), ceil(K/128)])``: a bf16 / fp32 weight in the checkpoints'
    format, one power-of-two scale per 128x128 block (``amax/448`` rounded up to a power of two,
    amax floored at 1e-4), ``w ≈ q · scale``. For benchmarks and tests that start from bf16 weights."""
    from ..reference.quant import FP8_MAX_EXP, FP8_MAX_MANT, ceil_log2_ratio, pow2

    n, k = w.shape
    blocks = torch.nn.functional.pad(w.float(), (0, -k % BLOCK, 0, -n % BLOCK)).unflatten(0, (-1, BLOCK)).unflatten(
        2, (-1, BLOCK))
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(layouts.FP8_AMAX_FLOOR)
    scale = pow2(ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT))  # the activation quant's exact UE8M0 rule
    full = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (w.float() / full).to(FP8), scale


def fp8_checkpoint(state_dict: dict, names, prefix: str = "") -> dict:
    """A copy of a bf16 ``state_dict`` with the weights of ``names`` (e.g. ``FP8_LINEARS``) quantized
    by ``quantize_weight`` as ``<name>.weight`` (e4m3) + ``<name>.scale`` (fp32)."""
    out = dict(state_dict)
    for name in names:
        key = f"{prefix}{name}.weight"
        if key in out:
            out[key], out[f"{prefix}{name}.scale"] = quantize_weight(out[key])
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 ``[T, N]`` = ``x [T, K]`` (bf16) through an FP8 weight: activations quantized per token in
    1x128 blocks, then the block-scaled GEMM."""
    xq, xs = dsv4.fp8_block_quant(x, BLOCK)
    return dsv4.fp8_block_gemm(xq, xs, weight, scale)


def project(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` for a bf16 linear, ``fp8_linear`` for an FP8 one (``x`` 2-D)."""
    return fp8_linear(x, lin.weight, lin.scale) if is_fp8(lin) else lin(x)

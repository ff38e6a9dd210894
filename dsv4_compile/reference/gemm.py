"""Block-scaled FP8 GEMM (DeepSeek's ``fp8_gemm``; DeepGEMM's ``fp8_gemm_nt``; vLLM's
``w8a8_block_fp8_matmul``), pure PyTorch.

``out[m, n] = Σ_kb (Σ_{c<128} x_q[m, 128kb+c] · w_q[n, 128kb+c]) · x_scale[m, kb] · w_scale[n // 128, kb]``

The inner sum over one 128-wide K block multiplies e4m3 values (exact in fp32) and sums them in fp32;
each block's partial is scaled by the product of its activation scale (1x128 block, UE8M0) and its
weight scale (128x128 block) and the partials are summed in fp32 in K order. The GPU kernel has the
same structure (one accumulator per tile, one scale multiply per K block) but its own summation
order inside a block and, with split-K, across splits: equal to fp32 rounding, not bit for bit.
No host sync, fixed output shape. Memory: two fp32 ``[K/128, M, N]`` temporaries (fine for tests
and small layers; the CPU path is the reference, not a fast GEMM).
"""

from __future__ import annotations

import torch

from .. import layouts

BLOCK = layouts.WEIGHT_BLOCK


def weight_scale_fp32(w_scale: torch.Tensor) -> torch.Tensor:
    """fp32 block scales from fp32 or ``float8_e8m0fnu`` (exact: a power of two or NaN)."""
    return w_scale.to(torch.float32)


def fp8_block_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[M, N]`` of ``out_dtype`` from e4m3 ``x_q [M, K]`` with fp32 ``x_scale [M, K/128]`` and e4m3
    ``w_q [N, K]`` with ``w_scale [ceil(N/128), K/128]`` (see the module doc). Grouped (DSv4's
    ``wo_a``): ``x_q [M, G, K]`` with ``x_scale [M, G, K/128]``; output columns ``[g·N/G, (g+1)·N/G)``
    are group g's input times the weight rows of the same range."""
    if x_q.dim() == 3:
        G = x_q.shape[1]
        n, b = w_q.shape[0] // G, w_q.shape[0] // G // BLOCK
        return torch.cat([fp8_block_gemm(x_q[:, g], x_scale[:, g], w_q[g * n:(g + 1) * n], w_scale[g * b:(g + 1) * b],
                                         out_dtype) for g in range(G)], dim=1)
    M, K = x_q.shape
    N = w_q.shape[0]
    kb = K // BLOCK
    xs = x_q.to(torch.float32).reshape(M, kb, BLOCK).transpose(0, 1)             # [kb, M, 128]
    ws = w_q.to(torch.float32).view(N, kb, BLOCK).permute(1, 2, 0)               # [kb, 128, N]
    partial = torch.bmm(xs, ws)                                                  # [kb, M, N] fp32
    wsc = weight_scale_fp32(w_scale).repeat_interleave(BLOCK, dim=0)[:N]         # [N, kb]
    scale = x_scale.to(torch.float32).t()[:, :, None] * wsc.t()[:, None, :]      # [kb, M, N]
    out = torch.zeros((M, N), dtype=torch.float32, device=x_q.device)
    for b in range(kb):  # block by block, in K order (as the kernels accumulate)
        out = out + partial[b] * scale[b]
    return out.to(out_dtype)


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
               scale_floor: float = 1e-4) -> torch.Tensor:
    """``fp8_block_gemm(*fp8_block_quant(x, 128, scale_floor), w_q, w_scale, out_dtype)``: an FP8 projection
    of bf16 / fp16 / fp32 activations ``x [M, K]``, quantized per token in 1x128 blocks."""
    from .quant import fp8_block_quant

    return fp8_block_gemm(*fp8_block_quant(x, BLOCK, scale_floor), w_q, w_scale, out_dtype)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` in fp32 for bf16 / fp16 / fp32 ``x [M, K]`` and ``weight [N, K]`` of one dtype: every
    product of the two values exact in fp32 (a 16-bit float has an 8- or 11-bit significand), summed in
    fp32 (in ``F.linear``'s order); the fp32 sum is the result (no rounding to 16 bits)."""
    return torch.nn.functional.linear(x.float(), weight.float())

"""The lightning indexer's query side in the plain form a user writes (docs/numerics.md §7.1).

Nothing here is fused by hand: under ``dsv4_compile.compile`` the pass ``lowerings/indexer_q.py``
rewrites RoPE → [Hadamard] → quant → weight scaling into one ``indexer_q_rope_{fp8,mxfp4}`` call.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import layouts
from .fp8 import project


class IndexerQ(nn.Module):
    """``qr [T, q_lora_rank]``, ``x [T, hidden]`` → FP8 ``(q_fp8, weights)`` or MXFP4 ``(packed, scale, weights)``."""

    def __init__(
        self,
        hidden_size: int,
        q_lora_rank: int,
        n_heads: int = 64,
        head_dim: int = layouts.INDEXER_HEAD_DIM,
        fmt: str = "fp8",
        hadamard: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        if fmt not in ("fp8", "mxfp4"):
            raise ValueError(f"fmt must be 'fp8' or 'mxfp4', got {fmt!r}")
        self.n_heads, self.head_dim, self.fmt, self.hadamard = n_heads, head_dim, fmt, hadamard
        self.softmax_scale = head_dim**-0.5
        self.head_scale = n_heads**-0.5
        # one constant (its product rounded once): the fused op's weights_out is then bit-identical
        # to this eager form, where a chain of two constants would round twice
        self.weight_scale = self.softmax_scale * self.head_scale
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False, dtype=dtype, device=device)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False, dtype=dtype, device=device)
        # Inference-only: the dsv4 ops have no autograd formulas, so the weights never require grad.
        self.requires_grad_(False)

    def forward(self, qr, x, positions, cos_sin_cache, weights=None, q=None):
        """``weights``: ``weights_proj(x)``, ``q``: ``wq_b(qr)`` as ``[T, n_heads, head_dim]``, when the
        caller already has them (fused projections of ``x`` and ``qr``)."""
        # One token dimension: under dynamic shapes this tells the compiler that q and the weights
        # share T (the MXFP4 fusion has no data edge between them to infer it from).
        torch._check(qr.shape[0] == x.shape[0])
        torch._check(qr.shape[0] == positions.shape[0])
        if q is None:
            q = project(self.wq_b, qr).view(qr.shape[0], self.n_heads, self.head_dim)
        q = torch.ops.dsv4.rope(q, positions, cos_sin_cache)
        if self.hadamard:
            q = torch.ops.dsv4.hadamard(q, self.head_dim**-0.5)
        if weights is None:  # fp32 sums, unrounded (docs/numerics.md §7.1)
            weights = torch.ops.dsv4.linear_fp32(x, self.weights_proj.weight)
        if self.fmt == "fp8":
            q_fp8, q_scale = torch.ops.dsv4.fp8_block_quant(q, self.head_dim, layouts.FP8_AMAX_FLOOR)
            return q_fp8, weights.float() * self.weight_scale * q_scale.squeeze(-1)
        packed, scale = torch.ops.dsv4.mxfp4_quant(q)
        return packed, scale, weights.float() * self.weight_scale

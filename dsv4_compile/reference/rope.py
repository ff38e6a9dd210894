"""RoPE (GPT-J interleaved pairs on the trailing dims) and the Sylvester Hadamard transform.

Both run in fp32 and round once to the input dtype. The kernels reproduce the exact order of fp32
operations below (no FMA contraction, the same butterfly stage order), which is what makes them
bit-exact with this file.
"""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``R = cos_sin_cache.shape[-1]`` dims of ``x [T, ..., D]`` at ``positions [T]``.

    Pair i = dims ``(D-R+2i, D-R+2i+1)``: ``x0' = x0·cos − x1·sin``, ``x1' = x0·sin + x1·cos`` with
    ``cos = table[p, i]``, ``sin = table[p, R/2 + i]`` (``sin → −sin`` when ``inverse``); fp32 math,
    rounded to ``x.dtype``. Dims before the rotated slice are copied unchanged. Returns a fresh
    contiguous tensor.
    """
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache.index_select(0, positions.to(torch.int64)).to(torch.float32)
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos = cs[:, :half].reshape(view)
    sin = cs[:, half:].reshape(view)
    if inverse:
        sin = -sin
    xr = x[..., x.shape[-1] - rot :].to(torch.float32)
    x0 = xr[..., 0::2]
    x1 = xr[..., 1::2]
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out[..., : x.shape[-1] - rot] = x[..., : x.shape[-1] - rot]
    out[..., x.shape[-1] - rot :] = torch.stack((o0, o1), dim=-1).flatten(-2).to(x.dtype)
    return out


def fwht_fp32(y: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester (natural order) Walsh-Hadamard transform over the last dim, fp32.

    Stage s (h = 2^s, s = 0 .. log2(D)-1) maps each pair (a, b) = (y[k], y[k+h]) inside every
    2h-block to (a + b, a − b). The kernels run the same stages in the same order.
    """
    d = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < d:
        y = y.reshape(*lead, d // (2 * h), 2, h)
        a = y[..., 0, :]
        b = y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return y


def hadamard(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``round_to(x.dtype)(fwht_fp32(x) · scale)`` over the last dim (a power of two)."""
    return (fwht_fp32(x.to(torch.float32)) * scale).to(x.dtype).contiguous()

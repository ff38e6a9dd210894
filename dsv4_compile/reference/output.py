"""The attention output path (docs/numerics.md §8.3, §5.6): inverse RoPE → FP8 quant, and the grouped output
projection in plain PyTorch.

``inv_rope_fp8_quant`` is the composition of the two primitives (``rope(..., inverse=True)`` then
``fp8_block_quant(·, 128, 1e-10)`` on the ``[T, G, (H/G)·512]`` view), laid out as vLLM's SM90
path hands it to DeepGEMM's ``fp8_einsum``:

* ``o_fp8``: float8_e4m3fn, storage ``[G, T, D]`` returned as ``.transpose(0, 1)``, i.e. shape
  ``[T, G, D]`` with strides ``(D, T·D, 1)`` (D = (H/G)·512);
* ``scale``: fp32 ``2^e``, shape ``[G, T, D/128]`` with strides ``((D/128)·T_al, 1, T_al)``
  (MN-major, ``T_al`` = T rounded up to a multiple of 4); the padding rows ``T ≤ t < T_al`` of the
  storage are zero. The storage is a contiguous ``[G, D/128, T_al]`` buffer; vLLM's kernel fills
  the same buffer and hands it out as ``scale.transpose(0, 1)``: shape ``[T, G, D/128]``, strides
  ``(1, (D/128)·T_al, T_al)`` (its SM90 fp32 form; the SM100 int32-packed UE8M0 form is not made here).

Two roundings of the rotated dims: ``round_rope_bf16=True`` (default) rounds the inverse rotation
to bf16 before the amax and the quant, as DeepSeek's reference and the plain composition above;
``round_rope_bf16=False`` quantizes the fp32 rotation (vLLM's ``fused_inv_rope_fp8_quant`` bytes),
i.e. the composition with ``rope(o.float(), ...)``. Only the last 128-block of each head (it holds
the 64 rotated dims) can differ between the two. vLLM's scale ``exp2(ceil(log2(amax · fp32(1/448))))``
equals the exact ``2^ceil(log2(amax/448))`` used here for every fp32 amax, except that its GPU
``log2`` rounds to the integer when ``amax`` lies within ~19 fp32 ulps above ``448·2^k``, and its
Triton build contracts the rotation into FMAs; against a model of its kernel on an H200 (serving
shapes, random data) that left ~1e-6 of the rotated dims' bytes different and every scale equal.
"""

from __future__ import annotations

import torch

from .. import layouts
from .quant import fp8_block_quant
from .rope import rope


def scale_rows(t):
    """``T_al``: ``t`` rounded up to a multiple of 4 (integer arithmetic: works on SymInts)."""
    a = layouts.O_PROJ_SCALE_T_ALIGN
    return (t + a - 1) // a * a


def empty_outputs(t, h, d, n_groups, device, zero_scale_padding: bool = True):
    """Fresh ``(o_fp8, scale)`` in the output layout (the one definition of it: reference, kernel and
    fake all allocate here): views of a ``[G, T, D]`` e4m3 buffer and of a ``[G, D/128, T_al]`` fp32
    buffer (zero-filled when ``zero_scale_padding``)."""
    dg = h // n_groups * d
    nb = dg // layouts.O_PROJ_QUANT_BLOCK
    # empty_strided, not empty(...).transpose: the transposed view's contiguity test would guard on
    # T == 1 and specialize dynamic-T graphs on one-token batches
    o_fp8 = torch.empty_strided((t, n_groups, dg), (dg, t * dg, 1), dtype=torch.float8_e4m3fn, device=device)
    ta = scale_rows(t)
    if isinstance(t, torch.SymInt):
        # fake (symbolic T): the same sizes and strides without slicing [:, :T] of the padded rows,
        # which torch 2.11 cannot bound statically (it would allocate an unbacked size)
        scale = torch.empty_strided((n_groups, t, nb), (nb * ta, 1, ta), dtype=torch.float32, device=device)
        return o_fp8, scale
    alloc = torch.zeros if zero_scale_padding else torch.empty
    scale = alloc((n_groups, nb, ta), dtype=torch.float32, device=device).transpose(1, 2)[:, :t]
    return o_fp8, scale


def inv_rope_fp8_quant(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, n_groups: int,
                       round_rope_bf16: bool = True):
    """``(o_fp8 [T, G, D], scale [G, T, D/128])`` of ``o [T, H, 512]`` (layout in the module doc).

    Values: ``y = rope(o, positions, cos_sin_cache, inverse=True)`` (fp32 math, rounded to bf16;
    with ``round_rope_bf16=False`` the rotation of ``o.float()``, left in fp32 as vLLM's kernel
    quantizes it), then ``fp8_block_quant(y.view(T, G, D), 128, 1e-10)``: ``o_fp8[t, g] = q[t, g]``
    and ``scale[g, t] = s[t, g]``.
    """
    t, h, d = o.shape
    y = rope(o if round_rope_bf16 else o.to(torch.float32), positions, cos_sin_cache, inverse=True)
    q, s = fp8_block_quant(y.reshape(t, n_groups, h // n_groups * d), layouts.O_PROJ_QUANT_BLOCK,
                           layouts.INV_ROPE_AMAX_FLOOR)
    o_fp8, scale = empty_outputs(t, h, d, n_groups, o.device)
    o_fp8.copy_(q)
    scale.copy_(s.transpose(0, 1))
    return o_fp8, scale


def fp8_dequant_grouped(o_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 ``[T, G, D]`` values of ``inv_rope_fp8_quant``'s outputs: ``o_fp8 [T, G, D]`` (any
    strides) times ``scale [G, T, D/128]`` (any strides) per 128-element block. Exact: an e4m3 value
    times a power of two is a bf16 number."""
    q = o_fp8.to(torch.float32).unflatten(-1, (-1, layouts.O_PROJ_QUANT_BLOCK))
    return (q * scale.transpose(0, 1).unsqueeze(-1)).flatten(-2).to(torch.bfloat16)


def grouped_o_proj(o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The grouped low-rank output projection (docs/numerics.md §8.3), bf16 as the reference.

    ``o [T, H, 512]`` (or already grouped ``[T, G, (H/G)·512]``, e.g. ``fp8_dequant_grouped``'s
    output), ``wo_a [G·R, (H/G)·512]``, ``wo_b [hidden, G·R]``:
    ``z = einsum("tgd,grd->tgr", o.view(T, G, D), wo_a.view(G, R, D))``, ``y = z.flatten(1) @ wo_b^T``.
    Returns ``[T, hidden]``.
    """
    x = o.reshape(o.shape[0], n_groups, -1)
    w = wo_a.view(n_groups, -1, x.shape[-1])
    z = torch.einsum("tgd,grd->tgr", x, w)
    return torch.nn.functional.linear(z.flatten(1), wo_b)

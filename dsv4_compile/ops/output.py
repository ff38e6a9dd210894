"""``dsv4::inv_rope_fp8_quant``: the attention output path's inverse RoPE fused with the 128-block
FP8 quant that feeds the grouped output projection (spec §2.8, §4.7).

The plain form it replaces (what ``lowerings/inv_rope_quant.py`` matches)::

    y = dsv4.rope(o, positions, cos_sin_cache, True)
    q, s = dsv4.fp8_block_quant(y.view(T, G, (H/G)·512), 128, 1e-10)

The fused op returns the same values in vLLM's SM90 / DeepGEMM layout: ``o_fp8 = q`` as a
``[T, G, D]`` view of a ``[G, T, D]`` buffer and ``scale = s.transpose(0, 1)`` as a ``[G, T, D/128]``
MN-major view with its token dim padded to a multiple of 4 (padding zero).
"""

from __future__ import annotations

import torch

from .. import layouts, reference
from ..reference import output as _ref_output
from ._lib import check_positive_int, check_rope_args, check_tensor, qualname


def _check(o, positions, cos_sin_cache, n_groups):
    check_tensor("o", o, ndim=3, dtypes=(torch.bfloat16,))
    if o.shape[-1] != layouts.KV_HEAD_DIM:
        raise ValueError(f"o's head dim must be {layouts.KV_HEAD_DIM}, got shape {tuple(o.shape)}")
    check_rope_args("o", o, positions, cos_sin_cache)
    if cos_sin_cache.shape[-1] != layouts.ROPE_DIM:
        raise ValueError(f"cos_sin_cache must be [max_pos, {layouts.ROPE_DIM}], got {tuple(cos_sin_cache.shape)}")
    check_positive_int("n_groups", n_groups)
    if o.shape[1] % n_groups:
        raise ValueError(f"o's {o.shape[1]} heads are not a multiple of n_groups={n_groups}")


@torch.library.custom_op(qualname("inv_rope_fp8_quant"), mutates_args=())
def inv_rope_fp8_quant(
    o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse RoPE + FP8 quant of the attention output for the grouped output projection.

    Args: ``o [T, H, 512]`` bf16 (any strides), ``positions [T]`` int32/int64 (the query positions),
    ``cos_sin_cache [max_pos, 64]`` fp32/bf16 (the layer's table), ``n_groups`` G dividing H.

    Returns ``(o_fp8, scale)``: ``o_fp8`` float8_e4m3fn ``[T, G, D]`` (D = (H/G)·512) with strides
    ``(D, T·D, 1)``; ``scale`` fp32 ``2^e`` ``[G, T, D/128]`` with strides ``((D/128)·T_al, 1, T_al)``,
    ``T_al`` = T rounded up to 4, padding rows zero. Values: ``rope(o, positions, cos_sin_cache,
    inverse=True)`` (fp32 math, rounded to bf16), then UE8M0 e4m3 per 128 elements, amax floor 1e-10.
    """
    _check(o, positions, cos_sin_cache, n_groups)
    return reference.inv_rope_fp8_quant(o, positions, cos_sin_cache, n_groups)


@inv_rope_fp8_quant.register_kernel("cuda")
def _inv_rope_fp8_quant_cuda(o, positions, cos_sin_cache, n_groups):
    _check(o, positions, cos_sin_cache, n_groups)
    from ..kernels.triton import output

    return output.inv_rope_fp8_quant(o, positions, cos_sin_cache, n_groups)


@inv_rope_fp8_quant.register_fake
def _inv_rope_fp8_quant_fake(o, positions, cos_sin_cache, n_groups):
    _check(o, positions, cos_sin_cache, n_groups)
    return _ref_output.empty_outputs(*o.shape, n_groups, o.device, zero_scale_padding=False)

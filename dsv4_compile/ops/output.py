"""``dsv4::inv_rope_fp8_quant``: the attention output path's inverse RoPE fused with the 128-block
FP8 quant that feeds the grouped output projection (docs/numerics.md §8.3, layout §5.6).

The plain form it replaces (what ``lowerings/inv_rope_quant.py`` matches)::

    y = dsv4.rope(o, positions, cos_sin_cache, True)
    q, s = dsv4.fp8_block_quant(y.view(T, G, (H/G)·512), 128, 1e-10)

(``round_rope_bf16=False``, vLLM's bytes: the same with ``rope(o.float(), ...)``, an fp32 rotation.)

The fused op returns the same values in vLLM's SM90 / DeepGEMM layout: ``o_fp8 = q`` as a
``[T, G, D]`` view of a ``[G, T, D]`` buffer and ``scale = s.transpose(0, 1)`` as a ``[G, T, D/128]``
MN-major view with its token dim padded to a multiple of 4 (padding zero).
"""

from __future__ import annotations

import torch

from .. import layouts, reference
from ..reference import output as _ref_output
from ._lib import check_positive_int, check_rope_args, check_tensor, checks_needed, qualname, register_cuda


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
    o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, n_groups: int,
    round_rope_bf16: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse RoPE + FP8 quantization of the attention output for the grouped output projection.

    Values: ``y = rope(o, positions, cos_sin_cache, inverse=True)`` in fp32 math, then UE8M0 e4m3
    per 128 elements of the ``[T, G, D]`` view (``2^ceil(log2(amax/448))``, amax floor 1e-10;
    docs/numerics.md §4.2, §8.3), laid out for DeepGEMM's grouped FP8 einsum (docs/numerics.md
    §5.6). ``round_rope_bf16=True`` (default): the rotated dims are rounded to bf16 before the amax
    and the quant (DeepSeek's reference; the plain ``rope`` → ``fp8_block_quant``). ``False``: the
    fp32 rotation is quantized as vLLM's ``fused_inv_rope_fp8_quant`` does (= ``rope(o.float(), ...)``
    → ``fp8_block_quant``); only the last 128-block of each head differs between the modes.

    Args:
        o: ``[T, H, 512]`` bf16 (any strides): the attention output.
        positions: ``[T]`` int32 / int64, the query positions (rows of ``cos_sin_cache``).
        cos_sin_cache: ``[max_pos, 64]`` fp32 / bf16, the layer's RoPE table (any strides).
        n_groups: ``G``, the output-projection groups, a positive int dividing ``H``.
        round_rope_bf16: round the rotated dims to bf16 before quantizing (above).

    Returns:
        ``(o_fp8, scale)``, fresh: ``o_fp8`` float8_e4m3fn ``[T, G, D]`` (``D = (H/G)·512``) with
        strides ``(D, T·D, 1)``; ``scale`` fp32 ``2^e`` ``[G, T, D/128]`` with strides
        ``((D/128)·T_al, 1, T_al)``, ``T_al`` = ``T`` rounded up to 4: a contiguous
        ``[G, D/128, T_al]`` buffer, padding rows zero. vLLM's kernel returns the same ``o_fp8`` and
        this same scale storage as ``scale.transpose(0, 1)`` (``[T, G, D/128]``, strides
        ``(1, (D/128)·T_al, T_al)``).

    Mutates:
        Nothing.

    Raises:
        ValueError: ``o`` is not 3-D bf16 with last dim 512; ``positions`` is not 1-D int32 / int64
            with ``T`` entries; ``cos_sin_cache`` is not 2-D fp32 / bf16 ``[max_pos, 64]``; a tensor
            is on another device than ``o``; ``n_groups`` is not a positive int dividing ``H``.
        ValueError: a position outside ``[0, max_pos)`` (checked on CPU tensors, and on every
            device under ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``fused_inv_rope_fp8_quant`` (SM90 layout for DeepGEMM ``fp8_einsum``); the inverse
        RoPE of the DeepSeek-V4 reference ``Attention`` output.
    """
    _check(o, positions, cos_sin_cache, n_groups)
    return reference.inv_rope_fp8_quant(o, positions, cos_sin_cache, n_groups, round_rope_bf16)


@register_cuda(inv_rope_fp8_quant, strided=('o', 'cos_sin_cache'))
def _inv_rope_fp8_quant_cuda(o, positions, cos_sin_cache, n_groups, round_rope_bf16=True):
    if checks_needed():
        _check(o, positions, cos_sin_cache, n_groups)
    from ..kernels.triton import output

    return output.inv_rope_fp8_quant(o, positions, cos_sin_cache, n_groups, round_rope_bf16)


@inv_rope_fp8_quant.register_fake
def _inv_rope_fp8_quant_fake(o, positions, cos_sin_cache, n_groups, round_rope_bf16=True):
    _check(o, positions, cos_sin_cache, n_groups)
    return _ref_output.empty_outputs(*o.shape, n_groups, o.device, zero_scale_padding=False)

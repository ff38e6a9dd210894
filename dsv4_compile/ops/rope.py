"""``dsv4::rope`` and ``dsv4::hadamard``: the rotation primitives of the plain model."""

from __future__ import annotations

import torch

from .. import reference
from ._lib import (FLOAT_DTYPES, check_power_of_two, check_rope_args, check_tensor, checks_needed, qualname,
                   register_cuda)


@torch.library.custom_op(qualname("rope"), mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """GPT-J interleaved RoPE of the last ``R = cos_sin_cache.shape[-1]`` dims of ``x``.

    Pair ``i`` = dims ``(D−R+2i, D−R+2i+1)`` rotates by the angle whose cosine is
    ``cos_sin_cache[p, i]`` and sine ``cos_sin_cache[p, R/2+i]``; fp32 math in a fixed order, rounded
    once to ``x.dtype``; the first ``D−R`` dims are copied (docs/numerics.md §3).

    Args:
        x: ``[T, ..., D]`` bf16 / fp16 / fp32, at least 2 dims, any strides.
        positions: ``[T]`` int32 / int64, each token's position (a row of ``cos_sin_cache``).
        cos_sin_cache: ``[max_pos, R]`` fp32 / bf16, row ``p`` = ``[cos | sin]`` of the ``R/2``
            angles (``dsv4_compile.rope.cos_sin_cache``); ``R`` even, ``0 < R <= D``.
        inverse: rotate by −θ (``sin → −sin``): the attention output's inverse RoPE.

    Returns:
        A fresh contiguous tensor of ``x``'s shape and dtype.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``x`` is not a float tensor of at least 2 dims; ``positions`` is not 1-D int32 /
            int64 with one entry per token of ``x``; ``cos_sin_cache`` is not 2-D fp32 / bf16; the
            tensors are on different devices; ``R`` is odd, 0 or larger than ``D``.
        ValueError: a position outside ``[0, max_pos)`` (checked on CPU tensors, and on every
            device under ``DSV4_CHECK_INDICES=1``).

    Source:
        The GPT-J (interleaved-pair) rotary embedding of the DeepSeek-V4 reference inference code
        (``apply_rotary_emb``; inverse = conjugate rotation) and vLLM's ``rotary_embedding`` with
        ``is_neox=False`` and the ``[cos | sin]`` table layout.
    """
    check_rope_args("x", x, positions, cos_sin_cache)
    return reference.rope(x, positions, cos_sin_cache, inverse)


@register_cuda(rope, strided=('cos_sin_cache',))
def _rope_cuda(x, positions, cos_sin_cache, inverse=False):
    if checks_needed():
        check_rope_args("x", x, positions, cos_sin_cache)
    from ..kernels.triton import primitives

    return primitives.rope(x, positions, cos_sin_cache, inverse)


@rope.register_fake
def _rope_fake(x, positions, cos_sin_cache, inverse=False):
    check_rope_args("x", x, positions, cos_sin_cache)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check_hadamard(x, scale):
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    check_power_of_two("x's last dim (Hadamard size)", x.shape[-1], 2, 1 << 15)
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number, got {type(scale).__name__}")


@torch.library.custom_op(qualname("hadamard"), mutates_args=())
def hadamard(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Sylvester Hadamard transform of the last dim times ``scale``.

    The unnormalized natural-order Walsh-Hadamard butterfly in fp32 (stages ``h = 1, 2, 4, …``, pair
    ``(a, b) → (a + b, a − b)``), times ``scale``, rounded once to ``x.dtype`` (docs/numerics.md
    §4.4). The indexer's reference-faithful mode uses ``scale = 128^-0.5`` on q and k.

    Args:
        x: ``[..., D]`` bf16 / fp16 / fp32, ``D`` a power of two in ``[2, 32768]``.
        scale: a Python number multiplying the transform (``D^-0.5`` makes it orthonormal).

    Returns:
        A fresh contiguous tensor of ``x``'s shape and dtype.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``x`` is not a float tensor; ``D`` is not a power of two in ``[2, 32768]``;
            ``scale`` is not a Python number.

    Source:
        The DeepSeek-V4 reference inference code's ``rotate_activation`` (``hadamard_transform``
        with scale ``D^-0.5``) applied to indexer q and k before quantization.
    """
    _check_hadamard(x, scale)
    return reference.hadamard(x, scale)


@register_cuda(hadamard)
def _hadamard_cuda(x, scale):
    if checks_needed():
        _check_hadamard(x, scale)
    from ..kernels.triton import primitives

    return primitives.hadamard(x, scale)


@hadamard.register_fake
def _hadamard_fake(x, scale):
    _check_hadamard(x, scale)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)

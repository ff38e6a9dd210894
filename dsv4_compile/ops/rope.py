"""``dsv4::rope`` and ``dsv4::hadamard``: the rotation primitives of the plain model."""

from __future__ import annotations

import torch

from .. import reference
from ._lib import FLOAT_DTYPES, check_power_of_two, check_rope_args, check_tensor, qualname


@torch.library.custom_op(qualname("rope"), mutates_args=())
def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """GPT-J interleaved RoPE of the last ``cos_sin_cache.shape[-1]`` dims of ``x [T, ..., D]``.

    ``positions [T]`` int32/int64 index rows of ``cos_sin_cache [max_pos, R]`` (fp32 or bf16,
    ``[cos | sin]``); fp32 math rounded to ``x.dtype``; ``inverse=True`` rotates by −θ (output path).
    Returns a fresh contiguous tensor.
    """
    check_rope_args("x", x, positions, cos_sin_cache)
    return reference.rope(x, positions, cos_sin_cache, inverse)


@rope.register_kernel("cuda")
def _rope_cuda(x, positions, cos_sin_cache, inverse=False):
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
    """Sylvester Hadamard transform of the last dim (a power of two) times ``scale``; fp32 butterfly,
    rounded to ``x.dtype``. The indexer's reference-faithful mode uses ``scale = D^-0.5``."""
    _check_hadamard(x, scale)
    return reference.hadamard(x, scale)


@hadamard.register_kernel("cuda")
def _hadamard_cuda(x, scale):
    _check_hadamard(x, scale)
    from ..kernels.triton import primitives

    return primitives.hadamard(x, scale)


@hadamard.register_fake
def _hadamard_fake(x, scale):
    _check_hadamard(x, scale)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)

"""Fused lightning-indexer query ops (docs/numerics.md §7.1): RoPE → [Hadamard] → FP8 / MXFP4 → weights.

``hadamard=False`` gives vLLM-compatible bytes; ``hadamard=True`` is the reference-faithful mode
(RoPE → bf16 → Hadamard with scale D^-0.5 → bf16 → quant).
"""

from __future__ import annotations

import torch

from .. import layouts, reference
from ._lib import (FLOAT_DTYPES, check_power_of_two, check_rope_args, check_tensor, checks_needed, qualname,
                   register_cuda)


def _check(q, positions, cos_sin_cache, weights, weight_scale):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_power_of_two("q's head_dim", q.shape[-1], layouts.MXFP4_BLOCK, 1024)
    check_rope_args("q", q, positions, cos_sin_cache)
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    if tuple(weights.shape) != tuple(q.shape[:2]):
        raise ValueError(f"weights must be [T, H] = {tuple(q.shape[:2])}, got {tuple(weights.shape)}")
    if not isinstance(weight_scale, (int, float)):
        raise ValueError(f"weight_scale must be a Python number, got {type(weight_scale).__name__}")


@torch.library.custom_op(qualname("indexer_q_rope_fp8"), mutates_args=())
def indexer_q_rope_fp8(
    q: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    weights: torch.Tensor,
    weight_scale: float,
    hadamard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer query, FP8 path: RoPE → bf16 → [Hadamard → bf16] → e4m3, q scale folded into the weights.

    One FP8 block of ``D`` per (token, head) with a UE8M0 scale ``q_scale = 2^ceil(log2(amax/448))``
    (amax floor 1e-4); ``q_scale`` is not returned but folded into the weights, which is exact for
    the indexer score because ReLU is positively homogeneous (docs/numerics.md §7.1). Equals
    ``fp8_block_quant(y, D, 1e-4)`` and ``weights.float() · weight_scale · q_scale`` bit for bit, with
    ``y = rope(q, ...)`` (``hadamard(rope(q, ...), D^-0.5)`` when ``hadamard``), each rounded to
    ``q.dtype``.

    Args:
        q: ``[T, H, D]`` bf16 (fp16 / fp32 accepted), ``D`` a power of two in ``[32, 1024]`` (128 in
            DSv4): the indexer query ``qr @ wq_b^T``, RoPE on its last ``R`` dims.
        positions: ``[T]`` int32 / int64, each token's position (a row of ``cos_sin_cache``).
        cos_sin_cache: ``[max_pos, R]`` fp32 / bf16, the layer's RoPE table (``R`` even,
            ``0 < R <= D``; 64 in DSv4).
        weights: ``[T, H]`` bf16 / fp16 / fp32, the ``weights_proj(x)`` output.
        weight_scale: a Python number folded into the weights: the indexer's
            ``softmax_scale · head_scale`` = ``D^-0.5 · H^-0.5``.
        hadamard: rotate q with ``hadamard(·, D^-0.5)`` after the RoPE (the reference-faithful mode);
            ``False`` gives vLLM's bytes.

    Returns:
        ``(q_fp8, weights_out)``: ``q_fp8`` float8_e4m3fn ``[T, H, D]`` and ``weights_out`` fp32
        ``[T, H]`` = ``weights · weight_scale · q_scale`` (fp32, in that order); fresh, contiguous.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``q`` is not a 3-D float tensor; ``D`` is not a power of two in ``[32, 1024]``;
            ``positions`` is not 1-D int32 / int64 with ``T`` entries; ``cos_sin_cache`` is not 2-D
            fp32 / bf16 with an even width in ``(0, D]``; ``weights`` is not a float ``[T, H]``; a
            tensor is on another device than ``q``; ``weight_scale`` is not a Python number.
        ValueError: a position outside ``[0, max_pos)`` (checked on CPU tensors, and on every
            device under ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``fused_indexer_q_rope_quant`` (FP8 path: per-(token, head) UE8M0 q scale folded into
        the weights); the Hadamard mode follows the DeepSeek-V4 reference ``Indexer``
        (``rotate_activation``).
    """
    _check(q, positions, cos_sin_cache, weights, weight_scale)
    return reference.indexer_q_rope_fp8(q, positions, cos_sin_cache, weights, weight_scale, hadamard)



@torch.library.custom_op(qualname("indexer_q_rope_mxfp4"), mutates_args=())
def indexer_q_rope_mxfp4(
    q: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    weights: torch.Tensor,
    weight_scale: float,
    hadamard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indexer query, MXFP4 path: RoPE → bf16 → [Hadamard → bf16] → MXFP4, weights scaled.

    Equals ``mxfp4_quant(y)`` and ``weights.float() · weight_scale`` bit for bit, with ``y`` as in
    ``indexer_q_rope_fp8`` (docs/numerics.md §4.3, §7.1); the per-block q scales stay in ``scale``.

    Args:
        q: ``[T, H, D]`` bf16 (fp16 / fp32 accepted), ``D`` a power of two in ``[32, 1024]`` (128 in
            DSv4): the indexer query ``qr @ wq_b^T``, RoPE on its last ``R`` dims.
        positions: ``[T]`` int32 / int64, each token's position (a row of ``cos_sin_cache``).
        cos_sin_cache: ``[max_pos, R]`` fp32 / bf16, the layer's RoPE table (``R`` even,
            ``0 < R <= D``; 64 in DSv4).
        weights: ``[T, H]`` bf16 / fp16 / fp32, the ``weights_proj(x)`` output.
        weight_scale: a Python number folded into the weights: the indexer's
            ``softmax_scale · head_scale`` = ``D^-0.5 · H^-0.5``.
        hadamard: rotate q with ``hadamard(·, D^-0.5)`` after the RoPE (the reference-faithful mode);
            ``False`` gives vLLM's bytes.

    Returns:
        ``(packed, scale, weights_out)``: ``packed`` uint8 ``[T, H, D/2]`` (E2M1 nibbles, even
        element low), ``scale`` uint8 ``[T, H, D/32]`` (UE8M0, byte ``j`` ↔ dims ``32j .. 32j+31``),
        ``weights_out`` fp32 ``[T, H]`` = ``weights · weight_scale`` (no q scale on this path);
        fresh, contiguous.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``q`` is not a 3-D float tensor; ``D`` is not a power of two in ``[32, 1024]``;
            ``positions`` is not 1-D int32 / int64 with ``T`` entries; ``cos_sin_cache`` is not 2-D
            fp32 / bf16 with an even width in ``(0, D]``; ``weights`` is not a float ``[T, H]``; a
            tensor is on another device than ``q``; ``weight_scale`` is not a Python number.
        ValueError: a position outside ``[0, max_pos)`` (checked on CPU tensors, and on every
            device under ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``fused_indexer_q_rope_quant`` (MXFP4 path); MXFP4 as the DeepSeek-V4 reference
        ``fp4_act_quant``; the Hadamard mode follows the reference ``Indexer``.
    """
    _check(q, positions, cos_sin_cache, weights, weight_scale)
    return reference.indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale, hadamard)


def _register_cuda_and_fake(op, kernel_name: str, outputs) -> None:
    """CUDA kernel (CuTe DSL or Triton, per ``kernels.cute.backend``) and fake for one fused op;
    ``outputs(t, h, d)`` lists (shape, dtype)."""

    @register_cuda(op, strided=('q', 'cos_sin_cache'))
    def _cuda(q, positions, cos_sin_cache, weights, weight_scale, hadamard=False):
        if checks_needed():
            _check(q, positions, cos_sin_cache, weights, weight_scale)
        from ..kernels.cute import backend

        if backend(q.device) == "cute":
            from ..kernels.cute import indexer_q
        else:
            from ..kernels.triton import indexer_q

        return getattr(indexer_q, kernel_name)(q, positions, cos_sin_cache, weights, weight_scale, hadamard)

    @op.register_fake
    def _fake(q, positions, cos_sin_cache, weights, weight_scale, hadamard=False):
        _check(q, positions, cos_sin_cache, weights, weight_scale)
        return tuple(torch.empty(shape, dtype=dtype, device=q.device) for shape, dtype in outputs(*q.shape))


_register_cuda_and_fake(
    indexer_q_rope_fp8,
    "indexer_q_rope_fp8",
    lambda t, h, d: [((t, h, d), torch.float8_e4m3fn), ((t, h), torch.float32)],
)
_register_cuda_and_fake(
    indexer_q_rope_mxfp4,
    "indexer_q_rope_mxfp4",
    lambda t, h, d: [((t, h, d // 2), torch.uint8), ((t, h, d // layouts.MXFP4_BLOCK), torch.uint8),
                     ((t, h), torch.float32)],
)

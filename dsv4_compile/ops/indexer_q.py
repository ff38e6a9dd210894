"""Fused lightning-indexer query ops (spec §2.5, §4.6): RoPE → [Hadamard] → FP8 / MXFP4 → weights.

``hadamard=False`` gives vLLM-compatible bytes; ``hadamard=True`` is the reference-faithful mode
(RoPE → bf16 → Hadamard with scale D^-0.5 → bf16 → quant).
"""

from __future__ import annotations

import torch

from .. import layouts, reference
from ._lib import FLOAT_DTYPES, check_power_of_two, check_rope_args, check_tensor, qualname


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
    """Indexer q, FP8 path.

    Args: ``q [T, H, D]`` bf16 (fp16/fp32 accepted; D a power of two, RoPE on the last
    ``cos_sin_cache.shape[-1]`` dims), ``positions [T]`` int32/int64, ``cos_sin_cache [max_pos, R]``
    fp32/bf16, ``weights [T, H]`` (weights_proj output, any float dtype), ``weight_scale`` (the
    indexer's softmax_scale · head_scale).

    Returns ``(q_fp8 float8_e4m3fn [T, H, D], weights_out fp32 [T, H])`` with one UE8M0 scale per
    (token, head); the q scale is folded into ``weights_out = weights · weight_scale · q_scale``.
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
    """Indexer q, MXFP4 path (arguments as ``indexer_q_rope_fp8``).

    Returns ``(packed uint8 [T, H, D/2], scale uint8 [T, H, D/32], weights_out fp32 [T, H])``:
    E2M1 nibbles (even element low), one UE8M0 byte per 32 dims (byte j ↔ dims 32j..32j+31), and
    ``weights_out = weights · weight_scale`` (no q scale on this path).
    """
    _check(q, positions, cos_sin_cache, weights, weight_scale)
    return reference.indexer_q_rope_mxfp4(q, positions, cos_sin_cache, weights, weight_scale, hadamard)


def _register_cuda_and_fake(op, kernel_name: str, outputs) -> None:
    """CUDA kernel (CuTe DSL or Triton, per ``kernels.cute.backend``) and fake for one fused op;
    ``outputs(t, h, d)`` lists (shape, dtype)."""

    @op.register_kernel("cuda")
    def _cuda(q, positions, cos_sin_cache, weights, weight_scale, hadamard=False):
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

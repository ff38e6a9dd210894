"""``dsv4::fp8_block_gemm``: the block-scaled FP8 GEMM of DSv4's FP8 projections;
``dsv4::fp8_linear``: the same with the activation quantization fused in (docs/numerics.md §4.5);
``dsv4::linear_fp32``: the fp32-output GEMM of 16-bit operands (the compressors' and the indexer
weights' projection, docs/numerics.md §2.8)."""

from __future__ import annotations

import torch

from ..reference import gemm as ref
from .. import layouts
from ._lib import FLOAT_DTYPES, check_tensor, checks_needed, qualname, register_cuda
from .quant import _check_fp8

_W_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_weight(w_q, w_scale, out_dtype, device) -> tuple[int, int]:
    """The FP8 weight, its block scales and the output dtype (both ops); returns ``(N, K)``."""
    check_tensor("w_q", w_q, ndim=2, dtypes=(torch.float8_e4m3fn,), device=device)
    check_tensor("w_scale", w_scale, ndim=2, dtypes=_W_SCALE_DTYPES, device=device)
    N, K = w_q.shape
    if K % ref.BLOCK:
        raise ValueError(f"w_q's K = {K} is not a multiple of {ref.BLOCK} (1x128 activation blocks)")
    want = (-(-N // ref.BLOCK), K // ref.BLOCK)
    if tuple(w_scale.shape) != want:
        raise ValueError(f"w_scale must be [ceil(N/128), K/128] = {want}, got {tuple(w_scale.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    return N, K


def _check(x_q, x_scale, w_q, w_scale, out_dtype):
    check_tensor("x_q", x_q, min_ndim=2, dtypes=(torch.float8_e4m3fn,))
    check_tensor("x_scale", x_scale, min_ndim=2, dtypes=(torch.float32,), device=x_q.device)
    if x_q.dim() > 3:
        raise ValueError(f"x_q must be [M, K] or grouped [M, G, K], got {x_q.dim()} dims")
    N, K = _check_weight(w_q, w_scale, out_dtype, x_q.device)
    if x_q.shape[-1] != K:
        raise ValueError(f"x_q's last dim must be w_q's K = {K}, got {tuple(x_q.shape)}")
    if x_q.dim() == 3 and (x_q.shape[1] == 0 or N % (x_q.shape[1] * ref.BLOCK)):
        raise ValueError(f"grouped x_q [M, G, K] with G = {x_q.shape[1]}: w_q's N = {N} must be a multiple of "
                         f"G·128 (each group's rows whole 128-row blocks)")
    want_xs = tuple(x_q.shape[:-1]) + (K // ref.BLOCK,)
    if tuple(x_scale.shape) != want_xs:
        raise ValueError(f"x_scale must be fp32 {list(want_xs)} (x_q's shape, last dim K/128), got "
                         f"{tuple(x_scale.shape)}")


@torch.library.custom_op(qualname("fp8_block_gemm"), mutates_args=())
def fp8_block_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x · wᵀ`` for FP8 activations in 1x128 blocks and an FP8 weight in 128x128 blocks.

    ``out[m, n] = Σ_kb (Σ_{c<128} x_q[m, 128kb+c] · w_q[n, 128kb+c]) · x_scale[m, kb] · w_scale[n//128, kb]``:
    e4m3 products (exact) summed in fp32 per 128-wide K block, each block's partial scaled and added
    in fp32, then cast to ``out_dtype``. Grouped (DSv4's ``wo_a``): with ``x_q [M, G, K]``, output
    columns ``[g·N/G, (g+1)·N/G)`` are group g's ``x_q[:, g]`` times the weight rows of the same range:
    G GEMMs in one call, their outputs side by side.

    Args:
        x_q: e4m3 ``[M, K]``, or ``[M, G, K]`` grouped, ``K`` a multiple of 128
            (``fp8_block_quant(x, 128)``); any strides.
        x_scale: fp32 ``[M, K/128]`` (``[M, G, K/128]`` grouped) activation block scales (UE8M0 powers
            of two from ``fp8_block_quant``; any positive fp32 works); any strides.
        w_q: e4m3 ``[N, K]`` weight as the checkpoint stores it (``nn.Linear`` layout).
            Under programmatic dependent launch the one-row GEMV and the CuTe-DSL kernel read it
            before waiting for the kernel launched just before it on the stream: it must not be that
            kernel's output (checkpoint weights never are).
        w_scale: ``[ceil(N/128), K/128]`` fp32 or ``float8_e8m0fnu`` weight block scales
            (``<name>.scale`` / ``<name>.weight_scale_inv`` of the checkpoint).
        out_dtype: bfloat16 (default), float16 or float32.

    Returns:
        A fresh contiguous ``[M, N]`` tensor of ``out_dtype``.

    Mutates:
        Nothing.

    Raises:
        ValueError: a tensor of the wrong dtype or rank, or on another device than ``x_q``; ``K`` not a
            multiple of 128; ``x_q``'s K differs from ``w_q``'s; grouped with ``N`` not a multiple of
            ``G · 128``; ``x_scale`` not ``x_q``'s shape with last dim ``K/128``; ``w_scale`` not
            ``[ceil(N/128), K/128]``; ``out_dtype`` not bf16 / fp16 / fp32.

    Source:
        ``fp8_gemm`` of the DeepSeek-V4 reference ``kernel.py`` (activations from ``act_quant`` in
        1x128 blocks, weights in 128x128 blocks); DeepGEMM's ``fp8_gemm_nt`` and vLLM's
        ``w8a8_block_fp8_matmul`` compute the same. The CUDA path (``kernels/triton/gemm.py``): one
        row through a GEMV (each program's weight slab loaded before the grid-dependency wait, the
        activation row dequantized once per program, one fp32 dot per output); 2 to 16 rows (and one
        row with K ≤ 2048; up to 32 rows where its launch needs no split-K and at most two 128-row
        tiles an SM), on a Hopper GPU where CuTe DSL runs, through a CuTe-DSL kernel
        (``kernels/cute/gemm.py``: a producer warp streams the weight by TMA into a shared-memory ring,
        wgmma with the weight rows on M, split-K only for few 128-row tiles); other rows through a
        tiled Triton kernel (pipelined weight stream, split-K for small M); both reduce split-K
        partials in split order inside the kernel (deterministic); from 256 rows cuBLAS through
        ``torch._scaled_mm`` with block-wise scales where this torch / GPU takes them
        (``DSV4_FP8_GEMM=triton`` forces the Triton tiled kernel).
    """
    _check(x_q, x_scale, w_q, w_scale, out_dtype)
    return ref.fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype)


@register_cuda(fp8_block_gemm, strided=("x_q", "x_scale"))
def _fp8_block_gemm_cuda(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16):
    if checks_needed():
        _check(x_q, x_scale, w_q, w_scale, out_dtype)
    from ..kernels.triton import gemm

    return gemm.fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype)


@fp8_block_gemm.register_fake
def _fp8_block_gemm_fake(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16):
    _check(x_q, x_scale, w_q, w_scale, out_dtype)
    return torch.empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype, device=x_q.device)


def _check_linear(x, w_q, w_scale, out_dtype, scale_floor):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    _, K = _check_weight(w_q, w_scale, out_dtype, x.device)
    if x.shape[1] != K:
        raise ValueError(f"x must be [M, K] with K = w_q's {K}, a multiple of {ref.BLOCK}, got {tuple(x.shape)}")
    _check_fp8(x, ref.BLOCK, scale_floor)  # fp8_block_quant's own checks (the scale floor)


@torch.library.custom_op(qualname("fp8_linear"), mutates_args=())
def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
               scale_floor: float = layouts.FP8_AMAX_FLOOR) -> torch.Tensor:
    """An FP8 projection of high-precision activations: ``fp8_block_gemm(*fp8_block_quant(x, 128,
    scale_floor), w_q, w_scale, out_dtype)``, bit for bit, without the FP8 activations in memory.

    Args:
        x: ``[M, K]`` bf16 / fp16 / fp32 activations (any strides), ``K`` a multiple of 128.
        w_q: e4m3 ``[N, K]`` weight (``nn.Linear`` layout).
            Under programmatic dependent launch the one-row GEMV and the CuTe-DSL kernel read it
            before waiting for the kernel launched just before it on the stream: it must not be that
            kernel's output (checkpoint weights never are).
        w_scale: ``[ceil(N/128), K/128]`` fp32 or ``float8_e8m0fnu`` weight block scales.
        out_dtype: bfloat16 (default), float16 or float32.
        scale_floor: the activation quant's amax floor (> 0; 1e-4 as DeepSeek's ``act_quant``).

    Returns:
        A fresh contiguous ``[M, N]`` tensor of ``out_dtype``.

    Mutates:
        Nothing.

    Raises:
        ValueError: a tensor of the wrong dtype or rank, or on another device than ``x``; ``x`` not
            ``[M, K]`` with ``w_q``'s ``K`` (a multiple of 128); ``w_scale`` not ``[ceil(N/128),
            K/128]``; ``out_dtype`` not bf16 / fp16 / fp32; ``scale_floor`` not positive.

    Source:
        ``act_quant`` + ``fp8_gemm`` of the DeepSeek-V4 reference ``kernel.py``. The CUDA path for one
        row with K ≤ 4096 is the GEMV quantizing each 1x128 block of ``x`` in registers
        (``kernels/triton/gemm.py``: the quant kernel's own code) as it streams the weight, except
        where ``fp8_block_gemm`` gives the row to the CuTe-DSL kernel (K ≤ 2048 on Hopper); elsewhere
        the two ops' kernels. The ``fp8_linear`` pass (``lowerings/fp8_linear.py``) rewrites the plain
        ``fp8_block_quant`` → ``fp8_block_gemm`` pair into it.
    """
    _check_linear(x, w_q, w_scale, out_dtype, scale_floor)
    return ref.fp8_linear(x, w_q, w_scale, out_dtype, scale_floor)


@register_cuda(fp8_linear, strided=("x",))
def _fp8_linear_cuda(x, w_q, w_scale, out_dtype=torch.bfloat16, scale_floor=layouts.FP8_AMAX_FLOOR):
    if checks_needed():
        _check_linear(x, w_q, w_scale, out_dtype, scale_floor)
    from ..kernels.triton import gemm

    return gemm.fp8_linear(x, w_q, w_scale, out_dtype, scale_floor)


@fp8_linear.register_fake
def _fp8_linear_fake(x, w_q, w_scale, out_dtype=torch.bfloat16, scale_floor=layouts.FP8_AMAX_FLOOR):
    _check_linear(x, w_q, w_scale, out_dtype, scale_floor)
    return torch.empty((x.shape[0], w_q.shape[0]), dtype=out_dtype, device=x.device)


def _check_linear_fp32(x, weight):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [N, K] with x's K = {x.shape[1]}, got {tuple(weight.shape)}")


@torch.library.custom_op(qualname("linear_fp32"), mutates_args=())
def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x · weightᵀ`` with an fp32 result: each product of the two 16-bit values exact in fp32, the
    products summed in fp32, the sum not rounded back to 16 bits.

    Args:
        x: ``[M, K]`` bf16 / fp16 / fp32 activations (any strides).
        weight: ``[N, K]`` of ``x``'s dtype (``nn.Linear`` layout, any strides).
            Under programmatic dependent launch the one-row GEMV reads it before waiting for the
            kernel launched just before it on the stream: it must not be that kernel's output
            (checkpoint weights never are).

    Returns:
        A fresh contiguous fp32 ``[M, N]`` tensor.

    Mutates:
        Nothing.

    Raises:
        ValueError: a tensor not 2-D, of another dtype than bf16 / fp16 / fp32, ``weight`` of another
            dtype or device than ``x``, or ``weight``'s K not ``x``'s.

    Source:
        DSv4's compressors compute ``kv_score = x @ [wkv; wgate]ᵀ`` and the indexer its head weights
        ``x @ weights_projᵀ`` in fp32 (the DeepSeek-V4 reference ``model.py``: ``F.linear`` of the
        ``.float()`` operands); the layer runs them as one GEMM (docs/numerics.md §2.8). The CUDA path
        (``kernels/triton/gemm.py``): one row (the B = 1 decode step) through the GEMV that also runs
        the FP8 projections (the weight slab loaded before the grid-dependency wait, one fp32 dot per
        output), more rows through cuBLAS (``torch.mm`` with ``out_dtype=float32``).
    """
    _check_linear_fp32(x, weight)
    return ref.linear_fp32(x, weight)


@register_cuda(linear_fp32, strided=("x", "weight"))
def _linear_fp32_cuda(x, weight):
    if checks_needed():
        _check_linear_fp32(x, weight)
    from ..kernels.triton import gemm

    return gemm.linear_fp32(x, weight)


@linear_fp32.register_fake
def _linear_fp32_fake(x, weight):
    _check_linear_fp32(x, weight)
    return torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)

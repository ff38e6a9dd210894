"""The attention core (docs/numerics.md §7.2, §8.2): ``dsv4::indexer_topk`` and ``dsv4::sparse_attn``.

* ``indexer_topk``: the lightning indexer's logits ``Σ_h w[t,h]·ReLU(q̂[t,h]·k̂[s])`` over each
  token's visible compressed entries (read through its request's block table from the FP8 or MXFP4
  indexer K cache), then the top-k as local entry indices, int32 ``[T, topk]``, −1 padded.
* ``sparse_attn``: one softmax with the per-head sink over the SWA and compressed candidates given
  as global cache slots (−1 skipped); decode and prefill both go through it.

Both return fresh fixed-shape tensors (no data-dependent sizes, no host sync). Index values are
checked on the host only where that is free (CPU tensors) or asked for (``DSV4_CHECK_INDICES=1``);
otherwise the kernels mask out-of-range indices and never read outside a cache.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import layouts
from ..reference import attention as ref
from ._lib import (INDEX_DTYPES, check_block_entries, check_block_table, check_positive_int, check_range,
                   check_tensor, checks_needed, qualname, register_cuda)
from .cache import _check_fmt, check_cache, check_cache_offset


def _triton():
    from ..kernels.triton import attention as kernels

    return kernels


# --- indexer_topk ---------------------------------------------------------------------------------
def _check_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                compress_ratio):
    _check_fmt(fmt)
    d = layouts.INDEXER_HEAD_DIM
    if fmt == "fp8":
        check_tensor("q", q, ndim=3, dtypes=(torch.float8_e4m3fn,))
        if q.shape[2] != d:
            raise ValueError(f"q must be e4m3 [T, H, {d}] for fmt='fp8', got {tuple(q.shape)}")
        if q_scale is not None:
            raise ValueError("q_scale must be None for fmt='fp8' (the q scale is folded into weights)")
    else:
        check_tensor("q", q, ndim=3, dtypes=(torch.uint8,))
        if q.shape[2] != d // 2:
            raise ValueError(f"q must be packed MXFP4 uint8 [T, H, {d // 2}] for fmt='mxfp4', got {tuple(q.shape)}")
        check_tensor("q_scale", q_scale, ndim=3, dtypes=(torch.uint8,), device=q.device)
        if tuple(q_scale.shape) != (q.shape[0], q.shape[1], d // layouts.MXFP4_BLOCK):
            raise ValueError(f"q_scale must be uint8 [T, H, {d // layouts.MXFP4_BLOCK}], got {tuple(q_scale.shape)}")
    if q.shape[1] == 0:
        raise ValueError("q must have at least one head")
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=q.device)
    if tuple(weights.shape) != tuple(q.shape[:2]):
        raise ValueError(f"weights must be fp32 [T, H] = {tuple(q.shape[:2])}, got {tuple(weights.shape)}")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    if positions.shape[0] != q.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries but q has {q.shape[0]} tokens")
    check_cache("k_cache", k_cache, fmt, block_size, q.device)
    check_block_table(block_table, token_to_req, q.shape[0], "q", q.device)
    check_block_entries(block_table, k_cache.shape[0], "k_cache")
    check_positive_int("topk", topk)
    check_positive_int("compress_ratio", compress_ratio)


@torch.library.custom_op(qualname("indexer_topk"), mutates_args=())
def indexer_topk(
    q: torch.Tensor,
    q_scale: Optional[torch.Tensor],
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    token_to_req: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    fmt: str,
    topk: int,
    compress_ratio: int = 4,
) -> torch.Tensor:
    """Top-``topk`` compressed entries per token by the lightning-indexer score.

    Token ``t`` (request ``req``, position ``p``) sees entries ``s < n = (p+1) // compress_ratio`` of
    its request (capped at ``M·block_size``), read through the block table from the indexer K cache
    and dequantized exactly; their score is ``I[t, s] = Σ_h weights[t, h] · ReLU(q̂[t, h] · k̂[s])``
    in fp32 (docs/numerics.md §7.2; on a GPU each ``q̂·k̂`` is an FP8 tensor-core dot, which keeps
    about 14 accumulator bits: within ``2^-11`` of ``Σ_h weights·Σ_i |q̂_i·k̂_i|``, so the selected set
    can differ from the reference's only among entries whose scores tie within that).

    Args:
        q: the quantized indexer query: e4m3 ``[T, H, 128]`` for ``fmt="fp8"`` (its q scale folded
            into ``weights``), packed MXFP4 uint8 ``[T, H, 64]`` for ``fmt="mxfp4"``; ``H >= 1``.
        q_scale: ``None`` for ``fmt="fp8"``; UE8M0 uint8 ``[T, H, 4]`` block scales for ``"mxfp4"``.
        weights: ``[T, H]`` fp32 head weights with every scale folded in (``indexer_q_rope_*``'s
            ``weights_out``).
        k_cache: ``[num_blocks, page_bytes]`` uint8 indexer K cache of ``fmt`` (as
            ``indexer_k_insert``).
        block_table: ``[R, M]`` int32 indexer-cache pages of each request: entry ``s`` is slot
            ``block_table[req, s // block_size]·block_size + s % block_size``; negative =
            unallocated; any strides. Under programmatic dependent launch the CUDA kernels read it
            (and ``token_to_req``, ``positions``) before waiting for the kernel launched just before
            it on the stream: none of the three may be that kernel's output (step metadata never is).
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, negative = padding token.
        positions: ``[T]`` int32 / int64, each token's position; negative = padding token.
        block_size: entries per page (64).
        fmt: ``"fp8"`` or ``"mxfp4"``.
        topk: entries to keep per token (``index_topk``: 512 Flash, 1024 Pro).
        compress_ratio: tokens per compressed entry (4).

    Returns:
        A fresh int32 ``[T, topk]`` tensor of local entry indices: the ``topk`` visible entries of
        largest score (ties to the lower index; NaN above +inf; −0.0 == +0.0) in increasing index
        order when ``n > topk``; exactly ``0 .. n−1`` then −1 when ``n <= topk``; a row of −1 for
        padding tokens.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``fmt`` is not ``"fp8"`` / ``"mxfp4"``; ``q`` / ``q_scale`` do not match ``fmt``
            as described (dtype, rank, last dim, ``q_scale`` not ``None`` for fp8) or ``H`` is 0;
            ``weights`` is not fp32 ``[T, H]``; ``positions`` is not 1-D int32 / int64 with ``T``
            entries; ``k_cache`` is not a 2-D uint8 cache of ``fmt`` with contiguous pages whose size
            matches ``block_size`` (as ``indexer_k_insert``); ``block_table`` is not 2-D int32;
            ``token_to_req`` is not 1-D int32 / int64 with ``T`` entries; ``block_size``, ``topk`` or
            ``compress_ratio`` is not a positive int; a tensor is on another device than ``q``.
        ValueError: a ``token_to_req`` entry ``>= R`` or a table entry ``>= num_blocks`` (checked on
            CPU tensors, and on every device under ``DSV4_CHECK_INDICES=1``; the GPU kernels
            otherwise mask them).

    Source:
        The DeepSeek-V4 reference ``Indexer`` (``Σ_h w·ReLU(q·k)`` over the visible compressed
        entries, then top-k, −1 for unused slots), computed in vLLM by DeepGEMM's
        ``fp8_fp4_paged_mqa_logits`` and its top-k kernels (``persistent_topk``). The CUDA path
        writes each row's logits only up to its visible count (at most 64 heads on a Hopper GPU with
        CuTe DSL, 16-byte aligned pages of a multiple of 64 entries, and for FP8 a table holding at
        least two 64-entry tiles per CTA of a wave: TMA / bulk-copy + wgmma kernels,
        ``kernels/cute/indexer_logits.py``, MXFP4 decoded to e4m3 in shared memory; else
        ``kernels/triton/attention.py``) and selects with a radix select (``kernels/cute/topk.py``
        where CuTe DSL runs, else ``kernels/triton/topk.py``; ``DSV4_TOPK_SELECT`` forces one): its
        cost follows the context, not ``M·block_size``.
    """
    _check_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                compress_ratio)
    return ref.indexer_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt,
                            topk, compress_ratio)


@register_cuda(indexer_topk, strided=('k_cache',))
def _indexer_topk_cuda(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                       compress_ratio=4):
    if checks_needed():
        _check_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                    compress_ratio)
    return _triton().indexer_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size,
                                  fmt, topk, compress_ratio)


@indexer_topk.register_fake
def _indexer_topk_fake(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                       compress_ratio=4):
    _check_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt, topk,
                compress_ratio)
    return torch.empty((q.shape[0], topk), dtype=torch.int32, device=q.device)


# --- sparse_attn ----------------------------------------------------------------------------------
def _check_indices(name, indices, cache_name, cache, block_size, n_tokens, device):
    check_tensor(name, indices, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if indices.shape[0] != n_tokens:
        raise ValueError(f"{name} has {indices.shape[0]} rows but q has {n_tokens} tokens")
    check_cache(cache_name, cache, "fp8_ds_mla", block_size, device)
    capacity = cache.shape[0] * block_size
    check_range(name, indices, -1, capacity, f"global slots of {cache_name}, −1 = none; it has {capacity} slots")


def _check_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size, comp_block_size):
    check_tensor("q", q, ndim=3, dtypes=(torch.bfloat16,))
    if q.shape[2] != layouts.KV_HEAD_DIM:
        raise ValueError(f"q must be bf16 [T, H, {layouts.KV_HEAD_DIM}], got {tuple(q.shape)}")
    if q.shape[1] == 0:
        raise ValueError("q must have at least one head")
    _check_indices("swa_indices", swa_indices, "swa_cache", swa_cache, swa_block_size, q.shape[0], q.device)
    if (comp_cache is None) != (comp_indices is None):
        raise ValueError("comp_cache and comp_indices must be given together (both None for SWA-only layers)")
    check_positive_int("comp_block_size", comp_block_size)
    if comp_cache is not None:
        _check_indices("comp_indices", comp_indices, "comp_cache", comp_cache, comp_block_size, q.shape[0], q.device)
    check_tensor("sink", sink, ndim=1, dtypes=(torch.float32,), device=q.device)
    if sink.shape[0] != q.shape[1]:
        raise ValueError(f"sink must be fp32 [H] with H = {q.shape[1]} (one logit per head), got {tuple(sink.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat)) or not scale > 0:
        raise ValueError(f"scale must be a positive Python number, got {scale!r}")


@torch.library.custom_op(qualname("sparse_attn"), mutates_args=())
def sparse_attn(
    q: torch.Tensor,
    swa_cache: torch.Tensor,
    swa_indices: torch.Tensor,
    comp_cache: Optional[torch.Tensor],
    comp_indices: Optional[torch.Tensor],
    sink: torch.Tensor,
    scale: float,
    swa_block_size: int,
    comp_block_size: int,
) -> torch.Tensor:
    """Sparse multi-query attention over paged ``fp8_ds_mla`` caches with the per-head sink.

    For head ``h`` of token ``t`` and its candidates ``j`` (the SWA and compressed slots, −1
    skipped; keys = values = the decoded 512-d records): ``s_j = scale · q[t,h]·kv_j``,
    ``m = max(max_j s_j, sink[h])``, ``o = Σ_j e^(s_j−m) kv_j / (Σ_j e^(s_j−m) + e^(sink[h]−m))`` in
    fp32 (docs/numerics.md §8.2). The sink is not scaled and has no value. Prefill and decode both
    go through it. On a Hopper GPU with CuTe DSL, calls of two or more (token, 64-head block) pairs,
    or of more than 64 candidates a token, run a wgmma kernel (``kernels/cute/sparse_attn.py``;
    caches whose base or page stride is not a multiple of 16 bytes go to the Triton kernel), the rest
    the Triton kernel. Where its CTAs would leave most SMs idle (small batches), the candidates split
    over CTAs and each split runs as 2, 4 or 8 CTAs that each compute one slice of the 512 value dims
    (a group's splits merged within a thread-block cluster where those fit); SWA-only rows of 128
    candidates at medium batches run unsplit as such slices (``split_plan``); results of different
    split plans agree within the bf16 tolerance the op is tested to against the reference
    (docs/numerics.md §9.1).

    Args:
        q: ``[T, H, 512]`` bf16 (any strides), ``H >= 1``: the rotated, normalized queries.
        swa_cache: ``[num_blocks, page_bytes]`` uint8 ``fp8_ds_mla`` SWA cache (as ``kv_insert``).
        swa_indices: ``[T, W]`` int32 / int64 global slots of ``swa_cache`` (``swa_indices``'s
            output), −1 = none.
        comp_cache: the ``fp8_ds_mla`` compressed cache (C4 / C128), or ``None`` on SWA-only layers.
        comp_indices: ``[T, K]`` int32 / int64 global slots of ``comp_cache``, −1 = none; ``None``
            exactly when ``comp_cache`` is.
        sink: ``[H]`` fp32 sink logits (``attn_sink``).
        scale: the positive softmax scale applied to ``q·kv`` (``512^-0.5``).
        swa_block_size: slots per page of ``swa_cache`` (64).
        comp_block_size: slots per page of ``comp_cache`` (C4 64, C128 2); a positive int even
            without one.

    Returns:
        A fresh bf16 ``[T, H, 512]`` tensor; 0 for a token without candidates.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``q`` is not bf16 ``[T, H, 512]`` or ``H`` is 0; an index tensor is not 2-D
            int32 / int64 with ``T`` rows; a cache is not a 2-D uint8 ``fp8_ds_mla`` cache whose page
            size matches its block size (as ``kv_insert``); only one of ``comp_cache`` /
            ``comp_indices`` is given; a block size is not a positive int; ``sink`` is not fp32
            ``[H]``; ``scale`` is not a positive number; a tensor is on another device than ``q``.
        ValueError: an index outside ``[−1, num_blocks · block_size)`` of its cache (checked on CPU
            tensors, and on every device under ``DSV4_CHECK_INDICES=1``; the GPU kernel otherwise
            skips it).

    Source:
        FlashMLA's sparse decode (``flash_mla_with_kvcache`` with ``indices``, ``extra_indices``
        and ``attn_sink``, FP8 ``fp8_ds_mla`` KV cache) as vLLM calls it for DSv4, and the sink
        attention of the DeepSeek-V4 reference ``Attention``.
    """
    _check_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size, comp_block_size)
    return ref.sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size,
                           comp_block_size)


@register_cuda(sparse_attn, strided=('q', 'swa_cache', 'comp_cache'))
def _sparse_attn_cuda(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size,
                      comp_block_size):
    if checks_needed():
        _check_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size, comp_block_size)
    else:  # what the guards of a traced call do not hold
        check_cache_offset("swa_cache", swa_cache, "fp8_ds_mla")
        if comp_cache is not None:
            check_cache_offset("comp_cache", comp_cache, "fp8_ds_mla")
    from ..kernels.cute import backend

    if backend(q.device) == "cute":
        from ..kernels.cute import sparse_attn as cute_attn

        n_cand = swa_indices.shape[1] + (comp_indices.shape[1] if comp_indices is not None else 0)
        if cute_attn.preferred(q, n_cand) and cute_attn.supports(q, swa_cache, comp_cache):
            return cute_attn.sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale,
                                         swa_block_size, comp_block_size)
    return _triton().sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size,
                                 comp_block_size)


@sparse_attn.register_fake
def _sparse_attn_fake(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size,
                      comp_block_size):
    _check_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale, swa_block_size, comp_block_size)
    return torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)

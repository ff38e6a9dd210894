"""Compressor ops (docs/numerics.md §6, state layout §5.5) and the exact RMSNorm they use.

Plain form (what a model writes; ``dsv4_compile.lowerings`` fuses it into ``compressor_insert``)::

    dsv4.compressor_state_save(kv_score, positions, ape, state_cache, state_slot_mapping, sbs)
    pooled = dsv4.compressor_pool(state_cache, positions, state_block_table, token_to_req, sbs, r, d)
    y = dsv4.rope(dsv4.rms_norm(pooled, norm_weight, eps), positions // r * r, cos_sin_cache)
    y = y.to(torch.bfloat16)                           # [+ dsv4.hadamard(y, d ** -0.5), indexer]
    dsv4.kv_insert(y, kv_cache, slot_mapping, bs)      # or dsv4.indexer_k_insert(..., fmt)

``slot_mapping`` is the compressed-cache slot of the entry a token closes (−1 for tokens that
close none, and for padding); pooled rows of tokens that close no window are 0. Partial windows
live in the state cache, so a sequence compressed in one prefill, in chunks, or token by token
writes identical bytes.
"""

from __future__ import annotations

import torch

from .. import layouts
from ..reference import compressor as ref
from ._lib import (FLOAT_DTYPES, INDEX_DTYPES, check_block_entries, check_block_table, check_positive_int,
                   check_range, check_rope_args, check_tensor, checks_needed, qualname, register_cuda)
from .cache import check_cache, check_cache_offset, check_slots


# --- rms_norm -----------------------------------------------------------------------------------
def _check_norm_weight(name, weight, dim, eps, device):
    check_tensor(name, weight, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    if weight.shape[0] != dim:
        raise ValueError(f"{name} has {weight.shape[0]} entries but the normalized dim is {dim}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _check_norm(x, weight, eps):
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    if x.shape[-1] > 8192:
        raise ValueError(f"x's last dim must be at most 8192, got {x.shape[-1]}")
    _check_norm_weight("weight", weight, x.shape[-1], eps, x.device)


@torch.library.custom_op(qualname("rms_norm"), mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weighted RMSNorm over the last dim with a fixed fp32 operation order.

    ``y = (x · 1/sqrt(tree_sum(x²)/D + eps)) · weight`` in fp32, rounded to ``x.dtype``: the sum of
    squares is a balanced pairwise tree, division and square root are correctly rounded, so every
    backend gives the same bits (docs/numerics.md §6.4). The compressor's norm.

    Args:
        x: ``[..., D]`` bf16 / fp16 / fp32, ``D <= 8192``.
        weight: ``[D]`` bf16 / fp16 / fp32 on ``x``'s device.
        eps: a positive Python number added to the mean square (1e-6 in DSv4).

    Returns:
        A fresh tensor of ``x``'s shape and dtype.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``x`` is not a float tensor of at least 1 dim or ``D > 8192``; ``weight`` is not a
            1-D float tensor of ``D`` entries on ``x``'s device; ``eps`` is not a positive number.

    Source:
        The RMSNorm of the DeepSeek-V4 reference ``Compressor`` (``compressor.norm``); the fixed
        reduction order is this project's, so that CPU and GPU agree bit for bit.
    """
    _check_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


@register_cuda(rms_norm)
def _rms_norm_cuda(x, weight, eps):
    if checks_needed():
        _check_norm(x, weight, eps)
    from ..kernels.triton import compressor as kernels

    return kernels.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    _check_norm(x, weight, eps)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --- shared validation ----------------------------------------------------------------------------
def _check_ratio_dim(compress_ratio, head_dim):
    layouts.compress_overlap(compress_ratio)  # ValueError unless 4 or 128
    if head_dim not in (layouts.KV_HEAD_DIM, layouts.INDEXER_HEAD_DIM):
        raise ValueError(f"head_dim must be {layouts.KV_HEAD_DIM} (main) or {layouts.INDEXER_HEAD_DIM} "
                         f"(indexer), got {head_dim}")


def _check_state_cache(state_cache, compress_ratio, head_dim, state_block_size, device):
    check_positive_int("state_block_size", state_block_size)
    check_tensor("state_cache", state_cache, ndim=2, dtypes=(torch.uint8,), device=device)
    row = 4 * layouts.compressor_state_row_floats(compress_ratio, head_dim)
    if state_cache.shape[1] < state_block_size * row:
        raise ValueError(f"state_cache pages hold {state_cache.shape[1]} bytes but {state_block_size} rows of "
                         f"{row} B need {state_block_size * row}")
    pages_contiguous = state_cache.shape[1] <= 1 or state_cache.stride(1) == 1
    if state_cache.shape[1] % 4 or state_cache.stride(0) % 4 or not pages_contiguous:
        _state_cache_error(state_cache)
    check_state_offset(state_cache)


def _state_cache_error(state_cache):
    raise ValueError("state_cache must be fp32-addressable: contiguous pages whose size, stride and offset are "
                     f"multiples of 4 bytes, got shape {tuple(state_cache.shape)} strides {state_cache.stride()} "
                     f"storage offset {state_cache.storage_offset()}")


def check_state_offset(state_cache) -> None:
    """The part of the state-cache check Dynamo's guards do not hold (the storage offset is not
    guarded): a multiple of 4 bytes. Runs on every call, trusted or not."""
    if state_cache.storage_offset() % 4:
        _state_cache_error(state_cache)


def _check_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size):
    check_tensor("ape", ape, ndim=2, dtypes=(torch.float32,))
    r, w = ape.shape
    coff = layouts.compress_overlap(r)
    if w % coff:
        raise ValueError(f"ape must be [r, coff·d]; {w} is not a multiple of coff={coff}")
    _check_ratio_dim(r, w // coff)
    check_tensor("kv_score", kv_score, ndim=2, dtypes=FLOAT_DTYPES, device=ape.device)
    if kv_score.shape[1] != 2 * w:
        raise ValueError(f"kv_score must be [T, 2·{w}] ([kv | score]), got {tuple(kv_score.shape)}")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=ape.device)
    if positions.shape[0] != kv_score.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries but kv_score has {kv_score.shape[0]} rows")
    check_range("positions", positions, 0, None, "non-negative")
    _check_state_cache(state_cache, r, w // coff, state_block_size, ape.device)
    check_slots("state_slot_mapping", state_slot_mapping, kv_score.shape[0], state_cache.shape[0] * state_block_size,
                ape.device)


def _check_pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim,
                state_checked=False):
    _check_ratio_dim(compress_ratio, head_dim)
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    if not state_checked:  # compressor_insert has validated it with the state save's arguments
        _check_state_cache(state_cache, compress_ratio, head_dim, state_block_size, positions.device)
    check_block_table(state_block_table, token_to_req, positions.shape[0], "positions", positions.device)
    check_block_entries(state_block_table, state_cache.shape[0], "state_cache")


# --- compressor_state_save ----------------------------------------------------------------------
@torch.library.custom_op(qualname("compressor_state_save"), mutates_args=("state_cache",))
def compressor_state_save(
    kv_score: torch.Tensor,
    positions: torch.Tensor,
    ape: torch.Tensor,
    state_cache: torch.Tensor,
    state_slot_mapping: torch.Tensor,
    state_block_size: int,
) -> None:
    """Write each token's compressor state row ``[kv | score + ape[p % r]]`` to its state slot.

    The row is ``2W`` fp32 values, ``W = coff·d`` (docs/numerics.md §5.5, §6.1); the compress ratio
    ``r`` and ``W`` come from ``ape``'s shape.

    Args:
        kv_score: ``[T, 2W]`` bf16 / fp16 / fp32 (any strides): ``[x @ wkv^T | x @ wgate^T]``, the
            compressor's fp32 GEMM output.
        positions: ``[T]`` int32 / int64, each token's position (``>= 0``).
        ape: ``[r, W]`` fp32, the per-position score bias; ``r`` = 4 (C4, coff 2) or 128 (C128,
            coff 1); ``W / coff`` = 512 (main) or 128 (indexer).
        state_cache: ``[num_blocks, page_bytes]`` uint8 state cache read as fp32 rows of ``2W``,
            ``page_bytes >= state_block_size · 8W``.
        state_slot_mapping: ``[T]`` int32 / int64 state slot of each token, −1 = skip.
        state_block_size: state rows per page (4 for C4, 8 for C128).

    Returns:
        None.

    Mutates:
        state_cache: the ``8W`` bytes of every row in ``state_slot_mapping`` (−1 skipped); no other
            byte.

    Raises:
        ValueError: ``ape`` is not 2-D fp32, ``r`` is not 4 or 128, ``W`` is not a multiple of
            ``coff`` or ``W / coff`` is not 512 or 128; ``kv_score`` is not a 2-D float ``[T, 2W]``;
            ``positions`` is not 1-D int32 / int64 with ``T`` entries; ``state_cache`` is not 2-D
            uint8, its pages hold fewer than ``state_block_size`` rows of ``8W`` bytes, or they are
            not fp32-addressable (contiguous, size, stride and offset multiples of 4 bytes);
            ``state_block_size`` is not a positive int; ``state_slot_mapping`` is not 1-D int32 /
            int64 with ``T`` entries; a tensor is on another device than ``ape``.
        ValueError: a negative position or a state slot outside ``[−1, num_blocks ·
            state_block_size)`` (checked on CPU tensors, and on every device under
            ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``save_partial_states`` (DSv4 compressor state cache, APE add fused).
    """
    _check_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)
    ref.state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)


@register_cuda(compressor_state_save, strided=('kv_score',))
def _state_save_cuda(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size):
    if checks_needed():
        _check_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)
    else:  # what the guards of a traced call do not hold
        check_state_offset(state_cache)
    from ..kernels.triton import compressor as kernels

    kernels.state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)


@compressor_state_save.register_fake
def _state_save_fake(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size):
    _check_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)


# --- compressor_pool ----------------------------------------------------------------------------
@torch.library.custom_op(qualname("compressor_pool"), mutates_args=())
def compressor_pool(
    state_cache: torch.Tensor,
    positions: torch.Tensor,
    state_block_table: torch.Tensor,
    token_to_req: torch.Tensor,
    state_block_size: int,
    compress_ratio: int,
    head_dim: int,
) -> torch.Tensor:
    """Pool the window each token closes: a per-channel softmax over its state rows.

    For a token at ``p`` with ``(p+1) % r == 0``: C128 pools rows ``p−127 .. p``; C4 pools 8 rows, the
    A halves of ``p−7 .. p−4`` and the B halves of ``p−3 .. p``. Per channel, ``Σ e·kv / Σ e`` with
    ``e = exp(score − max score)`` in fp32 with the fixed ``exp_fp32`` / ``tree_sum`` of
    docs/numerics.md §6.4 (the windows: §6.2). Rows at negative positions, of padding tokens or
    without a state page weigh 0; other tokens pool to 0.

    Args:
        state_cache: ``[num_blocks, page_bytes]`` uint8 state cache (as ``compressor_state_save``).
        positions: ``[T]`` int32 / int64, each token's position.
        state_block_table: ``[R, M]`` int32 state pages of each request: position ``q`` of request
            ``req`` is row ``q % state_block_size`` of page ``state_block_table[req, q //
            state_block_size]`` (negative = no page).
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, −1 = padding token.
        state_block_size: state rows per page (4 for C4, 8 for C128).
        compress_ratio: ``r``, 4 (C4) or 128 (C128).
        head_dim: ``d``, 512 (main compressor) or 128 (indexer compressor).

    Returns:
        A fresh fp32 ``[T, head_dim]`` tensor; rows of tokens that close no window are 0.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``compress_ratio`` is not 4 or 128; ``head_dim`` is not 512 or 128;
            ``positions`` is not 1-D int32 / int64; ``state_cache`` is not 2-D uint8 with pages of at
            least ``state_block_size`` rows of ``8·coff·head_dim`` bytes, fp32-addressable;
            ``state_block_size`` is not a positive int; ``state_block_table`` is not 2-D int32;
            ``token_to_req`` is not 1-D int32 / int64 with ``T`` entries; a tensor is on another
            device than ``positions``.
        ValueError: a ``token_to_req`` entry ``>= R`` or a table entry ``>= num_blocks`` (checked on
            CPU tensors, and on every device under ``DSV4_CHECK_INDICES=1``).

    Source:
        The window pooling of the DeepSeek-V4 reference ``Compressor`` (softmax over the window of
        ``score + ape``, overlapping C4 windows) as vLLM's ``compress_norm_rope_store_*`` kernels read
        it from the paged state cache.
    """
    _check_pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim)
    return ref.pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio,
                    head_dim)


@register_cuda(compressor_pool, strided=('state_cache', 'state_block_table'))
def _pool_cuda(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim):
    if checks_needed():
        _check_pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim)
    else:  # what the guards of a traced call do not hold
        check_state_offset(state_cache)
    from ..kernels.triton import compressor as kernels

    return kernels.pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio,
                        head_dim, None)


@compressor_pool.register_fake
def _pool_fake(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim):
    _check_pool(state_cache, positions, state_block_table, token_to_req, state_block_size, compress_ratio, head_dim)
    return torch.empty((positions.shape[0], head_dim), dtype=torch.float32, device=positions.device)


# --- compressor_insert (fused) --------------------------------------------------------------------
def _check_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                  state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping, block_size, fmt, hadamard):
    _check_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)
    r = ape.shape[0]
    d = ape.shape[1] // layouts.compress_overlap(r)
    _check_pool(state_cache, positions, state_block_table, token_to_req, state_block_size, r, d, state_checked=True)
    _check_norm_weight("norm_weight", norm_weight, d, eps, positions.device)
    check_rope_args("kv_score", kv_score, positions, cos_sin_cache)
    if cos_sin_cache.shape[-1] != layouts.ROPE_DIM:
        raise ValueError(f"cos_sin_cache must rotate the last {layouts.ROPE_DIM} dims, got {cos_sin_cache.shape[-1]}")
    want = "fp8_ds_mla" if d == layouts.KV_HEAD_DIM else layouts.INDEXER_FORMATS
    if (fmt != want) if isinstance(want, str) else (fmt not in want):
        raise ValueError(f"fmt must be {want!r} for head_dim {d}, got {fmt!r}")
    if hadamard and fmt == "fp8_ds_mla":
        raise ValueError("hadamard applies to the indexer compressor (fmt 'fp8' / 'mxfp4') only")
    check_cache("cache", cache, fmt, block_size, positions.device)
    check_slots("slot_mapping", slot_mapping, positions.shape[0], cache.shape[0] * block_size, positions.device)


@torch.library.custom_op(qualname("compressor_insert"), mutates_args=("state_cache", "cache"))
def compressor_insert(
    kv_score: torch.Tensor,
    positions: torch.Tensor,
    ape: torch.Tensor,
    state_cache: torch.Tensor,
    state_slot_mapping: torch.Tensor,
    state_block_table: torch.Tensor,
    token_to_req: torch.Tensor,
    state_block_size: int,
    norm_weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    fmt: str,
    hadamard: bool = False,
) -> None:
    """The whole compressor of one layer and step in one op.

    State save → pool → RMSNorm (fp32) → RoPE at ``(p//r)·r`` (fp32) → bf16 → [Hadamard, indexer
    only] → quantize → insert into ``cache`` at ``slot_mapping`` (docs/numerics.md §6). Equals the
    plain chain ``compressor_state_save``, ``compressor_pool``, ``rms_norm``, ``rope``, ``.to(bf16)``,
    [``hadamard(·, d^-0.5)``], ``kv_insert`` / ``indexer_k_insert`` bit for bit; what
    ``lowerings/compressor.py`` fuses that chain into. ``r`` and ``d`` come from ``ape``'s shape.

    Args:
        kv_score: ``[T, 2W]`` bf16 / fp16 / fp32 (any strides), ``[kv | score]``, ``W = coff·d``.
        positions: ``[T]`` int32 / int64, each token's position.
        ape: ``[r, W]`` fp32 score bias; ``r`` = 4 or 128, ``d`` = 512 (main) or 128 (indexer).
        state_cache: ``[num_blocks, page_bytes]`` uint8 compressor state cache (as
            ``compressor_state_save``).
        state_slot_mapping: ``[T]`` int32 / int64 state slot of each token, −1 = skip.
        state_block_table: ``[R, M]`` int32 state pages of each request (as ``compressor_pool``).
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, −1 = padding token.
        state_block_size: state rows per page (4 for C4, 8 for C128).
        norm_weight: ``[d]`` bf16 / fp16 / fp32, the compressor's RMSNorm weight.
        eps: a positive Python number, the RMSNorm epsilon (1e-6).
        cos_sin_cache: ``[max_pos, 64]`` fp32 / bf16, the layer's RoPE table (any strides).
        cache: ``[num_blocks, page_bytes]`` uint8 cache of ``fmt`` (as ``kv_insert`` /
            ``indexer_k_insert``).
        slot_mapping: ``[T]`` int32 / int64 cache slot of the entry ``p // r`` each token closes, −1
            for tokens that close none (and padding).
        block_size: entries per page of ``cache`` (C4 64, C128 2, indexer 64).
        fmt: ``"fp8_ds_mla"`` for ``d`` = 512, ``"fp8"`` or ``"mxfp4"`` for ``d`` = 128.
        hadamard: rotate the indexer entry with ``hadamard(·, d^-0.5)`` before quantizing (indexer
            formats only).

    Returns:
        None.

    Mutates:
        state_cache: the state rows of ``state_slot_mapping`` (−1 skipped), as
            ``compressor_state_save``; no other byte.
        cache: the records of ``slot_mapping`` (−1 skipped); no other byte.

    Raises:
        ValueError: every error of ``compressor_state_save`` and ``compressor_pool`` for these
            arguments; ``norm_weight`` is not a 1-D float ``[d]`` or ``eps`` not a positive number;
            ``cos_sin_cache`` is not 2-D fp32 / bf16 of width 64; ``fmt`` does not match ``d``;
            ``hadamard`` with ``fmt="fp8_ds_mla"``; ``cache`` is not a 2-D uint8 cache of ``fmt``
            whose page size matches ``block_size`` (as ``kv_insert`` / ``indexer_k_insert``);
            ``block_size`` is not a positive int; ``slot_mapping`` is not 1-D int32 / int64 with
            ``T`` entries.
        ValueError: a position outside ``[0, max_pos)``, a slot outside its cache, a
            ``token_to_req`` entry ``>= R`` or a state table entry ``>= num_blocks`` (checked on CPU
            tensors, and on every device under ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``save_partial_states`` + ``compress_norm_rope_store_{triton,cutedsl}`` (main
        compressor, head 512) and its fused indexer-K compress-and-insert (head 128); the math of the
        DeepSeek-V4 reference ``Compressor`` (with its Hadamard for the indexer).
    """
    _check_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                  state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping, block_size, fmt, hadamard)
    ref.compressor_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                          state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping, block_size, fmt,
                          hadamard)


@register_cuda(compressor_insert, strided=('kv_score', 'cos_sin_cache'))
def _compressor_insert_cuda(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table,
                            token_to_req, state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping,
                            block_size, fmt, hadamard=False):
    if checks_needed():
        _check_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                      state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping, block_size, fmt, hadamard)
    else:  # what the guards of a traced call do not hold
        check_state_offset(state_cache)
        check_cache_offset("cache", cache, fmt)
    from ..kernels.triton import compressor as kernels

    kernels.compressor_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table,
                              token_to_req, state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping,
                              block_size, fmt, hadamard)


@compressor_insert.register_fake
def _compressor_insert_fake(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table,
                            token_to_req, state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping,
                            block_size, fmt, hadamard=False):
    _check_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                  state_block_size, norm_weight, eps, cos_sin_cache, cache, slot_mapping, block_size, fmt, hadamard)

"""Sparse-attention index construction (docs/numerics.md §8.1): ``dsv4::swa_indices``,
``dsv4::global_topk_indices``, ``dsv4::compressed_indices``.

All three map logical cache entries of a token's request to physical slots through a paged
``block_table [R, M]`` int32 and return fresh int32 ``(indices [T, W], lens [T])``; W is an input
dim or a Python int, so shapes never depend on values and nothing syncs (docs/numerics.md §9.3). Padding tokens
(``token_to_req < 0``; for the position-based ops also ``positions < 0``) get a row of −1 and
``lens = 0``. See ``reference.indices`` for the rules on unallocated pages and ``lens``.
"""

from __future__ import annotations

import torch

from ..reference import indices as ref
from ._lib import (INDEX_DTYPES, check_block_table, check_positive_int, check_tensor, checks_needed, qualname,
                   register_cuda)


def _check_positional(positions, block_table, token_to_req, block_size, **ints) -> None:
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    check_positive_int("block_size", block_size)
    for name, value in ints.items():
        check_positive_int(name, value)
    check_block_table(block_table, token_to_req, positions.shape[0], "positions", positions.device)


def _check_topk(topk, block_table, token_to_req, block_size) -> None:
    check_tensor("topk", topk, ndim=2, dtypes=(torch.int32,))
    check_positive_int("block_size", block_size)
    check_block_table(block_table, token_to_req, topk.shape[0], "topk", topk.device)


def _empty_pair(t, width, device):
    return (
        torch.empty((t, width), dtype=torch.int32, device=device),
        torch.empty((t,), dtype=torch.int32, device=device),
    )


# ---------------------------------------------------------------------------------------------
# swa_indices
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(qualname("swa_indices"), mutates_args=())
def swa_indices(
    positions: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor, block_size: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window cache slots of each token.

    Row ``t`` lists the SWA-cache slots of positions ``max(0, p−window+1) .. p`` of the token's
    request, through its block table (docs/numerics.md §8.1).

    Args:
        positions: ``[T]`` int32 / int64, each token's position; negative = padding token.
        block_table: ``[R, M]`` int32 SWA pages of each request (position ``q`` → page
            ``block_table[req, q // block_size]``), negative = unallocated page; any strides.
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, negative = padding token.
        block_size: tokens per page (64).
        window: the sliding window in tokens, the current one included (128 in DSv4).

    Returns:
        ``(indices, lens)``, fresh int32 ``[T, window]`` and ``[T]``: with ``swa_len = min(p+1,
        window)``, ``indices[t, j]`` = slot of position ``max(0, p−window+1) + j`` for
        ``j < swa_len``, −1 beyond; ``lens = swa_len``. A page outside the table or a negative table
        entry gives −1 at that index but still counts in ``lens``. Padding tokens: all −1, ``lens`` 0.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``positions`` is not 1-D int32 / int64; ``block_size`` or ``window`` is not a
            positive int; ``block_table`` is not 2-D int32; ``token_to_req`` is not 1-D int32 /
            int64 with ``T`` entries; a tensor is on another device than ``positions``.
        ValueError: a ``token_to_req`` entry ``>= R`` (checked on CPU tensors, and on every device
            under ``DSV4_CHECK_INDICES=1``; the GPU kernels otherwise treat the token as padding).

    Source:
        vLLM's decode SWA indices (``decode_swa_indices`` / ``decode_swa_lens`` of its DSv4 metadata
        builder; tokenspeed's ``decode_swa_indices_and_lens``).
    """
    _check_positional(positions, block_table, token_to_req, block_size, window=window)
    return ref.swa_indices(positions, block_table, token_to_req, block_size, window)


@register_cuda(swa_indices, strided=('block_table',))
def _swa_indices_cuda(positions, block_table, token_to_req, block_size, window):
    if checks_needed():
        _check_positional(positions, block_table, token_to_req, block_size, window=window)
    from ..kernels.triton import indices

    return indices.swa_indices(positions, block_table, token_to_req, block_size, window)


@swa_indices.register_fake
def _swa_indices_fake(positions, block_table, token_to_req, block_size, window):
    _check_positional(positions, block_table, token_to_req, block_size, window=window)
    return _empty_pair(positions.shape[0], window, positions.device)


# ---------------------------------------------------------------------------------------------
# global_topk_indices
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(qualname("global_topk_indices"), mutates_args=())
def global_topk_indices(
    topk: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-cache slots of the indexer's top-k local entries (CSA).

    Maps each local compressed-entry index of a token's request to its physical slot through the
    compressed cache's block table (docs/numerics.md §8.1).

    Args:
        topk: ``[T, K]`` int32 local compressed-entry indices (``indexer_topk``'s output), −1 = none.
        block_table: ``[R, M]`` int32 pages of the compressed cache of each request, negative =
            unallocated; any strides.
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, negative = padding token.
        block_size: compressed entries per page (64 for C4).

    Returns:
        ``(slots, lens)``, fresh int32 ``[T, K]`` and ``[T]``: ``slots[t, k]`` = slot of entry
        ``topk[t, k]`` (order kept), −1 for a −1 entry, a page outside the table or a negative table
        entry; ``lens[t]`` = number of slots ``>= 0``. Padding tokens: all −1, ``lens`` 0.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``topk`` is not 2-D int32; ``block_size`` is not a positive int;
            ``block_table`` is not 2-D int32; ``token_to_req`` is not 1-D int32 / int64 with ``T``
            entries; a tensor is on another device than ``topk``.
        ValueError: a ``token_to_req`` entry ``>= R`` (checked on CPU tensors, and on every device
            under ``DSV4_CHECK_INDICES=1``; the GPU kernels otherwise treat the token as padding).

    Source:
        vLLM's ``compute_global_topk_indices_and_lens`` (DSv4 C4 decode).
    """
    _check_topk(topk, block_table, token_to_req, block_size)
    return ref.global_topk_indices(topk, block_table, token_to_req, block_size)


@register_cuda(global_topk_indices, strided=('block_table',))
def _global_topk_indices_cuda(topk, block_table, token_to_req, block_size):
    if checks_needed():
        _check_topk(topk, block_table, token_to_req, block_size)
    from ..kernels.triton import indices

    return indices.global_topk_indices(topk, block_table, token_to_req, block_size)


@global_topk_indices.register_fake
def _global_topk_indices_fake(topk, block_table, token_to_req, block_size):
    _check_topk(topk, block_table, token_to_req, block_size)
    return _empty_pair(topk.shape[0], topk.shape[1], topk.device)


# ---------------------------------------------------------------------------------------------
# compressed_indices
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(qualname("compressed_indices"), mutates_args=())
def compressed_indices(
    positions: torch.Tensor,
    block_table: torch.Tensor,
    token_to_req: torch.Tensor,
    block_size: int,
    compress_ratio: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of every compressed entry visible to each token (HCA: "attend to all").

    Entry ``i`` of the token's request is visible iff ``i < (p+1) // compress_ratio``
    (docs/numerics.md §2.7, §8.1).

    Args:
        positions: ``[T]`` int32 / int64, each token's position; negative = padding token.
        block_table: ``[R, M]`` int32 pages of the compressed cache of each request, negative =
            unallocated; any strides.
        token_to_req: ``[T]`` int32 / int64 block-table row of each token, negative = padding token.
        block_size: compressed entries per page (2 for C128).
        compress_ratio: tokens per compressed entry (128 for HCA).
        width: the row width in entries (the model: ``ceil(max_model_len / 128)``; FlashMLA wants a
            multiple of 128).

    Returns:
        ``(slots, lens)``, fresh int32 ``[T, width]`` and ``[T]``: with ``n = (p+1) //
        compress_ratio``, ``slots[t, i]`` = slot of entry ``i`` for ``i < min(n, width)``, −1
        beyond; ``lens = min(n, width)`` (a page outside the table or a negative table entry gives −1
        at that index but still counts). Padding tokens: all −1, ``lens`` 0.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``positions`` is not 1-D int32 / int64; ``block_size``, ``compress_ratio`` or
            ``width`` is not a positive int; ``block_table`` is not 2-D int32; ``token_to_req`` is not
            1-D int32 / int64 with ``T`` entries; a tensor is on another device than ``positions``.
        ValueError: a ``token_to_req`` entry ``>= R`` (checked on CPU tensors, and on every device
            under ``DSV4_CHECK_INDICES=1``; the GPU kernels otherwise treat the token as padding).

    Source:
        vLLM's C128 decode metadata (``build_c128a_topk_metadata``: slots of entries
        ``0 .. (p+1)//128 − 1``).
    """
    _check_positional(positions, block_table, token_to_req, block_size, compress_ratio=compress_ratio, width=width)
    return ref.compressed_indices(positions, block_table, token_to_req, block_size, compress_ratio, width)


@register_cuda(compressed_indices, strided=('block_table',))
def _compressed_indices_cuda(positions, block_table, token_to_req, block_size, compress_ratio, width):
    if checks_needed():
        _check_positional(positions, block_table, token_to_req, block_size, compress_ratio=compress_ratio, width=width)
    from ..kernels.triton import indices

    return indices.compressed_indices(positions, block_table, token_to_req, block_size, compress_ratio, width)


@compressed_indices.register_fake
def _compressed_indices_fake(positions, block_table, token_to_req, block_size, compress_ratio, width):
    _check_positional(positions, block_table, token_to_req, block_size, compress_ratio=compress_ratio, width=width)
    return _empty_pair(positions.shape[0], width, positions.device)

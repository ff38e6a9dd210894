"""Paged cache ops (docs/numerics.md §5): inserts that mutate a whole ``uint8`` cache in place,
and vectorized gathers that dequantize records back.

* ``dsv4::kv_insert`` / ``dsv4::kv_rope_insert``: the ``fp8_ds_mla`` record of bf16 ``kv [T, 512]``.
* ``dsv4::kv_gather``: records back to bf16 ``[N, 512]``.
* ``dsv4::indexer_k_insert`` / ``dsv4::indexer_k_gather``: the indexer K cache, ``fmt`` "fp8" (132 B)
  or "mxfp4" (68 B).

Slot −1 means skip (never written; gathered as zeros). Slots past the cache are rejected with a
``ValueError`` on CPU tensors (free there); on the GPU the kernels mask them (never a byte outside
the cache is read or written) since checking would need a device sync.
"""

from __future__ import annotations

import torch

from .. import layouts
from ..reference import cache as ref
from ._lib import (FLOAT_DTYPES, INDEX_DTYPES, check_positive_int, check_range, check_rope_args, check_tensor,
                   checks_needed, qualname, register_cuda)


def check_cache(name: str, cache, fmt: str, block_size: int, device) -> None:
    """A paged cache: ``uint8 [num_blocks, page_bytes]``, rows contiguous, pages of ``block_size`` slots:
    ``block_size · record bytes <= page_bytes <= layouts.page_bytes(fmt, block_size)`` (else
    "block_size does not match the pages")."""
    check_positive_int("block_size", block_size)
    check_tensor(name, cache, ndim=2, dtypes=(torch.uint8,), device=device)
    v, s = layouts.record_bytes(fmt)
    need, alloc = block_size * (v + s), layouts.page_bytes(fmt, block_size)
    if not need <= cache.shape[1] <= alloc:
        # the record layout inside a page depends on block_size (the scales follow all the values), so
        # pages sized for another block size would be written in the wrong layout
        raise ValueError(
            f"{name} pages hold {cache.shape[1]} bytes but {block_size} {fmt} slots take {need} to {alloc} "
            f"(layouts.page_bytes({fmt!r}, {block_size}) = {alloc}): block_size does not match the pages"
        )
    if cache.shape[1] > 1 and cache.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous pages (stride(1) == 1), got strides {cache.stride()}")
    check_cache_offset(name, cache, fmt)


def check_cache_offset(name: str, cache, fmt: str) -> None:
    """The part of ``check_cache`` Dynamo's guards do not hold (a cache's storage offset is not
    guarded): ``fp8_ds_mla`` pages start at even byte offsets. Runs on every call, trusted or not."""
    if fmt == "fp8_ds_mla" and (cache.stride(0) % 2 or cache.storage_offset() % 2):
        raise ValueError(f"{name} pages must start at even byte offsets (bf16 rope values), got page stride "
                         f"{cache.stride(0)} and storage offset {cache.storage_offset()}")


def check_slots(name: str, slots, n: int | None, capacity: int, device) -> None:
    """``slots [n]`` int32/int64; on CPU (or under ``DSV4_CHECK_INDICES=1``) also every slot in
    ``[-1, capacity)``."""
    check_tensor(name, slots, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if n is not None and slots.shape[0] != n:
        raise ValueError(f"{name} has {slots.shape[0]} entries but there are {n} rows")
    check_range(name, slots, -1, capacity, f"−1 = skip; the cache has {capacity} slots")


def _check_fmt(fmt) -> None:
    if fmt not in layouts.INDEXER_FORMATS:
        raise ValueError(f"fmt must be 'fp8' or 'mxfp4', got {fmt!r}")


def _check_kv(kv, kv_cache, slot_mapping, block_size):
    check_tensor("kv", kv, ndim=2, dtypes=(torch.bfloat16,))
    if kv.shape[1] != layouts.KV_HEAD_DIM:
        raise ValueError(f"kv must be [T, {layouts.KV_HEAD_DIM}], got {tuple(kv.shape)}")
    check_cache("kv_cache", kv_cache, "fp8_ds_mla", block_size, kv.device)
    check_slots("slot_mapping", slot_mapping, kv.shape[0], kv_cache.shape[0] * block_size, kv.device)


def _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size):
    _check_kv(kv, kv_cache, slot_mapping, block_size)
    check_rope_args("kv", kv, positions, cos_sin_cache)
    if cos_sin_cache.shape[-1] != layouts.ROPE_DIM:
        raise ValueError(f"cos_sin_cache must rotate the last {layouts.ROPE_DIM} dims, got {cos_sin_cache.shape[-1]}")


def _check_k(k, cache, slot_mapping, block_size, fmt):
    _check_fmt(fmt)
    check_tensor("k", k, ndim=2, dtypes=FLOAT_DTYPES)
    if k.shape[1] != layouts.INDEXER_HEAD_DIM:
        raise ValueError(f"k must be [T, {layouts.INDEXER_HEAD_DIM}], got {tuple(k.shape)}")
    check_cache("cache", cache, fmt, block_size, k.device)
    check_slots("slot_mapping", slot_mapping, k.shape[0], cache.shape[0] * block_size, k.device)


def _check_gather(cache, slots, block_size, fmt):
    check_tensor("slots", slots, ndim=1, dtypes=INDEX_DTYPES)
    check_cache("cache", cache, fmt, block_size, slots.device)
    check_slots("slots", slots, None, cache.shape[0] * block_size, slots.device)


def _triton():
    from ..kernels.triton import cache as kernels

    return kernels


# --- kv_insert ----------------------------------------------------------------------------------
@torch.library.custom_op(qualname("kv_insert"), mutates_args=("kv_cache",))
def kv_insert(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_size: int) -> None:
    """Write the ``fp8_ds_mla`` record of every row of ``kv`` to its slot of a paged K=V cache.

    Record (584 B, docs/numerics.md §5.2): the 448 nope dims as e4m3 in 7 blocks of 64 with UE8M0
    scales (amax floor 1e-4), the 64 rope dims as their bf16 bytes, then 7 exponent bytes and a 0 pad
    byte in the page's scale region (docs/numerics.md §5.1).

    Args:
        kv: ``[T, 512]`` bf16, any strides: the K=V vectors (RoPE already applied).
        kv_cache: ``[num_blocks, page_bytes]`` uint8 ``fp8_ds_mla`` cache, ``block_size · 584 <=
            page_bytes <= layouts.page_bytes("fp8_ds_mla", block_size)``, contiguous pages starting at
            even byte offsets.
        slot_mapping: ``[T]`` int32 / int64 slot of each row (page ``slot // block_size``), −1 = skip.
        block_size: slots (tokens or compressed entries) per page: 64 for SWA and C4, 2 for C128.

    Returns:
        None.

    Mutates:
        kv_cache: the value and scale bytes of every slot in ``slot_mapping`` (−1 skipped); no
            other byte (other slots and page padding are left as they are).

    Raises:
        ValueError: ``kv`` is not 2-D bf16 ``[T, 512]``; ``kv_cache`` is not 2-D uint8, or its page
            size does not match ``block_size`` (outside ``[block_size · 584,
            layouts.page_bytes("fp8_ds_mla", block_size)]`` bytes), or its pages are not contiguous
            or not at even byte offsets; ``block_size`` is not a positive int; ``slot_mapping`` is
            not 1-D int32 / int64 with ``T`` entries; a tensor is on another device than ``kv``.
        ValueError: a slot outside ``[−1, num_blocks · block_size)`` (checked on CPU tensors, and on
            every device under ``DSV4_CHECK_INDICES=1``; the GPU kernels otherwise skip it).

    Source:
        The KV half of vLLM's ``fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert`` and its
        ``quantize_and_insert_k_cache`` (FlashMLA's ``fp8_ds_mla`` layout); the quantization equals
        the DeepSeek-V4 reference's in-place ``act_quant(kv[..., :-64], 64, "ue8m0")``.
    """
    _check_kv(kv, kv_cache, slot_mapping, block_size)
    ref.kv_insert(kv, kv_cache, slot_mapping, block_size)


def _kv_insert_kernels(device):
    """The ``kv_insert`` kernels for ``device``: CuTe DSL or Triton, per ``kernels.cute.backend``
    (the CuTe launcher itself falls back to Triton for inputs it does not take)."""
    from ..kernels.cute import backend

    if backend(device) == "cute":
        from ..kernels.cute import cache as kernels

        return kernels
    return _triton()


@register_cuda(kv_insert, strided=('kv',))
def _kv_insert_cuda(kv, kv_cache, slot_mapping, block_size):
    if checks_needed():
        _check_kv(kv, kv_cache, slot_mapping, block_size)
    else:  # what the guards of a traced call do not hold
        check_cache_offset("kv_cache", kv_cache, "fp8_ds_mla")
    _kv_insert_kernels(kv.device).kv_insert(kv, None, None, kv_cache, slot_mapping, block_size)


@kv_insert.register_fake
def _kv_insert_fake(kv, kv_cache, slot_mapping, block_size):
    _check_kv(kv, kv_cache, slot_mapping, block_size)


# --- kv_rope_insert -----------------------------------------------------------------------------
@torch.library.custom_op(qualname("kv_rope_insert"), mutates_args=("kv_cache",))
def kv_rope_insert(
    kv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
) -> None:
    """``kv_insert(rope(kv, positions, cos_sin_cache), kv_cache, slot_mapping, block_size)`` in one kernel.

    The rope dims are rotated in fp32 and rounded to bf16 before they are stored; the bytes equal the
    two-op form's (docs/numerics.md §2.2, §3, §5.2). What ``lowerings/kv_insert.py`` fuses into.

    Args:
        kv: ``[T, 512]`` bf16, any strides: the K=V vectors before RoPE.
        positions: ``[T]`` int32 / int64, each token's position (a row of ``cos_sin_cache``).
        cos_sin_cache: ``[max_pos, 64]`` fp32 / bf16, the layer's RoPE table (any strides).
        kv_cache: ``[num_blocks, page_bytes]`` uint8 ``fp8_ds_mla`` cache (as ``kv_insert``).
        slot_mapping: ``[T]`` int32 / int64 slot of each row, −1 = skip.
        block_size: slots per page (64 for the SWA cache).

    Returns:
        None.

    Mutates:
        kv_cache: the value and scale bytes of every slot in ``slot_mapping`` (−1 skipped); no
            other byte.

    Raises:
        ValueError: every error of ``kv_insert``; ``positions`` is not 1-D int32 / int64 with ``T``
            entries; ``cos_sin_cache`` is not 2-D fp32 / bf16 of width 64.
        ValueError: a slot outside ``[−1, num_blocks · block_size)`` or a position outside
            ``[0, max_pos)`` (checked on CPU tensors, and on every device under
            ``DSV4_CHECK_INDICES=1``).

    Source:
        vLLM's ``fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert`` (its K=V part: RoPE, bf16
        rounding, UE8M0 FP8 quantization, paged insert).
    """
    _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)
    ref.kv_rope_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


@register_cuda(kv_rope_insert, strided=('kv', 'cos_sin_cache'))
def _kv_rope_insert_cuda(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size):
    if checks_needed():
        _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)
    else:  # what the guards of a traced call do not hold
        check_cache_offset("kv_cache", kv_cache, "fp8_ds_mla")
    _kv_insert_kernels(kv.device).kv_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


@kv_rope_insert.register_fake
def _kv_rope_insert_fake(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size):
    _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


# --- kv_gather ----------------------------------------------------------------------------------
@torch.library.custom_op(qualname("kv_gather"), mutates_args=())
def kv_gather(kv_cache: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Decode the ``fp8_ds_mla`` records of ``slots`` to bf16 vectors.

    Nope dims ``e4m3 · 2^(byte − 127)`` rounded to bf16 (exact), rope dims the stored bf16
    (docs/numerics.md §5.2). Vectorized: one gather per region, no host sync; safe on an empty
    cache and on an all-padding batch.

    Args:
        kv_cache: ``[num_blocks, page_bytes]`` uint8 ``fp8_ds_mla`` cache (as ``kv_insert``).
        slots: ``[N]`` int32 / int64 slots to read, −1 = none.
        block_size: slots per page.

    Returns:
        A fresh bf16 ``[N, 512]`` tensor; rows of −1 slots are zero.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``slots`` is not 1-D int32 / int64; ``kv_cache`` is not 2-D uint8 on ``slots``'
            device, or its page size does not match ``block_size`` (as ``kv_insert``), or its pages
            are not contiguous or not at even byte offsets; ``block_size`` is not a positive int.
        ValueError: a slot outside ``[−1, num_blocks · block_size)`` (checked on CPU tensors, and on
            every device under ``DSV4_CHECK_INDICES=1``; the GPU kernel otherwise returns zeros).

    Source:
        vLLM's ``dequantize_and_gather_k_cache`` (the prefill dequant-gather of the DSv4 caches).
    """
    _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    return ref.kv_gather(kv_cache, slots, block_size)


@register_cuda(kv_gather, strided=('kv_cache',))
def _kv_gather_cuda(kv_cache, slots, block_size):
    if checks_needed():
        _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    else:  # what the guards of a traced call do not hold
        check_cache_offset("kv_cache", kv_cache, "fp8_ds_mla")
    return _triton().gather(kv_cache, slots, block_size, "fp8_ds_mla")


@kv_gather.register_fake
def _kv_gather_fake(kv_cache, slots, block_size):
    _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    return torch.empty((slots.shape[0], layouts.KV_HEAD_DIM), dtype=torch.bfloat16, device=slots.device)


# --- indexer K ----------------------------------------------------------------------------------
@torch.library.custom_op(qualname("indexer_k_insert"), mutates_args=("cache",))
def indexer_k_insert(k: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                     fmt: str) -> None:
    """Quantize the rows of ``k`` and write them to their slots of a paged indexer K cache.

    ``fmt="fp8"``: one UE8M0 block of 128 (amax floor 1e-4), 128 e4m3 bytes + the fp32 scale ``2^e``
    (132 B/slot, docs/numerics.md §5.3). ``fmt="mxfp4"``: 64 bytes of packed E2M1 nibbles + 4 UE8M0
    bytes (68 B/slot, docs/numerics.md §5.4).

    Args:
        k: ``[T, 128]`` bf16 / fp16 / fp32, any strides: the indexer keys (RoPE, and Hadamard in the
            reference-faithful mode, already applied).
        cache: ``[num_blocks, page_bytes]`` uint8 indexer K cache, ``block_size · 132`` (fp8) or ``· 68``
            (mxfp4) ``<= page_bytes <= layouts.page_bytes(fmt, block_size)``, contiguous pages.
        slot_mapping: ``[T]`` int32 / int64 slot of each row, −1 = skip.
        block_size: compressed entries per page (64 in DSv4).
        fmt: ``"fp8"`` or ``"mxfp4"``.

    Returns:
        None.

    Mutates:
        cache: the value and scale bytes of every slot in ``slot_mapping`` (−1 skipped); no other
            byte.

    Raises:
        ValueError: ``fmt`` is not ``"fp8"`` / ``"mxfp4"``; ``k`` is not a 2-D float ``[T, 128]``;
            ``cache`` is not 2-D uint8, or its page size does not match ``block_size`` (outside
            ``[block_size · 132 (fp8) / 68 (mxfp4), layouts.page_bytes(fmt, block_size)]`` bytes), or
            its pages are not contiguous; ``block_size`` is not a positive int; ``slot_mapping`` is
            not 1-D int32 / int64 with ``T`` entries; a tensor is on another device than ``k``.
        ValueError: a slot outside ``[−1, num_blocks · block_size)`` (checked on CPU tensors, and on
            every device under ``DSV4_CHECK_INDICES=1``; the GPU kernels otherwise skip it).

    Source:
        vLLM's indexer K cache layout (DeepGEMM's ``[num_blocks, block_size, 1, 132]`` view; the
        MXFP4 records of its SM100 ``use_fp4_indexer_cache`` path); the quantization is the
        DeepSeek-V4 reference's ``act_quant`` (FP8) / ``fp4_act_quant`` (MXFP4).
    """
    _check_k(k, cache, slot_mapping, block_size, fmt)
    ref.indexer_k_insert(k, cache, slot_mapping, block_size, fmt)


@register_cuda(indexer_k_insert, strided=('k',))
def _indexer_k_insert_cuda(k, cache, slot_mapping, block_size, fmt):
    if checks_needed():
        _check_k(k, cache, slot_mapping, block_size, fmt)
    _triton().indexer_k_insert(k, cache, slot_mapping, block_size, fmt)


@indexer_k_insert.register_fake
def _indexer_k_insert_fake(k, cache, slot_mapping, block_size, fmt):
    _check_k(k, cache, slot_mapping, block_size, fmt)


@torch.library.custom_op(qualname("indexer_k_gather"), mutates_args=())
def indexer_k_gather(cache: torch.Tensor, slots: torch.Tensor, block_size: int, fmt: str) -> torch.Tensor:
    """Decode the indexer K records of ``slots`` to fp32 keys.

    FP8: ``e4m3 · scale``; MXFP4: ``E2M1 · 2^(byte − 127)`` per 32 dims (docs/numerics.md §5.3,
    §5.4); exact. Vectorized: no per-slot loop, no host sync; safe on an empty cache and on an
    all-padding batch.

    Args:
        cache: ``[num_blocks, page_bytes]`` uint8 indexer K cache of ``fmt`` (as
            ``indexer_k_insert``).
        slots: ``[N]`` int32 / int64 slots to read, −1 = none.
        block_size: entries per page.
        fmt: ``"fp8"`` or ``"mxfp4"``.

    Returns:
        A fresh fp32 ``[N, 128]`` tensor; rows of −1 slots are zero.

    Mutates:
        Nothing.

    Raises:
        ValueError: ``fmt`` is not ``"fp8"`` / ``"mxfp4"``; ``slots`` is not 1-D int32 / int64;
            ``cache`` is not 2-D uint8 on ``slots``' device, or its page size does not match
            ``block_size`` (as ``indexer_k_insert``), or its pages are not contiguous; ``block_size``
            is not a positive int.
        ValueError: a slot outside ``[−1, num_blocks · block_size)`` (checked on CPU tensors, and on
            every device under ``DSV4_CHECK_INDICES=1``; the GPU kernel otherwise returns zeros).

    Source:
        The vectorized reader of tokenspeed PR #238 (``read_deepseek_v4_indexer_fp8_cache``: one
        gather per region instead of a per-slot loop with a host sync), for both formats.
    """
    _check_fmt(fmt)
    _check_gather(cache, slots, block_size, fmt)
    return ref.indexer_k_gather(cache, slots, block_size, fmt)


@register_cuda(indexer_k_gather, strided=('cache',))
def _indexer_k_gather_cuda(cache, slots, block_size, fmt):
    if checks_needed():
        _check_fmt(fmt)
        _check_gather(cache, slots, block_size, fmt)
    return _triton().gather(cache, slots, block_size, fmt)


@indexer_k_gather.register_fake
def _indexer_k_gather_fake(cache, slots, block_size, fmt):
    _check_fmt(fmt)
    _check_gather(cache, slots, block_size, fmt)
    return torch.empty((slots.shape[0], layouts.INDEXER_HEAD_DIM), dtype=torch.float32, device=slots.device)

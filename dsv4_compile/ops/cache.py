"""Paged cache ops (spec §2.3, §4.2, §4.4, §4.5): inserts that mutate a whole ``uint8`` cache in place,
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
from ._lib import FLOAT_DTYPES, INDEX_DTYPES, check_positive_int, check_range, check_rope_args, check_tensor, qualname


def check_cache(name: str, cache, fmt: str, block_size: int, device) -> None:
    """A paged cache: ``uint8 [num_blocks, page_bytes]``, rows contiguous, pages big enough."""
    check_positive_int("block_size", block_size)
    check_tensor(name, cache, ndim=2, dtypes=(torch.uint8,), device=device)
    v, s = layouts.record_bytes(fmt)
    need = block_size * (v + s)
    if cache.shape[1] < need:
        raise ValueError(
            f"{name} pages hold {cache.shape[1]} bytes but {block_size} {fmt} slots need {need} "
            f"(allocate layouts.page_bytes({fmt!r}, {block_size}) = {layouts.page_bytes(fmt, block_size)})"
        )
    if cache.shape[1] > 1 and cache.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous pages (stride(1) == 1), got strides {cache.stride()}")
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
    """Write the ``fp8_ds_mla`` record of every row of bf16 ``kv [T, 512]`` to ``kv_cache`` (uint8
    ``[num_blocks, page_bytes]``) at ``slot_mapping [T]`` (−1 = skip): FP8 UE8M0 of the 448 nope dims
    in 64-blocks (amax floor 1e-4), the 64 rope dims as bf16, 7 exponent bytes + a 0 pad byte."""
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


@kv_insert.register_kernel("cuda")
def _kv_insert_cuda(kv, kv_cache, slot_mapping, block_size):
    _check_kv(kv, kv_cache, slot_mapping, block_size)
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
    """``kv_insert(rope(kv, positions, cos_sin_cache), ...)`` in one kernel: the rope dims are rotated
    in fp32 and rounded to bf16 before they are stored."""
    _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)
    ref.kv_rope_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


@kv_rope_insert.register_kernel("cuda")
def _kv_rope_insert_cuda(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size):
    _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)
    _kv_insert_kernels(kv.device).kv_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


@kv_rope_insert.register_fake
def _kv_rope_insert_fake(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size):
    _check_kv_rope(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size)


# --- kv_gather ----------------------------------------------------------------------------------
@torch.library.custom_op(qualname("kv_gather"), mutates_args=())
def kv_gather(kv_cache: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """bf16 ``[N, 512]`` rows of ``slots [N]`` (nope = e4m3 · 2^(byte−127), rope as stored; −1 → 0)."""
    _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    return ref.kv_gather(kv_cache, slots, block_size)


@kv_gather.register_kernel("cuda")
def _kv_gather_cuda(kv_cache, slots, block_size):
    _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    return _triton().gather(kv_cache, slots, block_size, "fp8_ds_mla")


@kv_gather.register_fake
def _kv_gather_fake(kv_cache, slots, block_size):
    _check_gather(kv_cache, slots, block_size, "fp8_ds_mla")
    return torch.empty((slots.shape[0], layouts.KV_HEAD_DIM), dtype=torch.bfloat16, device=slots.device)


# --- indexer K ----------------------------------------------------------------------------------
@torch.library.custom_op(qualname("indexer_k_insert"), mutates_args=("cache",))
def indexer_k_insert(k: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, block_size: int,
                     fmt: str) -> None:
    """Quantize ``k [T, 128]`` and write it to the indexer K cache at ``slot_mapping`` (−1 = skip).

    ``fmt="fp8"``: one UE8M0 128-block, 128 e4m3 bytes + the fp32 scale (132 B/slot);
    ``fmt="mxfp4"``: 64 packed E2M1 bytes + 4 UE8M0 bytes (68 B/slot).
    """
    _check_k(k, cache, slot_mapping, block_size, fmt)
    ref.indexer_k_insert(k, cache, slot_mapping, block_size, fmt)


@indexer_k_insert.register_kernel("cuda")
def _indexer_k_insert_cuda(k, cache, slot_mapping, block_size, fmt):
    _check_k(k, cache, slot_mapping, block_size, fmt)
    _triton().indexer_k_insert(k, cache, slot_mapping, block_size, fmt)


@indexer_k_insert.register_fake
def _indexer_k_insert_fake(k, cache, slot_mapping, block_size, fmt):
    _check_k(k, cache, slot_mapping, block_size, fmt)


@torch.library.custom_op(qualname("indexer_k_gather"), mutates_args=())
def indexer_k_gather(cache: torch.Tensor, slots: torch.Tensor, block_size: int, fmt: str) -> torch.Tensor:
    """Dequantized fp32 ``[N, 128]`` indexer keys of ``slots [N]`` (−1 → zeros). Vectorized: no
    per-slot loop, no host sync; safe on an empty cache and an all-padding batch."""
    _check_fmt(fmt)
    _check_gather(cache, slots, block_size, fmt)
    return ref.indexer_k_gather(cache, slots, block_size, fmt)


@indexer_k_gather.register_kernel("cuda")
def _indexer_k_gather_cuda(cache, slots, block_size, fmt):
    _check_fmt(fmt)
    _check_gather(cache, slots, block_size, fmt)
    return _triton().gather(cache, slots, block_size, fmt)


@indexer_k_gather.register_fake
def _indexer_k_gather_fake(cache, slots, block_size, fmt):
    _check_fmt(fmt)
    _check_gather(cache, slots, block_size, fmt)
    return torch.empty((slots.shape[0], layouts.INDEXER_HEAD_DIM), dtype=torch.float32, device=slots.device)

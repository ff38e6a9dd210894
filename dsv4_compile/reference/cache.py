"""Paged cache records, bit-exact (docs/numerics.md §5).

A cache is one ``uint8 [num_blocks, page_bytes]`` tensor (``stride(1) == 1``; ``stride(0)`` may
exceed the page). Slot ``s`` lives in page ``s // bs`` at in-page index ``k = s % bs``; its value
bytes sit at ``k·V`` and its scale bytes at ``bs·V + k·S`` (``layouts.RECORD_FORMATS``). A slot
of −1 is skipped: never written, gathered as zeros. Bytes of other slots and the page padding are
never touched.

Records:
* ``fp8_ds_mla`` (main KV, 576 + 8 B): 448 nope dims as e4m3 in 7 UE8M0 blocks of 64 (amax floor
  1e-4), the 64 rope dims as bf16 bytes; scale record = 7 exponent bytes ``e + 127`` + one 0 byte.
* ``fp8`` (indexer K, 128 + 4 B): one 128-block, e4m3 values + the fp32 scale ``2^e``.
* ``mxfp4`` (indexer K, 64 + 4 B): E2M1 nibbles (even element low) + 4 UE8M0 bytes.
"""

from __future__ import annotations

import torch

from .. import layouts
from .quant import fp8_block_quant, mxfp4_dequant, mxfp4_quant, pow2


def encode(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The record bytes of every row of ``x [N, D]``: ``(values uint8 [N, V], scales uint8 [N, S])``."""
    if fmt == "fp8_ds_mla":
        nope = x[:, : layouts.KV_NOPE_DIM]
        q, scale = fp8_block_quant(nope, layouts.KV_QUANT_BLOCK, layouts.FP8_AMAX_FLOOR)
        # scale = 2^e is an fp32 normal, so its biased exponent field is exactly e + 127
        ebytes = ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
        rope = x[:, layouts.KV_NOPE_DIM :].to(torch.bfloat16).contiguous().view(torch.uint8)
        values = torch.cat((q.view(torch.uint8), rope), dim=1)
        scales = torch.cat((ebytes, ebytes.new_zeros(x.shape[0], 1)), dim=1)
    elif fmt == "fp8":
        q, scale = fp8_block_quant(x, layouts.INDEXER_HEAD_DIM, layouts.FP8_AMAX_FLOOR)
        values, scales = q.view(torch.uint8), scale.contiguous().view(torch.uint8)
    elif fmt == "mxfp4":
        values, scales = mxfp4_quant(x)
    else:
        raise ValueError(f"unknown cache format {fmt!r}")
    return values.contiguous(), scales.contiguous()


def decode(values: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Inverse of ``encode`` on raw record bytes: bf16 ``[N, 512]`` (fp8_ds_mla) or fp32 ``[N, 128]``.

    fp8_ds_mla nope: ``e4m3 · 2^(byte − 127)`` with the power of two built from its bits (``pow2``:
    byte 0 → 0, 255 → inf, as the bits say), rounded to bf16; rope: the stored bf16.
    """
    n = values.shape[0]
    if fmt == "fp8_ds_mla":
        nope = values[:, : layouts.KV_NOPE_DIM].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        s = pow2(scales[:, : layouts.KV_NOPE_BLOCKS].to(torch.int32) - layouts.UE8M0_BIAS)
        nope = (nope.view(n, layouts.KV_NOPE_BLOCKS, layouts.KV_QUANT_BLOCK) * s.unsqueeze(-1)).reshape(n, layouts.KV_NOPE_DIM)
        rope = values[:, layouts.KV_NOPE_DIM :].contiguous().view(torch.bfloat16)
        return torch.cat((nope.to(torch.bfloat16), rope), dim=1)
    if fmt == "fp8":
        v = values.contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        return v * scales.contiguous().view(torch.float32)
    if fmt == "mxfp4":
        return mxfp4_dequant(values, scales)
    raise ValueError(f"unknown cache format {fmt!r}")


def _byte_index(slots: torch.Tensor, block_size: int, fmt: str):
    """(page [N, 1], value byte offsets [N, V], scale byte offsets [N, S]) of int64 ``slots >= 0``."""
    v, s = layouts.record_bytes(fmt)
    page = (slots // block_size).unsqueeze(1)
    k = (slots % block_size).unsqueeze(1)
    voff = k * v + torch.arange(v, device=slots.device)
    soff = block_size * v + k * s + torch.arange(s, device=slots.device)
    return page, voff, soff


def insert(x: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, block_size: int, fmt: str) -> None:
    """Encode the rows of ``x`` and write them to their slots; rows with slot −1 are skipped."""
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0  # the CPU kernel: a boolean selection on the host syncs nothing
    values, scales = encode(x[keep], fmt)
    page, voff, soff = _byte_index(slots[keep], block_size, fmt)
    cache[page, voff] = values
    cache[page, soff] = scales


def gather_bytes(cache: torch.Tensor, slots: torch.Tensor, block_size: int, fmt: str):
    """Raw record bytes of ``slots`` (``(values, scales)``; rows of −1 slots are zero bytes).

    Vectorized over all slots: one gather per region, no per-slot loop and no host sync (the bug
    class of tokenspeed PR #238). Safe on an empty cache and on an all-padding batch.
    """
    v, s = layouts.record_bytes(fmt)
    n = slots.shape[0]
    slots = slots.to(torch.int64)
    valid = slots >= 0
    if cache.shape[0] == 0:  # shape-only: nothing can be valid, and row 0 does not exist
        return cache.new_zeros(n, v), cache.new_zeros(n, s)
    page, voff, soff = _byte_index(torch.where(valid, slots, 0), block_size, fmt)
    keep = valid.unsqueeze(1)
    values = torch.where(keep, cache[page, voff], 0)
    scales = torch.where(keep, cache[page, soff], 0)
    return values, scales


def gather(cache: torch.Tensor, slots: torch.Tensor, block_size: int, fmt: str) -> torch.Tensor:
    """Dequantized rows of ``slots``; −1 gives a zero row."""
    values, scales = gather_bytes(cache, slots, block_size, fmt)
    out = decode(values, scales, fmt)
    return torch.where((slots >= 0).unsqueeze(1), out, torch.zeros((), dtype=out.dtype))


def kv_insert(kv, kv_cache, slot_mapping, block_size: int) -> None:
    insert(kv, kv_cache, slot_mapping, block_size, "fp8_ds_mla")


def kv_rope_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size: int) -> None:
    from .rope import rope

    insert(rope(kv, positions, cos_sin_cache), kv_cache, slot_mapping, block_size, "fp8_ds_mla")


def kv_gather(kv_cache, slots, block_size: int) -> torch.Tensor:
    return gather(kv_cache, slots, block_size, "fp8_ds_mla")


def indexer_k_insert(k, cache, slot_mapping, block_size: int, fmt: str) -> None:
    insert(k, cache, slot_mapping, block_size, fmt)


def indexer_k_gather(cache, slots, block_size: int, fmt: str) -> torch.Tensor:
    return gather(cache, slots, block_size, fmt)

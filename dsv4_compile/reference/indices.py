"""Index construction for sparse decode attention (docs/numerics.md §8.1), vectorized PyTorch.

Every function maps *logical* cache positions of a token's request to *physical* slots through a
paged ``block_table [R, M]`` int32 (``slot = block_table[r, i // block_size] · block_size +
i % block_size``) and returns fresh int32 ``(indices [T, W], lens [T])``; W depends only on shapes
and Python ints, so the ops are CUDA-graph safe (docs/numerics.md §9.3). No Python loop over tokens, no host sync.

Shared rules (the Triton kernels follow them bit for bit):

* A **padding token** (``token_to_req[t] < 0``, or ``positions[t] < 0`` where there are positions)
  gets a row of −1 and ``lens = 0``. A request index ``>= R`` is treated the same way: the ops reject
  it on CPU, and on the GPU (where checking would cost a sync) the kernels never read outside the table.
* A lookup whose block index falls outside ``[0, M)`` or whose table entry is negative (an unallocated
  page) yields −1. ``lens`` counts the *logically visible* entries for ``swa_indices`` and
  ``compressed_indices`` (such −1 holes inside the row are still counted), but the *valid slots* for
  ``global_topk_indices`` (its input already carries −1 padding in arbitrary places).
* Slot arithmetic is int64; the result is stored as int32 (a cache holds fewer than 2^31 slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_req(token_to_req: torch.Tensor, n_req: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """int64 request per token, −1 for padding tokens (negative request or position, request >= R)."""
    req = token_to_req.to(torch.int64)
    valid = (req >= 0) & (req < n_req)
    if positions is not None:
        valid = valid & (positions >= 0)
    return torch.where(valid, req, -1)


def _lookup(block_table: torch.Tensor, req: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 slots of logical entries ``idx [T, W]`` (int64, −1 = none) of requests ``req [T]``.

    The table is padded with a −1 row and column so that every invalid lookup reads that pad: one
    branch-free gather, also for an empty table.
    """
    n_req, n_blk = block_table.shape
    blk = torch.div(idx, block_size, rounding_mode="floor")
    ok = (idx >= 0) & (req[:, None] >= 0) & (blk < n_blk)
    row = torch.where(ok, req[:, None], n_req)
    col = torch.where(ok, blk, n_blk)
    padded = F.pad(block_table, (0, 1, 0, 1), value=-1).reshape(-1)
    entry = padded[row * (n_blk + 1) + col].to(torch.int64)
    slot = entry * block_size + torch.remainder(idx, block_size)
    return torch.where(entry >= 0, slot, -1).to(torch.int32)


def swa_indices(
    positions: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor, block_size: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window slots: row t holds positions ``max(0, p−window+1) + j`` for
    ``j < swa_len = min(p+1, window)``, −1 beyond; ``lens[t] = swa_len`` (0 for padding)."""
    pos = positions.to(torch.int64)
    req = _row_req(token_to_req, block_table.shape[0], pos)
    swa_len = torch.where(req >= 0, torch.clamp(pos + 1, max=window), 0)
    j = torch.arange(window, dtype=torch.int64, device=positions.device)
    q = torch.clamp(pos - window + 1, min=0)[:, None] + j[None, :]
    q = torch.where(j[None, :] < swa_len[:, None], q, -1)
    return _lookup(block_table, req, q, block_size), swa_len.to(torch.int32)


def global_topk_indices(
    topk: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-cache slots of the indexer's local top-k entries (order kept, −1 kept);
    ``lens[t]`` = number of slots >= 0 in the row."""
    req = _row_req(token_to_req, block_table.shape[0])
    slots = _lookup(block_table, req, topk.to(torch.int64), block_size)
    return slots, (slots >= 0).sum(dim=1, dtype=torch.int32)


def compressed_indices(
    positions: torch.Tensor,
    block_table: torch.Tensor,
    token_to_req: torch.Tensor,
    block_size: int,
    compress_ratio: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HCA "attend to everything" slots: entries ``0 .. n−1`` with ``n = (p+1) // compress_ratio``
    (docs/numerics.md §2.7), truncated to ``width``, −1 beyond; ``lens[t] = min(n, width)`` (0 for padding)."""
    pos = positions.to(torch.int64)
    req = _row_req(token_to_req, block_table.shape[0], pos)
    n = torch.div(pos + 1, compress_ratio, rounding_mode="floor")
    n = torch.where(req >= 0, torch.clamp(n, max=width), 0)
    i = torch.arange(width, dtype=torch.int64, device=positions.device)
    idx = torch.where(i[None, :] < n[:, None], i[None, :], -1)
    return _lookup(block_table, req, idx, block_size), n.to(torch.int32)

"""The attention core (docs/numerics.md §7.2, §8.2): lightning-indexer top-k and sparse MQA with the sink.

Pure PyTorch over the paged caches of ``reference.cache``; no host sync, fixed output shapes.

``indexer_topk``: for token t of request ``r = token_to_req[t]`` at position ``p``, the visible
compressed entries are ``s < n = (p+1) // compress_ratio`` (capped at the block table's capacity),
read through ``block_table[r]`` from the indexer K cache and dequantized exactly (docs/numerics.md §5.3, §5.4).
``I[t, s] = Σ_h w[t,h] · ReLU(q̂[t,h] · k̂[s])`` in fp32; the row keeps the ``topk`` largest; a row
with ``n <= topk`` is exactly ``[0, 1, .., n−1, −1, ..]``. Padding tokens (negative request or
position) give a row of −1.

``sparse_attn``: ``out[t,h] = Σ_j e^{s_j−m} kv_j / (Σ_j e^{s_j−m} + e^{sink[h]−m})`` over the
candidates of both index sets (global slots, −1 skipped), ``s_j = scale · q[t,h]·kv_j`` in fp32,
``m = max(max_j s_j, sink[h])``; an empty set gives 0 (also with a −inf sink).
"""

from __future__ import annotations

import torch

from .. import layouts
from .cache import gather
from .indices import _lookup, _row_req
from .quant import mxfp4_dequant


def dequant_q(q: torch.Tensor, q_scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """fp32 ``[T, H, 128]`` indexer queries: e4m3 values as they are (the FP8 path folds the q scale
    into the weights), MXFP4 values times their UE8M0 block scales."""
    if fmt == "fp8":
        return q.to(torch.float32)
    return mxfp4_dequant(q, q_scale)


def visible_entries(positions: torch.Tensor, token_to_req: torch.Tensor, n_req: int, compress_ratio: int,
                    capacity: int) -> torch.Tensor:
    """int64 ``n [T]``: compressed entries visible to each token (0 for padding tokens)."""
    pos = positions.to(torch.int64)
    req = _row_req(token_to_req, n_req, pos)
    n = torch.clamp(torch.div(pos + 1, compress_ratio, rounding_mode="floor"), max=capacity)
    return torch.where(req >= 0, n, 0)


def indexer_logits(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int, fmt: str,
                   compress_ratio: int) -> torch.Tensor:
    """fp32 ``[T, L]`` logits over the ``L = M·block_size`` logical entries of each token's request;
    entries that are not visible are −inf."""
    n_req, n_blk = block_table.shape
    L = n_blk * block_size
    T = q.shape[0]
    req = _row_req(token_to_req, n_req, positions.to(torch.int64))
    n = visible_entries(positions, token_to_req, n_req, compress_ratio, L)
    s = torch.arange(L, dtype=torch.int64, device=q.device)
    idx = torch.where(s[None, :] < n[:, None], s[None, :], -1)
    slots = _lookup(block_table, req, idx, block_size)  # [T, L], −1 where not visible / unallocated
    k = gather(k_cache, slots.reshape(-1), block_size, fmt).view(T, L, layouts.INDEXER_HEAD_DIM)
    qf = dequant_q(q, q_scale, fmt)
    scores = torch.relu(torch.bmm(qf, k.transpose(1, 2)))  # [T, H, L]
    logits = (scores * weights.to(torch.float32).unsqueeze(-1)).sum(dim=1)
    return torch.where(idx >= 0, logits, float("-inf"))


def select_topk(logits: torch.Tensor, n: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 ``[T, topk]`` from ``logits [T, L]`` (entries at or beyond each row's ``n`` visible ones
    are ignored): a row with ``n > topk`` holds the ``topk`` entries of largest logit, ties going to
    the lower entry index (NaN above +inf, −0.0 equal to +0.0: ``torch.sort``'s order), listed in
    increasing index order; a row with ``n <= topk`` is ``0..n−1`` then −1. Fixed shape; no host
    sync. Deterministic, so the GPU kernels match it bit for bit on equal logits."""
    T, L = logits.shape
    k = min(topk, L)
    j = torch.arange(topk, dtype=torch.int64, device=logits.device)
    first = torch.where(j[None, :] < n[:, None], j[None, :], -1)
    if k == 0:
        return first.to(torch.int32)
    s = torch.arange(L, dtype=torch.int64, device=logits.device)
    # hidden entries become −inf: every one ranks after each visible entry, as its index is higher
    vals = logits.masked_fill(s[None, :] >= n[:, None], float("-inf"))
    top = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.sort(top, dim=1).values
    if k < topk:
        top = torch.cat((top, top.new_full((T, topk - k), -1)), dim=1)
    return torch.where((n > topk)[:, None], top, first).to(torch.int32)


def indexer_topk(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size: int, fmt: str,
                 topk: int, compress_ratio: int = 4) -> torch.Tensor:
    logits = indexer_logits(q, q_scale, weights, k_cache, block_table, token_to_req, positions, block_size, fmt,
                            compress_ratio)
    n = visible_entries(positions, token_to_req, block_table.shape[0], compress_ratio, logits.shape[1])
    return select_topk(logits, n, topk)


def _gather_candidates(cache, indices, block_size: int):
    T, W = indices.shape
    kv = gather(cache, indices.reshape(-1), block_size, "fp8_ds_mla").view(T, W, layouts.KV_HEAD_DIM)
    return kv, indices >= 0


def sparse_attn(q, swa_cache, swa_indices, comp_cache, comp_indices, sink, scale: float, swa_block_size: int,
                comp_block_size: int) -> torch.Tensor:
    kv, valid = _gather_candidates(swa_cache, swa_indices, swa_block_size)
    if comp_indices is not None:
        kv2, valid2 = _gather_candidates(comp_cache, comp_indices, comp_block_size)
        kv, valid = torch.cat((kv, kv2), dim=1), torch.cat((valid, valid2), dim=1)
    kvf = kv.to(torch.float32)
    s = torch.bmm(q.to(torch.float32), kvf.transpose(1, 2)) * scale  # [T, H, N]
    s = torch.where(valid[:, None, :], s, float("-inf"))
    sink = sink.to(torch.float32)
    m = torch.maximum(s.amax(dim=-1) if s.shape[-1] else torch.full_like(s[..., 0], float("-inf")), sink)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m.unsqueeze(-1))
    denom = p.sum(dim=-1) + torch.exp(sink - m)
    inv = torch.where(denom > 0, 1.0 / denom, 0.0)
    out = torch.bmm(p, kvf) * inv.unsqueeze(-1)
    return out.to(torch.bfloat16)

"""The KV compressor (docs/numerics.md §6, §5.5) and the RMSNorm it uses, bit-exact by construction.

Floating-point reductions are defined here with a fixed order so that a GPU kernel can reproduce
them bit for bit: ``tree_sum`` adds adjacent pairs level by level (zero-padded to a power of two),
``exp_fp32`` is a Cody-Waite reduction plus a degree-6 polynomial built from single fp32 adds and
multiplies, and divisions / square roots are IEEE correctly rounded. Maxima need no order.

State cache (``uint8 [num_blocks, page_bytes]``, ``bs`` rows of ``2W`` fp32 per page, row ``k``
at byte ``k·8W``): one row per token position, ``[kv (W) | score + ape[p % r] (W)]`` with
``W = coff·d`` (coff = 2 for C4, 1 for C128). Position ``q`` of a request lives in state page
``state_block_table[req, q // bs]``, row ``q % bs``.

Pooling for a token at position ``p`` (only if ``(p+1) % r == 0``, else the pooled vector is 0):
* C128: rows ``p−127 .. p``, all ``d`` channels of kv and score;
* C4: rows ``p−7 .. p−4`` use the A halves (kv ``[0:d]``, score ``[W:W+d]``), rows ``p−3 .. p`` the
  B halves (kv ``[d:2d]``, score ``[W+d:2W]``).
Rows at negative positions, of padding tokens (``token_to_req < 0``) or without a state page are
masked (weight 0). Per channel: ``m = max s``, ``e = exp(s − m)``,
``pooled = tree_sum(e·kv) / tree_sum(e)`` (0 when no row is valid).
"""

from __future__ import annotations

import torch

from .. import layouts
from .quant import fp8_block_quant, pow2

LOG2E = 1.4426950408889634
LN2_HI = 0.693145751953125  # 0x3f317200: n·LN2_HI is exact for |n| < 2^9
LN2_LO = 1.4286067653301870e-06
EXP_POLY = (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0)  # Horner, highest degree first


def exp_fp32(x: torch.Tensor) -> torch.Tensor:
    """``e^x`` for fp32 ``x <= 0`` (−inf → 0; results below 2^-126 flush to 0), fixed op order."""
    xc = torch.clamp(x, min=-104.0)
    n = torch.floor(xc * LOG2E + 0.5)
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = torch.full_like(r, EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + c
    ni = n.to(torch.int32)
    return torch.where(ni < -126, 0.0, p * pow2(torch.clamp(ni, min=-126)))


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` as a balanced binary tree of adjacent pairs (zero-padded to a power of two)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        pairs = x.unflatten(-1, (-1, 2))
        x = pairs[..., 0] + pairs[..., 1]
    return x[..., 0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x · 1/sqrt(tree_sum(x²)/D + eps)) · weight`` in fp32, rounded to ``x.dtype``."""
    xf = x.to(torch.float32)
    ss = tree_sum(xf * xf, -1)
    inv = 1.0 / torch.sqrt(ss / x.shape[-1] + eps)
    return ((xf * inv.unsqueeze(-1)) * weight.to(torch.float32)).to(x.dtype)


def rms_norm_fp8_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int, scale_floor: float):
    """``fp8_block_quant(rms_norm(x, weight, eps), block, scale_floor)``: the RMSNorm rounded to
    ``x.dtype``, then quantized (``(q e4m3 [..., D], scale fp32 [..., D/block])``)."""
    return fp8_block_quant(rms_norm(x, weight, eps), block, scale_floor)


def _state_rows(state_cache: torch.Tensor) -> torch.Tensor:
    """The state cache's bytes as fp32 ``[num_blocks, page_bytes / 4]``."""
    return state_cache.view(torch.float32)


def state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size: int) -> None:
    """Write ``[kv | score + ape[p % r]]`` of every token to its state row (slot −1 skipped)."""
    r, w = ape.shape
    slots = state_slot_mapping.to(torch.int64)
    keep = slots >= 0  # CPU kernel: boolean selection on the host
    kvs = kv_score[keep].to(torch.float32)
    pos = positions.to(torch.int64)[keep]
    row = torch.cat((kvs[:, :w], kvs[:, w:] + ape.to(torch.float32)[pos % r]), dim=1)
    s = slots[keep]
    page, k = (s // state_block_size).unsqueeze(1), (s % state_block_size).unsqueeze(1)
    _state_rows(state_cache)[page, k * (2 * w) + torch.arange(2 * w)] = row


def pool(state_cache, positions, state_block_table, token_to_req, state_block_size: int, compress_ratio: int,
         head_dim: int, chunk: int = 32) -> torch.Tensor:
    """fp32 ``[T, head_dim]`` pooled windows (module docstring); zero rows for non-boundary tokens."""
    coff = layouts.compress_overlap(compress_ratio)
    w = coff * head_dim
    rows = coff * compress_ratio
    t = positions.shape[0]
    out = torch.zeros(t, head_dim, dtype=torch.float32, device=positions.device)
    pos = positions.to(torch.int64)
    req = token_to_req.to(torch.int64)
    if state_cache.shape[0] == 0:  # shape-only: no state page exists, every window is empty
        return out
    todo = torch.nonzero(((pos + 1) % compress_ratio == 0) & (pos >= 0)).flatten()  # CPU kernel
    cache = _state_rows(state_cache)
    n_blocks = state_block_table.shape[1]
    j = torch.arange(rows)
    # column of channel c in row j: C4 rows j < r read the A half, the rest the B half
    half = (j >= rows - compress_ratio).to(torch.int64) * (head_dim if coff == 2 else 0)
    cols = half.unsqueeze(1) + torch.arange(head_dim)  # [rows, d]
    for lo in range(0, todo.numel(), chunk):  # bounded memory; tokens are independent
        tok = todo[lo : lo + chunk]
        q = pos[tok].unsqueeze(1) - rows + 1 + j  # [n, rows]
        rq = req[tok].unsqueeze(1).expand_as(q)
        blk_idx = torch.div(q, state_block_size, rounding_mode="floor")
        ok = (q >= 0) & (rq >= 0) & (blk_idx < n_blocks)
        blk = state_block_table[rq.clamp(min=0), blk_idx.clamp(0, n_blocks - 1)].to(torch.int64)
        ok &= blk >= 0
        ok &= blk < state_cache.shape[0]
        page = torch.where(ok, blk, 0)
        base = (q % state_block_size) * (2 * w)
        off = base.unsqueeze(-1) + cols  # [n, rows, d]
        kv = cache[page.unsqueeze(-1), off]
        sc = cache[page.unsqueeze(-1), off + w]
        okd = ok.unsqueeze(-1)
        kv = torch.where(okd, kv, 0.0)
        s = torch.where(okd, sc, float("-inf"))
        m = s.amax(dim=1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)  # no valid row: every weight is 0 anyway
        e = torch.where(okd, exp_fp32(s - m), 0.0)
        num = tree_sum(e * kv, 1)
        den = tree_sum(e, 1)
        out[tok] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return out


def compressed_positions(positions: torch.Tensor, compress_ratio: int) -> torch.Tensor:
    """RoPE position of the entry a token closes: ``(p // r) · r`` (the window start)."""
    return torch.div(positions, compress_ratio, rounding_mode="floor") * compress_ratio


def compressor_insert(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                      state_block_size: int, norm_weight, eps: float, cos_sin_cache, cache, slot_mapping,
                      block_size: int, fmt: str, hadamard: bool = False) -> None:
    """The whole compressor of one layer for one step: state save → pool → RMSNorm (fp32) → RoPE at
    ``(p//r)·r`` (fp32) → bf16 → [Hadamard, indexer only] → quantize → insert at ``slot_mapping``."""
    from .cache import insert
    from .rope import hadamard as _hadamard
    from .rope import rope

    r = ape.shape[0]
    d = norm_weight.shape[0]
    state_save(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_size)
    pooled = pool(state_cache, positions, state_block_table, token_to_req, state_block_size, r, d)
    y = rope(rms_norm(pooled, norm_weight, eps), compressed_positions(positions, r), cos_sin_cache)
    y = y.to(torch.bfloat16)
    if hadamard:
        y = _hadamard(y, d**-0.5)
    insert(y, cache, slot_mapping, block_size, fmt)

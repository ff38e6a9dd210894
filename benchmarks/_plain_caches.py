"""The paged-cache regions of DSv4 attention written in plain PyTorch (aten only), for plain Inductor.

These are the baselines of ``benchmarks/caches.py``: what a user without our ops would write. They
implement the same spec as ``dsv4_compile.reference.cache`` / ``.compressor`` (same byte layouts),
but in the form a compiler can take whole (``fullgraph=True``): no boolean-mask indexing, no
``nonzero``, no ``.item()``, no per-slot loop.

Slot −1 (skip) without a boolean mask: **every cache passed to these functions has one scratch
page at its end** (``cache[-1]``), which the real slots never address. Rows whose slot is −1 are
computed like the others and written to that page (slot ``(num_pages − 1)·bs + t % bs``); the
scratch page's bytes are garbage afterwards and are never read (no block table points there).
``torch.where`` on the old bytes instead would race: a skipped row redirected to a real slot would
re-write old bytes while a real row writes new ones to the same slot.

Numerics that matter for byte equality (inserts): RoPE in fp32 on GPT-J interleaved pairs of the last
64 dims, rounded to bf16; the UE8M0 exponent ``e = ceil(log2(amax / 448))`` is computed exactly from
the fp32 bits of ``amax`` (``amax = m·2^E``, ``448 = 1.75·2^8``: ``e = E − 8 + (m > 1.75)``), which
is the real-number definition; ``torch.ceil(torch.log2(amax / 448))`` is off by one for amax just
above a power-of-two multiple of 448 (the quotient and log2 round), about one block in 2^21.

The compressor baseline (``compressor``) pools every token's window, not only the tokens that close
one (which would need a data-dependent selection), with ``torch.softmax`` (not the reference's fixed
reduction order): decoded records agree with the op within quantization noise, not bit for bit.
"""

from __future__ import annotations

import torch

from dsv4_compile import layouts
from dsv4_compile.reference.quant import FP8_MAX_EXP, FP8_MAX_MANT, ceil_log2_ratio, mxfp4_quant, pow2

ROPE = layouts.ROPE_DIM
NOPE = layouts.KV_NOPE_DIM


# --- elementwise pieces ------------------------------------------------------------------------
def rope_fp32(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """fp32 rotation of the last 64 dims of ``x [T, D]`` (GPT-J pairs), other dims as fp32."""
    cs = cos_sin_cache[positions.long()].float()  # [T, 64] = [cos | sin]
    half = ROPE // 2
    cos, sin = cs[:, :half], cs[:, half:]
    xf = x.float()
    xr = xf[:, -ROPE:].unflatten(-1, (half, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((xf[:, :-ROPE], rot), dim=-1)


def _int_bytes(i: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` little-endian bytes of integer tensor ``i [..., D]`` → uint8 ``[..., D·n]``."""
    i = i.to(torch.int32)
    return torch.stack([((i >> (8 * b)) & 0xFF).to(torch.uint8) for b in range(n)], dim=-1).flatten(-2)


def bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Bytes of bf16 ``x [..., D]`` as stored (little-endian) → uint8 ``[..., 2D]``."""
    return _int_bytes(x.to(torch.bfloat16).view(torch.int16), 2)


def fp8_ue8m0(x: torch.Tensor, block: int, floor: float = layouts.FP8_AMAX_FLOOR):
    """UE8M0 FP8 of ``x [T, D]`` in ``block``-element blocks: ``(e4m3 bytes uint8 [T, D], e int32 [T, D/block])``.

    ``amax = max(max|b|, floor)``, ``e = ceil(log2(amax/448))`` (exact, from the bits), values
    ``clamp(b · 2^-e, ±448)`` rounded to e4m3."""
    xf = x.float().unflatten(-1, (-1, block))
    amax = xf.abs().amax(dim=-1).clamp_min(floor)
    e = ceil_log2_ratio(amax, FP8_MAX_EXP, FP8_MAX_MANT)
    inv = pow2(-e)  # 2^-e, exact
    q = (xf * inv.unsqueeze(-1)).clamp(-layouts.FP8_E4M3_MAX, layouts.FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2), e


def fp8_ds_mla_record(x: torch.Tensor):
    """``(value bytes [T, 576], scale bytes [T, 8])`` of bf16/fp32 ``x [T, 512]`` (rope dims stored as bf16)."""
    q, e = fp8_ue8m0(x[:, :NOPE], layouts.KV_QUANT_BLOCK)
    values = torch.cat((q, bf16_bytes(x[:, NOPE:])), dim=-1)
    scales = torch.cat(((e + layouts.UE8M0_BIAS).to(torch.uint8), torch.zeros_like(e[:, :1], dtype=torch.uint8)), -1)
    return values, scales


def indexer_record(k: torch.Tensor, fmt: str):
    """``(value bytes, scale bytes)`` of ``k [T, 128]``: fp8 (128 + fp32 scale 4 B) or mxfp4 (64 + 4 B)."""
    if fmt == "fp8":
        q, e = fp8_ue8m0(k, layouts.INDEXER_HEAD_DIM)
        return q, _int_bytes(pow2(e).view(torch.int32), 4)  # the fp32 bits of 2^e
    return mxfp4_quant(k)  # plain aten already (dsv4_compile.reference.quant)


def scatter_records(cache, slot_mapping, values, scales, block_size: int, fmt: str) -> None:
    """``cache[page, byte offsets] = bytes`` for every row; slot −1 goes to the scratch page (the last)."""
    v, s = layouts.record_bytes(fmt)
    t = values.shape[0]
    slots = slot_mapping.long()
    scratch = (cache.shape[0] - 1) * block_size + torch.arange(t, device=slots.device) % block_size
    slots = torch.where(slots >= 0, slots, scratch)
    page = (slots // block_size).unsqueeze(1)
    k = (slots % block_size).unsqueeze(1)
    cache[page, k * v + torch.arange(v, device=slots.device)] = values
    cache[page, block_size * v + k * s + torch.arange(s, device=slots.device)] = scales


# --- the regions --------------------------------------------------------------------------------
def kv_rope_insert(kv, positions, cos_sin_cache, kv_cache, slot_mapping, block_size: int) -> None:
    """``dsv4.kv_rope_insert`` in plain aten (``kv_cache`` must end with a scratch page)."""
    y = rope_fp32(kv, positions, cos_sin_cache).to(torch.bfloat16)
    values, scales = fp8_ds_mla_record(y)
    scatter_records(kv_cache, slot_mapping, values, scales, block_size, "fp8_ds_mla")


def indexer_k_insert(k, cache, slot_mapping, block_size: int, fmt: str) -> None:
    """``dsv4.indexer_k_insert`` in plain aten (``cache`` must end with a scratch page)."""
    values, scales = indexer_record(k, fmt)
    scatter_records(cache, slot_mapping, values, scales, block_size, fmt)


def sylvester(n: int, device=None) -> torch.Tensor:
    """fp32 ``[n, n]`` Sylvester Hadamard matrix, ``H[i, j] = (−1)^popcount(i & j)`` (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h.to(device)


def make_compressor(compress_ratio: int, head_dim: int, state_block_size: int, block_size: int, fmt: str,
                    hadamard: bool, eps: float, device=None):
    """The compressor region of one layer in plain aten, as ``fn(kv_score, positions, ape, state_cache,
    state_slot_mapping, state_block_table, token_to_req, norm_weight, cos_sin_cache, cache, slot_mapping)``
    (the argument order of ``dsv4.compressor_insert`` without its constants). ``state_cache`` and
    ``cache`` must each end with a scratch page (the module docstring).

    Every token (not only those that close a window) gathers its ``coff·r`` window rows through the
    block table; rows at negative positions, of padding tokens or without a state page get score −inf
    and kv 0 (``torch.where``); a token with no valid row pools to 0 (softmax alone would give NaN).
    The records of all T tokens are computed; those of tokens that close no window (slot −1) land in
    the scratch page.
    """
    r, d = compress_ratio, head_dim
    coff = layouts.compress_overlap(r)
    w = coff * d
    rows = coff * r
    sbs = state_block_size
    had = sylvester(d, device) if hadamard else None

    def compressor(kv_score, positions, ape, state_cache, state_slot_mapping, state_block_table, token_to_req,
                   norm_weight, cos_sin_cache, cache, slot_mapping):
        state = state_cache.view(torch.float32)  # [pages, page_bytes / 4]
        dev = positions.device
        pos = positions.long()
        t = pos.shape[0]
        # 1. state rows [kv | score + ape[p % r]] (skipped rows to the scratch state page)
        kvs = kv_score.float()
        row = torch.cat((kvs[:, :w], kvs[:, w:] + ape[pos % r]), dim=1)
        ss = state_slot_mapping.long()
        ss = torch.where(ss >= 0, ss, (state.shape[0] - 1) * sbs + torch.arange(t, device=dev) % sbs)
        state[(ss // sbs).unsqueeze(1), (ss % sbs).unsqueeze(1) * (2 * w) + torch.arange(2 * w, device=dev)] = row
        # 2. every token's window through the block table: rows q = p − rows + 1 .. p
        j = torch.arange(rows, device=dev)
        q = pos.unsqueeze(1) - rows + 1 + j  # [T, rows]
        req = token_to_req.long().unsqueeze(1)
        n_blocks = state_block_table.shape[1]
        bi = torch.div(q, sbs, rounding_mode="floor")
        blk = state_block_table[req.clamp(min=0), bi.clamp(0, n_blocks - 1)].long()
        ok = (q >= 0) & (req >= 0) & (bi < n_blocks) & (blk >= 0) & (blk < state.shape[0])
        page = torch.where(ok, blk, 0).unsqueeze(-1)
        half = (j >= rows - r).long() * (d if coff == 2 else 0)  # C4: older rows A half, newer B half
        off = ((q % sbs) * (2 * w) + half).unsqueeze(-1) + torch.arange(d, device=dev)  # [T, rows, d]
        okd = ok.unsqueeze(-1)
        kv = torch.where(okd, state[page, off], 0.0)
        score = torch.where(okd, state[page, off + w], float("-inf"))
        pooled = (torch.softmax(score, dim=1) * kv).sum(dim=1)
        pooled = torch.where(ok.any(dim=1, keepdim=True), pooled, 0.0)
        # 3. RMSNorm (fp32) → RoPE at the window start (fp32) → bf16 [→ Hadamard → bf16]
        y = pooled * torch.rsqrt(pooled.square().mean(dim=-1, keepdim=True) + eps) * norm_weight.float()
        y = rope_fp32(y, torch.div(pos, r, rounding_mode="floor") * r, cos_sin_cache).to(torch.bfloat16)
        if had is not None:
            y = ((y.float() @ had) * d**-0.5).to(torch.bfloat16)
        # 4. quantize every row, scatter (tokens that close no window → scratch page)
        values, scales = fp8_ds_mla_record(y) if fmt == "fp8_ds_mla" else indexer_record(y, fmt)
        scatter_records(cache, slot_mapping, values, scales, block_size, fmt)

    return compressor

"""Top-k selection of ``indexer_topk`` on the GPU: a radix select that scans each row only up to its
own visible length, with long rows split over several programs.

Semantics (``reference.attention.select_topk``, docs/numerics.md §7.2): a row with ``n`` visible
entries keeps, when ``n > k``, the ``k`` entries of largest logit with ties going to the lower entry
index (NaN ranks above +inf, −0.0 equals +0.0), and returns them in increasing index order; a row with
``n <= k`` returns ``0 .. n−1`` then −1; a padding row returns −1. Fixed output shape, no host sync.

Method. A logit becomes a 32-bit key whose unsigned order is the float order (sign flip for
positives, bit complement for negatives, NaN → ``0xFFFFFFFF``, −0 → +0; key 0 marks an absent slot).
A program holds a chunk of keys in registers and finds the k-th largest key with seven histogram
passes over 5 key bits at a time (``tl.histogram`` with 32 bins: the bin of the k-th largest from the
suffix sums; more bins cost more than they save, as Triton's histogram pays per bin);
entries above it are kept, entries equal to it are kept in index order until ``k`` are kept, and a
prefix sum writes the kept ones compacted, in index order. A row longer than one chunk is cut into
``S`` chunks, each keeping its best ``k`` as (key, index) candidates; the next round selects from the
``S·k`` candidates, which are still in index order, so ties still go to the lower index. The plan
(chunk sizes, rounds) depends only on ``T``, the row width ``L``, ``k`` and the SM count, never on
data; programs whose chunk starts past their row's visible length return at once, so the cost
follows the live context, not ``L``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, pdl_enter
from ._launch import prebound

MAX_CHUNK = 16384  # largest chunk of keys one program holds in registers
VARIANT_ENV = "DSV4_TOPK_SELECT"  # the op's selection variant (see select_variant)
VARIANTS = ("cute", "registers", "looped")
_SPLIT_MIN = 4096  # rows at most this long are never split


@triton.jit
def _sort_key(x):
    """uint32 key of fp32 ``x``: unsigned key order == float order; NaN highest, −0 == +0, never 0."""
    b = x.to(tl.uint32, bitcast=True)
    key = tl.where((b >> 31) != 0, ~b, b | 0x80000000)
    key = tl.where(x == 0.0, 0x80000000, key)
    return tl.where(x != x, 0xFFFFFFFF, key)


@triton.jit
def _refine(key, v, need, n_v, thr, shift):
    """One radix pass over the 5 key bits ``shift .. shift+4`` among the entries ``v`` (``n_v`` of
    them) that share the threshold's higher bits: the digit ``b`` holding the ``need``-th largest;
    returns the entries with that digit, how many of them are still needed, their count and the
    threshold with ``b`` set. A 32-bin ``tl.histogram`` (Triton 3.6 lowers it to warp ballots,
    3.9 to one shared-memory atomic per entry). Tried on the H200: a 4096-bin variant (8-bit digits,
    16 counters per digit to spread the atomics of one warp) made the selection 9× slower, 2048 bins
    (11-bit digits) 3× slower, and counts from one 8-way tuple reduction of int64 words of four
    16-bit counters (no atomics) 1.7–2.2× slower than seven 32-bin passes. A pass costs about a
    dozen instructions per entry of the block (ncu: 346 per warp per pass for 8 entries per thread),
    so the block should be no larger than the row (``_topk_round_kernel``'s size classes)."""
    digit = ((key >> shift) & 31).to(tl.int32)
    bins = tl.arange(0, 32)
    h = tl.histogram(tl.where(v, digit, 0), 32)
    h = h - tl.where(bins == 0, digit.shape[0] - n_v, 0)  # entries outside v were counted in bin 0
    suffix = tl.cumsum(h, 0, reverse=True)
    b = tl.sum((suffix >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins > b, h, 0), 0)
    inbin = tl.sum(tl.where(bins == b, h, 0), 0)
    return v & (digit == b), need - above, inbin, thr | (b.to(tl.uint32) << shift)


@triton.jit
def _select_mask(key, valid, n_valid, need):
    """The ``need`` valid entries of largest key, ties to the lower position (requires
    ``need <= n_valid = count(valid)``): the threshold key in seven radix passes over bits 27..31,
    22..26, .., 2..6, then 0..4 (whose bits 2..4 the sixth pass fixed already: OR-ing them into the
    threshold again changes nothing). The entries above it are kept, and ``need`` of the ``n_v``
    entries equal to it, the first in position order (``n_v == need``: every one, with the
    threshold's lower bits 0 when the passes stopped early).

    The passes are a loop the compiler keeps as a loop (seven unrolled copies made the sm_90 code of a
    4,096-entry round 20 % longer), and it stops as soon as the digit's bin holds exactly the entries
    still needed: all of them are kept (with the threshold's lower bits 0, each is above it or ties
    with it, and ``need`` covers every tie). Random logits usually stop after four passes."""
    thr = tl.zeros([], tl.uint32)
    v = valid
    n_v = n_valid
    need = need + tl.zeros([], tl.int32)  # a tensor: k == 1 arrives as a constexpr (Triton specializes 1)
    i = 0
    while (i < 7) & (n_v > need):  # n_v == need: every entry of the bin is kept, thr's low bits 0
        shift = tl.maximum(27 - 5 * i, 0).to(tl.uint32)
        v, need, n_v, thr = _refine(key, v, need, n_v, thr, shift)
        i += 1
    if n_v == need:  # every tie is kept: no rank needed
        sel = valid & (key >= thr)
    else:
        tie = (valid & (key == thr)).to(tl.int32)
        rank = tl.cumsum(tie, 0) - tie
        sel = valid & ((key > thr) | ((tie != 0) & (rank < need)))
    return sel


@triton.jit
def _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                  BLOCK: tl.constexpr, KB: tl.constexpr, FROM_LOGITS: tl.constexpr, FINAL: tl.constexpr):
    """Keep the best ``min(K, valid)`` entries of row positions ``start .. start+BLOCK−1`` (< ``n``),
    written compacted in position order at ``out_row``: indices (−1 fill) when ``FINAL``, else
    (key, index) candidates (key 0 fill)."""
    s = start + tl.arange(0, BLOCK)
    m = s < n
    if FROM_LOGITS:
        x = tl.load(src_ptr + row + s, mask=m, other=0.0)
        key = tl.where(m, _sort_key(x), 0)
        idx = s
    else:
        key = tl.load(src_ptr + row + s, mask=m, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(src_idx_ptr + row + s, mask=m, other=-1)
    valid = key != 0
    cnt = tl.sum(valid.to(tl.int32), 0)
    if cnt > K:
        sel = _select_mask(key, valid, cnt, K)
        kept = K
    else:
        sel = valid
        kept = cnt
    at = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(out_idx_ptr + out_row + at, idx, mask=sel)
    j = tl.arange(0, KB)
    fill = (j >= kept) & (j < K)
    if FINAL:
        tl.store(out_idx_ptr + out_row + j, tl.full([KB], -1, tl.int32), mask=fill)
    else:
        tl.store(out_key_ptr + out_row + at, key.to(tl.int32, bitcast=True), mask=sel)
        tl.store(out_key_ptr + out_row + j, tl.zeros([KB], tl.int32), mask=fill)
        tl.store(out_idx_ptr + out_row + j, tl.full([KB], -1, tl.int32), mask=fill)


@triton.jit
def _load_keys(src_ptr, src_idx_ptr, row, s, end, FROM_LOGITS: tl.constexpr):
    """(keys, indices) of row positions ``s`` (key 0 at and past ``end``)."""
    m = s < end
    if FROM_LOGITS:
        key = tl.where(m, _sort_key(tl.load(src_ptr + row + s, mask=m, other=0.0)), 0)
        idx = s
    else:
        key = tl.load(src_ptr + row + s, mask=m, other=0).to(tl.uint32, bitcast=True)
        idx = tl.load(src_idx_ptr + row + s, mask=m, other=-1)
    return key, idx


@triton.jit
def _looped_hist(src_ptr, src_idx_ptr, row, start, end, thr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                 FIRST: tl.constexpr, SUB: tl.constexpr, FROM_LOGITS: tl.constexpr):
    """Histogram (bins 0..31; 32..63 hold what is outside the set) of key bits ``SHIFT ..
    SHIFT+BITS−1`` over the valid keys of ``[start, end)`` whose higher bits equal ``thr``'s, read
    ``SUB`` at a time."""
    h = tl.zeros([64], tl.int32)
    for s0 in range(start, end, SUB):
        key, _ = _load_keys(src_ptr, src_idx_ptr, row, s0 + tl.arange(0, SUB), end, FROM_LOGITS)
        inset = key != 0
        if not FIRST:
            inset = inset & ((key >> (SHIFT + BITS)) == (thr >> (SHIFT + BITS)))
        digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
        h += tl.histogram(tl.where(inset, digit, 32), 64)
    return h


@triton.jit
def _looped_pick(h, need, thr, SHIFT: tl.constexpr):
    bins = tl.arange(0, 64)
    hv = tl.where(bins < 32, h, 0)
    suffix = tl.cumsum(hv, 0, reverse=True)
    b = tl.sum((suffix >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins > b, hv, 0), 0)
    return thr | (b.to(tl.uint32) << SHIFT), need - above


@triton.jit
def _select_chunk_looped(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                         CH: tl.constexpr, KB: tl.constexpr, SUB: tl.constexpr, FROM_LOGITS: tl.constexpr,
                         FINAL: tl.constexpr):
    """``_select_chunk`` with the chunk read ``SUB`` entries at a time in every pass (from L1 / L2)
    instead of held in registers: each pass is a short loop body rather than straight-line code over
    the whole chunk (the register version's code grows with the chunk: hundreds of KB of PTX for
    16,384 entries), and the work follows the row, not ``CH``."""
    end = tl.minimum(start + CH, n)
    thr = tl.zeros([], tl.uint32)
    h = _looped_hist(src_ptr, src_idx_ptr, row, start, end, thr, 27, 5, True, SUB, FROM_LOGITS)
    total = tl.sum(tl.where(tl.arange(0, 64) < 32, h, 0), 0)
    need = K
    if total > K:
        thr, need = _looped_pick(h, need, thr, 27)
        for i in tl.static_range(1, 6):  # bits 22..26, 17..21, .., 2..6
            h = _looped_hist(src_ptr, src_idx_ptr, row, start, end, thr, 27 - 5 * i, 5, False, SUB, FROM_LOGITS)
            thr, need = _looped_pick(h, need, thr, 27 - 5 * i)
        h = _looped_hist(src_ptr, src_idx_ptr, row, start, end, thr, 0, 2, False, SUB, FROM_LOGITS)
        thr, need = _looped_pick(h, need, thr, 0)
    else:  # the whole chunk: every valid key is above 0
        need = 0
    ties = 0
    kept = 0
    for s0 in range(start, end, SUB):
        key, idx = _load_keys(src_ptr, src_idx_ptr, row, s0 + tl.arange(0, SUB), end, FROM_LOGITS)
        valid = key != 0
        tie = (valid & (key == thr)).to(tl.int32)
        rank = ties + tl.cumsum(tie, 0) - tie
        sel = valid & ((key > thr) | ((tie != 0) & (rank < need)))
        at = kept + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(out_idx_ptr + out_row + at, idx, mask=sel)
        if not FINAL:
            tl.store(out_key_ptr + out_row + at, key.to(tl.int32, bitcast=True), mask=sel)
        ties += tl.sum(tie, 0)
        kept += tl.sum(sel.to(tl.int32), 0)
    j = tl.arange(0, KB)
    fill = (j >= kept) & (j < K)
    tl.store(out_idx_ptr + out_row + j, tl.full([KB], -1, tl.int32), mask=fill)
    if not FINAL:
        tl.store(out_key_ptr + out_row + j, tl.zeros([KB], tl.int32), mask=fill)


@prebound
@triton.jit
def _topk_round_kernel(
    src_ptr, src_idx_ptr, n_ptr, pos_ptr, req_ptr, out_key_ptr, out_idx_ptr, n_out_ptr,
    n_req, ratio, L, src_stride, K, out_stride,
    CH: tl.constexpr, KB: tl.constexpr, FROM_LOGITS: tl.constexpr, FINAL: tl.constexpr,
    LOOPED: tl.constexpr = False, SUB: tl.constexpr = 1024,
    PDL: tl.constexpr = False,
):
    """One round for row ``t = program_id(0)``, chunk ``c = program_id(1)`` of ``CH`` positions.
    Row length: the token's visible entries (``FROM_LOGITS``) or the previous round's candidate
    count (``n_ptr``). Non-final rounds write candidates at ``[t, c·K .. c·K+K)`` and (chunk 0) the
    next round's row length ``cdiv(n, CH)·K``."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    c = tl.program_id(1)
    if FROM_LOGITS:
        p = tl.load(pos_ptr + t).to(tl.int64)
        r = tl.load(req_ptr + t).to(tl.int64)
        n = tl.minimum((p + 1) // ratio, L)
        n = tl.where((r >= 0) & (r < n_req) & (p >= 0), n, 0).to(tl.int32)  # 0 for a padding token
    else:
        n = tl.load(n_ptr + t)
    start = c * CH
    row = t.to(tl.int64) * src_stride
    out_row = t.to(tl.int64) * out_stride + c * K
    if not FINAL:
        if c == 0:
            tl.store(n_out_ptr + t, tl.cdiv(n, CH) * K)
    if start >= n:
        if FINAL:  # only chunk 0 exists: an empty row
            j = tl.arange(0, KB)
            tl.store(out_idx_ptr + out_row + j, tl.full([KB], -1, tl.int32), mask=j < K)
        return
    if FROM_LOGITS and FINAL:
        if n <= K:  # the whole row, no logit read
            j = tl.arange(0, KB)
            tl.store(out_idx_ptr + out_row + j, tl.where(j < n, j, -1), mask=j < K)
            return
    rem = n - start
    if LOOPED:
        _select_chunk_looped(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                             CH, KB, SUB, FROM_LOGITS, FINAL)
    # rows far shorter than the chunk take a smaller block: the cost follows the row, not the chunk
    elif CH >= 4096:
        if rem <= CH // 16:
            _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                          CH // 16, KB, FROM_LOGITS, FINAL)
        elif rem <= CH // 4:
            _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                          CH // 4, KB, FROM_LOGITS, FINAL)
        elif rem <= CH // 2:  # each radix pass costs per entry of the block: half the block, half the pass
            _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                          CH // 2, KB, FROM_LOGITS, FINAL)
        else:
            _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                          CH, KB, FROM_LOGITS, FINAL)
    else:
        _select_chunk(src_ptr, src_idx_ptr, row, start, n, out_key_ptr, out_idx_ptr, out_row, K,
                      CH, KB, FROM_LOGITS, FINAL)


def _pow2(x: int) -> int:
    return next_pow2(max(int(x), 1))


def plan(T: int, L: int, k: int, sms: int, chunk: int | None = None, max_chunk: int = MAX_CHUNK
         ) -> list[tuple[int, int]]:
    """``[(chunk, programs per row), ...]``, one entry per round; the last has one program per row.

    The first round (over the logits) splits a row when the rows alone leave SMs idle (``2·T < sms``)
    and the row is longer than ``_SPLIT_MIN``, into chunks of about ``sqrt(L·k)`` (balances a chunk's
    work against the ``S·k`` candidates of the next round), or of ``chunk`` when given; later rounds
    split only rows longer than ``max_chunk``. Every split chunk holds at least ``2k`` entries, so
    every round shrinks the row (to fewer than half of it plus ``k``). Requires ``2k <= max_chunk``;
    ``chunk`` and ``max_chunk`` are powers of two (the kernels' block sizes)."""
    for name, v in (("chunk", chunk), ("max_chunk", max_chunk)):
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if 2 * k > max_chunk:
        raise ValueError(f"the GPU top-k keeps at most {max_chunk // 2} entries per row, asked for {k}")
    rounds: list[tuple[int, int]] = []
    length = max(L, 1)
    while True:
        first = not rounds
        if first and chunk is not None:
            split = chunk < length
        else:
            split = first and 2 * T < sms and length > max(_SPLIT_MIN, 2 * k)
        full = max(_pow2(length), 16)
        if full <= max_chunk and not split:
            rounds.append((full, 1))
            return rounds
        ch = chunk if (first and chunk is not None) else _pow2(math.isqrt(length * k))
        ch = min(max(ch, _pow2(2 * k)), max_chunk)
        s = cdiv(length, ch)
        if s == 1:
            rounds.append((full, 1))
            return rounds
        rounds.append((ch, s))
        length = s * k


def round_buffers(T: int, s: int, k: int, device: torch.device):
    """(keys, indices, next row lengths) a non-final round writes: int32 ``[T, s·k]`` twice (``s``
    chunks keep ``k`` candidates each) and int32 ``[T]``."""
    keys = torch.empty((T, s * k), dtype=torch.int32, device=device)
    return keys, torch.empty_like(keys), torch.empty((T,), dtype=torch.int32, device=device)


def _warps(ch: int) -> int:
    """Warps of a register-variant program: 8 keys per thread, at most 16 warps. The chunk unrolls
    into straight-line code per key a thread holds, so fewer keys per thread is less code: sm_90 SASS
    of a 4,096-entry chunk is 137 KB with 4 warps, 60 KB with 16. Measured on the H200 (the same
    4,096-entry block, 2,048 live entries): 29.0 µs with 4 warps (32 keys per thread) against
    16.2 µs with 16 (8 per thread; that run also included a second, small round). This default for
    every chunk size is inferred from that pair, not yet swept. 16,384 entries keep 16 warps (32
    keys per thread; 32 warps would cap registers at 64 per thread)."""
    return max(4, min(16, ch // 256))


def select_variant(device: torch.device, variant: str | None = None) -> str:
    """The selection kernel for ``device``: ``variant`` if given, else ``DSV4_TOPK_SELECT``, else
    ``"cute"`` where ``kernels.cute.backend`` picks CuTe DSL (sm_90 / sm_100 with the packages
    installed), else ``"registers"``. A ``ValueError`` names a bad variant."""
    if variant is None:
        variant = os.environ.get(VARIANT_ENV, "").strip().lower() or None
    if variant is None:
        from ..cute._common import backend

        variant = "cute" if backend(device) == "cute" else "registers"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "cute" and device.type != "cuda":
        raise ValueError(f"the 'cute' selection runs on CUDA devices only, got {device}")
    return variant


def select_topk(logits: torch.Tensor, positions: torch.Tensor, token_to_req: torch.Tensor, n_req: int,
                compress_ratio: int, topk: int, sms: int, chunk: int | None = None,
                max_chunk: int = MAX_CHUNK, variant: str | None = None, sub: int = 1024,
                num_warps: int | None = None, cluster: int | None = None) -> torch.Tensor:
    """int32 ``[T, topk]`` (``reference.attention.select_topk`` of the visible prefix of each row of
    the fp32 ``logits [T, L]``; only positions below the row's visible count are read).

    ``variant`` (``select_variant``): ``"cute"`` (``kernels.cute.topk``: shared-memory histograms
    over 8-bit digits; the default where CuTe DSL runs), ``"registers"`` (the Triton default: the
    chunk held in registers), or ``"looped"`` (Triton, every pass re-reads the chunk ``sub`` entries
    at a time; slower on the H200). ``dsv4::indexer_topk`` takes the default. All give the same
    bits. ``cluster`` (``"cute"`` only): ``kernels.cute.topk.cluster_plan``'s argument."""
    variant = select_variant(logits.device, variant)
    T, L = logits.shape
    out = torch.empty((T, topk), dtype=torch.int32, device=logits.device)
    if T == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    if token_to_req.stride(0) != 1:
        token_to_req = token_to_req.contiguous()
    if variant == "cute":
        from ..cute import topk as cute_topk
        from ._launch import pdl_meta

        pdl = pdl_meta(logits.device.index or 0) is not None
        return cute_topk.select_into(out, logits, positions, token_to_req, n_req, compress_ratio, topk, sms,
                                     chunk=chunk, max_chunk=max_chunk, pdl=pdl, cluster=cluster)
    rounds = plan(T, L, topk, sms, chunk, max_chunk)
    kb = _pow2(topk)
    src, src_idx, n_buf, stride = logits, logits, positions, logits.stride(0)
    for r, (ch, s) in enumerate(rounds):
        final = r == len(rounds) - 1
        if final:
            keys, idx, n_next, out_stride = out, out, positions, topk
        else:
            keys, idx, n_next = round_buffers(T, s, topk, logits.device)
            out_stride = s * topk
        _topk_round_kernel[(T, s)](
            src, src_idx, n_buf, positions, token_to_req, keys, idx, n_next,
            n_req, compress_ratio, L, stride, topk, out_stride,
            CH=ch, KB=kb, FROM_LOGITS=r == 0, FINAL=final, LOOPED=variant == "looped", SUB=min(sub, ch),
            num_warps=num_warps or (4 if variant == "looped" else _warps(ch)),
        )
        src, src_idx, n_buf, stride = keys, idx, n_next, out_stride
    return out

"""Paged caches for a list of DSv4 attention layers, and their host-side page bookkeeping.

Cache kinds (one ``uint8 [num_pages, page_bytes]`` tensor per layer and kind, byte layouts of docs/numerics.md §5):

================  ============  =================  =====================================================
kind              block size    pages              table ``[max_num_seqs, width]`` int32
================  ============  =================  =====================================================
``swa``           64 tokens     ring per request   logical: entry ``j`` = ring page ``j % ring``
``c4``/``c128``   64 / 2 entr.  from the budget    entry ``j`` = j-th page of the request, −1 unallocated
``c4_state``      4 rows        ring per request   logical ring, as ``swa``
``c128_state``    8 rows        ring per request   logical ring, as ``swa``
================  ============  =================  =====================================================

The SWA cache and the compressor state caches only ever need the last ``window`` / ``coff·r``
positions before a step's tokens, so each request owns a ring of pages: enough for the longest step
(``max_num_batched_tokens``) plus that history. Their block tables stay *logical* (column = position
// block size, the layout every op reads) and repeat the ring's pages, so no op needs to know about
the ring. Compressed caches (and the indexer K cache, which shares the C4 table) grow with the
sequence and are sized from ``token_budget``, the number of tokens all live requests may hold.

Layers of the same kind share page ids (one block table per kind), like vLLM's cache groups.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .. import layouts
from ..config import DSv4AttentionConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def overlapping_pairs(named: list) -> list:
    """``[(name_a, name_b), ...]`` of the ``(name, tensor)`` pairs whose bytes may overlap, by the test
    AOTAutograd and Inductor's re-inplacing apply to graph inputs (``compute_overlapping_tensors``:
    exact for disjoint ranges and page-interleaved views of one storage), so a layout accepted here
    is one a compiled step sees as disjoint."""
    from torch._C._dynamo.guards import compute_overlapping_tensors

    groups: dict = {}  # the test assumes one storage: group by storage first
    for n, t in named:
        if t.numel() > 0:
            groups.setdefault(t.untyped_storage().data_ptr(), []).append((n, t))
    pairs = []
    for group in groups.values():
        hit = sorted(compute_overlapping_tensors([t for _, t in group])) if len(group) > 1 else []
        pairs += [(group[i][0], group[j][0]) for k, i in enumerate(hit) for j in hit[k + 1:]
                  if compute_overlapping_tensors([group[i][1], group[j][1]])]
    return pairs


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Sizes of a runtime: at most ``max_num_seqs`` live requests of at most ``max_model_len``
    tokens, at most ``max_num_batched_tokens`` tokens per step, at most ``max_chunk_tokens`` of them
    from one request (the longest prefill chunk; it sizes the per-request SWA and compressor-state
    page rings, so a small chunk bounds their memory), and at most ``token_budget`` cached tokens
    over all live requests."""

    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    token_budget: int
    indexer_fmt: str = "fp8"
    max_chunk_tokens: Optional[int] = None  # most new tokens of one request per step (default: all)

    def __post_init__(self):
        if self.max_chunk_tokens is None:
            object.__setattr__(self, "max_chunk_tokens", self.max_num_batched_tokens)
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "token_budget", "max_chunk_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.indexer_fmt not in layouts.INDEXER_FORMATS:
            raise ValueError(f"indexer_fmt must be one of {layouts.INDEXER_FORMATS}, got {self.indexer_fmt!r}")


@dataclasses.dataclass
class LayerCache:
    """The caches of one layer (``None`` where the layer type has none)."""

    swa: torch.Tensor
    compressed: Optional[torch.Tensor] = None
    compressor_state: Optional[torch.Tensor] = None
    indexer: Optional[torch.Tensor] = None
    indexer_state: Optional[torch.Tensor] = None

    def tensors(self) -> list:
        """The cache tensors (not copies: ``dataclasses.astuple`` would deep-copy them)."""
        return [t for t in (getattr(self, f.name) for f in dataclasses.fields(self)) if t is not None]


@dataclasses.dataclass(frozen=True)
class PageKind:
    name: str
    block_size: int  # slots (tokens, entries or state rows) per page
    width: int  # block-table columns
    num_pages: int
    ring: Optional[int]  # pages per request for ring kinds, None for growing kinds
    per_slot: int  # positions per slot: 1 for token kinds, r for compressed entries


@dataclasses.dataclass
class _Request:
    row: int
    num_tokens: int = 0
    pages: dict = dataclasses.field(default_factory=dict)  # kind -> list of pages


class KVCacheManager:
    """Allocates every layer's caches and hands out pages to requests (host side only).

    ``caches[i]`` is the ``LayerCache`` of ``layer_ids[i]``. ``tables[kind]`` are CPU int32 block
    tables; ``StepMetadataBuilder`` mirrors them into device buffers.

    ``single_pool=True`` allocates every cache of every layer as a view into one ``uint8`` buffer
    (``self.pool``), the layout vLLM uses; a compiled step writes such caches in place exactly as it
    does separate tensors (``dsv4_compile.lowerings.shared_storage``). Caches that overlap in memory
    are refused (``check_layout``), since nothing could keep their pages apart.
    """

    POOL_ALIGN = 256  # bytes: each cache of a pool starts at a multiple (vector loads, fp32 state rows)

    def __init__(self, config: DSv4AttentionConfig, layer_ids: Sequence[int], cache_config: CacheConfig,
                 device=None, single_pool: bool = False):
        self.config, self.cache_config = config, cache_config
        self.layer_ids = list(layer_ids)
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one layer")
        bad = [i for i in self.layer_ids if not 0 <= i < len(config.compress_ratios)]
        if bad:
            raise ValueError(f"layer_ids must lie in [0, {len(config.compress_ratios)}), got {bad}")
        cc, chunk = cache_config, min(cache_config.max_chunk_tokens, cache_config.max_num_batched_tokens)
        self.ratios = sorted({config.compress_ratio(i) for i in self.layer_ids} - {0})
        ring = lambda history, bs: cdiv(chunk + history - 1, bs) + 1  # noqa: E731

        kinds = []
        swa_ring = ring(config.sliding_window, layouts.SWA_BLOCK_SIZE)
        kinds.append(PageKind("swa", layouts.SWA_BLOCK_SIZE, cdiv(cc.max_model_len, layouts.SWA_BLOCK_SIZE),
                              cc.max_num_seqs * swa_ring, swa_ring, 1))
        for r in self.ratios:
            bs = layouts.C4_BLOCK_SIZE if r == 4 else layouts.C128_BLOCK_SIZE
            sbs = layouts.C4_STATE_BLOCK_SIZE if r == 4 else layouts.C128_STATE_BLOCK_SIZE
            kinds.append(PageKind(f"c{r}", bs, max(1, cdiv(cc.max_model_len // r, bs)),
                                  cdiv(cc.token_budget // r, bs) + cc.max_num_seqs, None, r))
            srings = ring(layouts.compress_overlap(r) * r, sbs)
            kinds.append(PageKind(f"c{r}_state", sbs, cdiv(cc.max_model_len, sbs), cc.max_num_seqs * srings, srings, 1))
        self.kinds = {k.name: k for k in kinds}
        self.tables = {k.name: torch.full((cc.max_num_seqs, k.width), -1, dtype=torch.int32) for k in kinds}
        self._free = {k.name: list(range(k.num_pages - 1, -1, -1)) for k in kinds}
        self._free_rows = list(range(cc.max_num_seqs - 1, -1, -1))
        self.requests: dict = {}
        self.used_tokens = 0
        self.dirty: set = set(self.kinds)  # tables the builder must copy to the device

        self._journal: list = []  # this step's extend calls, for rollback
        self.pool, self._pool_used = None, 0
        if single_pool:
            self.pool = torch.zeros(self._pool_bytes(), dtype=torch.uint8, device=device)
        self.caches = [self._layer_cache(i, device) for i in self.layer_ids]
        self.check_layout()

    # --- allocation --------------------------------------------------------------------------------
    def _page_shape(self, kind: str, fmt: str, head_dim: int, ratio: int) -> tuple[int, int]:
        k = self.kinds[kind]
        if fmt == "state":
            return k.num_pages, layouts.compressor_state_page_bytes(ratio, head_dim, k.block_size)
        return k.num_pages, layouts.page_bytes(fmt, k.block_size)

    def _layer_shapes(self, layer: int) -> dict:
        """``{LayerCache field: (num_pages, page_bytes)}`` of one layer."""
        r = self.config.compress_ratio(layer)
        shapes = {"swa": self._page_shape("swa", "fp8_ds_mla", 0, 0)}
        if r:
            shapes["compressed"] = self._page_shape(f"c{r}", "fp8_ds_mla", 0, r)
            shapes["compressor_state"] = self._page_shape(f"c{r}_state", "state", layouts.KV_HEAD_DIM, r)
        if r == 4:
            shapes["indexer"] = self._page_shape("c4", self.cache_config.indexer_fmt, 0, r)
            shapes["indexer_state"] = self._page_shape("c4_state", "state", layouts.INDEXER_HEAD_DIM, r)
        return shapes

    def _pool_bytes(self) -> int:
        a = self.POOL_ALIGN
        return sum(cdiv(p * b, a) * a for i in self.layer_ids for p, b in self._layer_shapes(i).values())

    def _pages(self, shape: tuple[int, int], device) -> torch.Tensor:
        if self.pool is None:
            return torch.zeros(shape, dtype=torch.uint8, device=device)
        n = shape[0] * shape[1]
        view = self.pool[self._pool_used:self._pool_used + n].view(shape)
        self._pool_used += cdiv(n, self.POOL_ALIGN) * self.POOL_ALIGN
        return view

    def _layer_cache(self, layer: int, device) -> LayerCache:
        return LayerCache(**{f: self._pages(shape, device) for f, shape in self._layer_shapes(layer).items()})

    def check_layout(self) -> None:
        """``ValueError`` naming two caches that overlap in memory (or whose disjointness cannot be
        shown from their sizes, strides and offsets). Caches may share a storage (one pool); a step
        writes each in place, but overlapping caches would overwrite each other's pages."""
        named = [(f"layer {i} {f}", t) for i, c in zip(self.layer_ids, self.caches)
                 for f, t in vars(c).items() if t is not None]
        tensors = dict(named)
        for na, nb in overlapping_pairs(named)[:1]:
            ta, tb = tensors[na], tensors[nb]
            raise ValueError(f"caches {na} {tuple(ta.shape)} and {nb} {tuple(tb.shape)} overlap in memory "
                             f"(storage offsets {ta.storage_offset()}, {tb.storage_offset()}; strides "
                             f"{ta.stride()}, {tb.stride()}): every cache needs bytes of its own (vLLM's "
                             f"hybrid allocator shares one buffer between layer groups by design; this runtime "
                             f"does not)")

    def cache_bytes(self) -> int:
        return sum(t.numel() for c in self.caches for t in c.tensors())

    def _take(self, kind: str, n: int) -> list:
        free = self._free[kind]
        if len(free) < n:
            raise ValueError(f"out of {kind} cache pages: {n} needed, {len(free)} free "
                             f"(raise CacheConfig.token_budget or max_num_seqs)")
        return [free.pop() for _ in range(n)]

    def add_request(self, req_id) -> int:
        """Admit a request: a block-table row and its SWA / compressor-state page rings."""
        if req_id in self.requests:
            raise ValueError(f"request {req_id!r} is already live")
        if not self._free_rows:
            raise ValueError(f"max_num_seqs ({self.cache_config.max_num_seqs}) requests are already live")
        req = _Request(self._free_rows.pop())
        for k in self.kinds.values():
            if k.ring is not None:
                pages = self._take(k.name, k.ring)
                req.pages[k.name] = pages
                cols = torch.arange(k.width) % k.ring
                self.tables[k.name][req.row] = torch.tensor(pages, dtype=torch.int32)[cols]
                self.dirty.add(k.name)
            else:
                req.pages[k.name] = []
        self.requests[req_id] = req
        return req.row

    def free_request(self, req_id) -> None:
        if req_id not in self.requests:
            raise ValueError(f"request {req_id!r} is not live")
        req = self.requests.pop(req_id)
        for name, pages in req.pages.items():
            self._free[name].extend(reversed(pages))
            self.tables[name][req.row] = -1
            self.dirty.add(name)
        self._free_rows.append(req.row)
        self.used_tokens -= req.num_tokens

    def check_extend(self, batch: Sequence[tuple]) -> None:
        """ValueError unless every ``(req_id, n_new)`` of ``batch`` fits (known live request, ``n_new``
        >= 1, length within ``max_model_len``, total within ``token_budget``). Changes nothing."""
        cc, seen, total = self.cache_config, set(), self.used_tokens
        for req_id, n in batch:
            if req_id not in self.requests:
                raise ValueError(f"request {req_id!r} is not live (add_request first)")
            if req_id in seen:
                raise ValueError(f"request {req_id!r} appears twice in one step")
            seen.add(req_id)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"request {req_id!r}: the number of new tokens must be a positive int, got {n!r}")
            if n > cc.max_chunk_tokens:
                raise ValueError(f"request {req_id!r} schedules {n} tokens in one step, over max_chunk_tokens = "
                                 f"{cc.max_chunk_tokens} (the page rings hold one chunk plus the window)")
            end = self.requests[req_id].num_tokens + n
            if end > cc.max_model_len:
                raise ValueError(f"request {req_id!r} would reach {end} tokens: positions must stay below "
                                 f"max_model_len = {cc.max_model_len} (the RoPE table's rows)")
            total += n
        if total > cc.token_budget:
            raise ValueError(f"this step would hold {total} cached tokens, over the token budget of "
                             f"{cc.token_budget}")

    def extend(self, req_id, n: int) -> tuple[int, int]:
        """Account ``n`` new tokens of a request (call ``check_extend`` first); allocates the compressed
        pages they close entries into. Returns ``(row, first new position)``. Recorded in the journal
        that ``rollback`` undoes (``begin_step`` starts a new one)."""
        req = self.requests[req_id]
        start, req.num_tokens = req.num_tokens, req.num_tokens + n
        self.used_tokens += n
        new_pages = {}
        for k in self.kinds.values():
            if k.ring is None:
                need = cdiv(req.num_tokens // k.per_slot, k.block_size)
                have = req.pages[k.name]
                if need > len(have):
                    new = self._take(k.name, need - len(have))
                    self.tables[k.name][req.row, len(have):need] = torch.tensor(new, dtype=torch.int32)
                    have.extend(new)
                    self.dirty.add(k.name)
                    new_pages[k.name] = len(new)
        self._journal.append((req_id, n, new_pages))
        return req.row, start

    def begin_step(self) -> None:
        """Start the journal of one step's ``extend`` calls (``StepMetadataBuilder.build`` does)."""
        self._journal = []

    def rollback(self) -> None:
        """Undo every ``extend`` since ``begin_step``: token counts, and the compressed pages they took
        (returned to the free lists, their block-table entries −1 again). For a step whose forward
        raised: the requests go on as if it had never been scheduled."""
        for req_id, n, new_pages in reversed(self._journal):
            req = self.requests.get(req_id)
            if req is None:
                continue
            req.num_tokens -= n
            self.used_tokens -= n
            for kind, count in new_pages.items():
                pages = req.pages[kind]
                taken, req.pages[kind] = pages[len(pages) - count:], pages[:len(pages) - count]
                self.tables[kind][req.row, len(req.pages[kind]):len(pages)] = -1
                self._free[kind].extend(reversed(taken))
                self.dirty.add(kind)
        self._journal = []

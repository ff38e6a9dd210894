"""``StepMetadataBuilder``: host-side index math for one step, copied into persistent device buffers.

A step is a list of ``(req_id, n_new_tokens)``; its tokens are laid out request by request (the
order of ``x``'s rows). For each token the builder computes, on the host, its position, its request's
block-table row and its cache slots (SWA, compressed entry, compressor state: see
``runtime.metadata``), then copies them with one host-to-device copy into a persistent
``[7, max_num_batched_tokens]`` int64 buffer; changed block tables are copied whole. Nothing in the
forward depends on a host value, and every returned tensor is a slice of a persistent buffer, so
the addresses a CUDA graph captured stay valid.

Rows ``[T, pad_to)`` are padding: position 0, request −1, every slot −1 — ops skip them, so they
never change a cache byte.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .cache import KVCacheManager
from .metadata import CompressedMetadata, StepMetadata

_ROWS = ("positions", "token_to_req", "swa", "c4", "c4_state", "c128", "c128_state")


class _PinnedRing:
    """Page-locked host staging buffers used round-robin; a buffer is reused only after the copy
    that last read it has finished (an event wait, not a stream sync)."""

    def __init__(self, like: torch.Tensor, n: int = 2):
        self.bufs = [torch.empty_like(like, device="cpu").pin_memory() for _ in range(n)]
        self.events = [torch.cuda.Event() for _ in range(n)]  # reused: re-recorded on every stage
        self.recorded = [False] * n
        self.i = 0

    def stage(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        i, self.i = self.i, (self.i + 1) % len(self.bufs)
        if self.recorded[i]:
            self.events[i].synchronize()
        buf = self.bufs[i].view(-1)[: src.numel()].view(src.shape)
        buf.copy_(src)
        stream = torch.cuda.current_stream(dst.device)
        with torch.cuda.stream(stream):
            dst.copy_(buf, non_blocking=True)
        self.events[i].record(stream)
        self.recorded[i] = True


class StepMetadataBuilder:
    def __init__(self, manager: KVCacheManager, device=None):
        manager.check_layout()  # caches reassigned since the manager built them: still disjoint
        self.manager = manager
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        cc = manager.cache_config
        self.max_tokens = cc.max_num_batched_tokens
        self.host = torch.full((len(_ROWS), self.max_tokens), -1, dtype=torch.int64)
        self._host_np = self.host.numpy()  # the same memory
        self.tokens = torch.full((len(_ROWS), self.max_tokens), -1, dtype=torch.int64, device=self.device)
        self.tables = {k: t.to(self.device) for k, t in manager.tables.items()}
        cuda = self.device.type == "cuda"
        self._token_stage = _PinnedRing(self.host) if cuda else None
        self._table_stage = {k: _PinnedRing(t) for k, t in manager.tables.items()} if cuda else None
        manager.dirty.clear()

    def _copy(self, src, dst, stage) -> None:
        if stage is None:
            dst.copy_(src)
        else:
            stage.stage(src, dst)

    def is_decode(self, batch: Sequence[tuple]) -> bool:
        """Every request adds one token to a request that already has some (a uniform decode batch)."""
        reqs = self.manager.requests
        return len(batch) > 0 and all(n == 1 and req in reqs and reqs[req].num_tokens > 0 for req, n in batch)

    def build(self, batch: Sequence[tuple], pad_to: Optional[int] = None) -> StepMetadata:
        """Account the step's tokens in the cache manager and return its metadata, ``pad_to`` rows
        (default: the step's token count). Every check runs before anything is allocated or copied."""
        m = self.manager
        n_tokens = sum(n for _, n in batch) if batch else 0
        rows = n_tokens if pad_to is None else pad_to
        if rows > self.max_tokens:
            raise ValueError(f"the step has {rows} token rows, over max_num_batched_tokens = {self.max_tokens}")
        if rows < n_tokens:
            raise ValueError(f"pad_to ({pad_to}) is below the step's {n_tokens} tokens")
        m.begin_step()  # manager.rollback() undoes this step's accounting if its forward raises
        m.check_extend(batch)  # an empty batch is a valid step (an idle data-parallel rank): 0 rows

        host = self._host_np[:, :rows]  # numpy over self.host: index math on a few ints costs ~1 µs per op
        host.fill(-1)
        host[0].fill(0)
        t = 0
        req_rows, offsets, lens = [], [], []
        for req_id, n in batch:
            row, start = m.extend(req_id, n)
            req_rows.append(row)
            offsets.append(start - t)  # position of token i of this request = i + start - (its first row)
            lens.append(n)
            t += n
        if t:
            req = np.repeat(np.asarray(req_rows, dtype=np.int64), lens)
            pos = np.arange(t, dtype=np.int64) + np.repeat(np.asarray(offsets, dtype=np.int64), lens)
            host[0, :t] = pos
            host[1, :t] = req
            host[2, :t] = self._slots("swa", req, pos)
            for r in m.ratios:
                k = 3 if r == 4 else 5
                closes = (pos + 1) % r == 0
                host[k, :t] = np.where(closes, self._slots(f"c{r}", req, pos // r), -1)
                host[k + 1, :t] = self._slots(f"c{r}_state", req, pos)
        host = self.host[:, :rows]

        self._copy(host, self.tokens[:, :rows], self._token_stage)
        for name in sorted(m.dirty):
            self._copy(m.tables[name], self.tables[name], self._table_stage and self._table_stage[name])
        m.dirty.clear()
        return self.view(rows)

    def _slots(self, kind: str, req: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Slots of entries ``idx`` of rows ``req``; −1 past the table (a token that closes no entry may
        name one: with ``max_model_len % r != 0`` its ``p // r`` can be the table's width)."""
        k = self.manager.kinds[kind]
        table = self.manager.tables[kind].numpy()
        col = idx // k.block_size
        inside = col < table.shape[1]
        page = np.where(inside, table[req, np.where(inside, col, 0)], -1).astype(np.int64)
        return np.where(page >= 0, page * k.block_size + idx % k.block_size, -1)

    def view(self, rows: int) -> StepMetadata:
        """``StepMetadata`` over the first ``rows`` rows of the persistent buffers (same addresses for
        the same ``rows``)."""
        tok = self.tokens[:, :rows]
        comp = {}
        for r in self.manager.ratios:
            k = 3 if r == 4 else 5
            comp[r] = CompressedMetadata(tok[k], tok[k + 1], self.tables[f"c{r}"], self.tables[f"c{r}_state"])
        return StepMetadata(tok[0], tok[1], tok[2], self.tables["swa"], comp.get(4), comp.get(128),
                            self.manager.cache_config.max_model_len)

    def pad_only(self, rows: int) -> StepMetadata:
        """Metadata of ``rows`` padding tokens (capture and warm-up): nothing is read or written."""
        return self.build([], pad_to=rows)

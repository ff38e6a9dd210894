"""Running a compiled DSv4 step: ``compile_step`` and ``CUDAGraphRunner`` (vLLM's CUDA-graph modes
``FULL_DECODE_ONLY`` and ``FULL``; ``DecodeGraphRunner`` is its name from before ``FULL``).

``compile_step(fn)`` compiles ``fn(x, meta) -> Tensor`` with the dsv4 passes, ``fullgraph=True`` and
Inductor's own CUDA graphs off, with the token dimension dynamic: one graph serves every batch size,
size 1 included (the token dims are marked dynamic and traced size-oblivious, so no ``T >= 2`` guard
is installed).

``CUDAGraphRunner`` (docs/compile.md §6), ``FULL_DECODE_ONLY`` (the default): decode-only batches
(one new token for every request) are padded to the next capture size, their metadata and
activations copied into persistent buffers, and a CUDA graph of the compiled step — captured once per
size, warm-up first, all sizes in one memory pool — is replayed. Prefill and mixed batches run the
compiled step without a graph. ``FULL``: every batch (prefill chunks, mixed prefill + decode, decode)
is padded to the next token-count bucket and replayed the same way; a batch over the largest bucket
runs without a graph. Padding tokens have slot −1 and no request, so they never touch a cache.
"""

from __future__ import annotations

import bisect
from typing import Callable, Optional, Sequence

import torch

from .builder import StepMetadataBuilder

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64)
CUDAGRAPH_MODES = ("FULL_DECODE_ONLY", "FULL")


def default_token_buckets(max_tokens: int) -> list[int]:
    """``FULL`` mode's buckets: the decode capture sizes, then powers of two, then
    ``max_num_batched_tokens`` itself (so every step the builder admits has a bucket)."""
    sizes, s = set(DEFAULT_CAPTURE_SIZES), 128
    while s < max_tokens:
        sizes.add(s)
        s *= 2
    return sorted(x for x in sizes | {max_tokens} if x <= max_tokens)


def compile_step(fn: Callable, passes: Optional[dict] = None, options: Optional[dict] = None, **compile_kw):
    """``fn(x, meta)`` compiled once for every token count (see the module doc). ``passes`` are
    ``PassConfig`` fields; ``passes=False`` turns every fusion off (plain Inductor, but caches that
    share a storage are still written in place: ``lowerings.shared_storage``)."""
    import dataclasses

    import dsv4_compile

    if passes is False:  # every fusion off; the pass manager stays for caches that share a storage
        from dsv4_compile.lowerings import PassConfig

        passes = {f.name: False for f in dataclasses.fields(PassConfig) if isinstance(f.default, bool)}
    opts = {"triton.cudagraphs": False, **(options or {})}
    return dsv4_compile.compile(fn, passes=passes or {}, options=opts, **compile_kw)


class CUDAGraphRunner:
    """``runner(x, batch)``: one step of ``batch = [(req_id, n_new_tokens), ...]`` over ``x [T, hidden]``.

    Args:
        step: ``step(x, meta) -> [T, hidden]``, usually ``compile_step(...)`` of the model's forward.
        builder: the ``StepMetadataBuilder`` owning the metadata buffers and the cache manager.
        hidden_size, dtype: the activation buffer.
        capture_sizes: the token counts to capture. ``FULL_DECODE_ONLY``: decode batch sizes (each ≤
            max_num_seqs); a decode batch is padded to the next one, and one larger than the largest
            is a ``ValueError``; default 1, 2, 4, … 64 cut at ``min(max_num_seqs,
            max_num_batched_tokens)``. ``FULL``: token-count buckets (each ≤ max_num_batched_tokens)
            for every kind of batch; default ``default_token_buckets``.
        cuda_graphs: capture and replay (default: when the builder's device is CUDA). Off, the batches
            a graph would serve run the step directly, padded the same way (so the numerics are the
            graphed ones).
        mode: ``"FULL_DECODE_ONLY"`` (default) or ``"FULL"`` (vLLM's ``CUDAGraphMode`` names).

    The returned tensor of a replayed step is a view into the graphs' shared memory pool: valid until
    the next replay of *any* size (clone it to keep it).

    Construction runs one padding-only step of the largest capture size (padding rows write nothing),
    which compiles the step and raises the layers' ``ValueError`` for a configuration the runtime
    cannot serve, before any request is admitted; a step that raises later is rolled back.

    ``stats`` counts the steps run: ``replays`` (steps replayed from a CUDA graph: decode steps, and
    in ``FULL`` mode every step with a bucket), ``ungraphed_decode_steps`` and
    ``ungraphed_prefill_or_mixed_steps`` (steps that called the step directly: no graph serves them in
    this mode, or ``cuda_graphs`` is off). Captures and their warm-up calls are not counted.
    ``graph_memory_bytes`` is the device memory the captures reserved (their shared pool).
    """

    def __init__(self, step: Callable, builder: StepMetadataBuilder, hidden_size: int,
                 capture_sizes: Optional[Sequence[int]] = None, dtype=torch.bfloat16,
                 cuda_graphs: Optional[bool] = None, mode: str = "FULL_DECODE_ONLY"):
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"mode must be one of {CUDAGRAPH_MODES}, got {mode!r}")
        self.mode = mode
        if mode == "FULL":
            limit, what = builder.max_tokens, "max_num_batched_tokens"
            if capture_sizes is None:
                capture_sizes = default_token_buckets(limit)
        else:
            limit, what = min(builder.manager.cache_config.max_num_seqs, builder.max_tokens), \
                "max_num_seqs and max_num_batched_tokens"
            if capture_sizes is None:  # the defaults that fit, and the largest batch the runtime admits
                capture_sizes = [s for s in DEFAULT_CAPTURE_SIZES if s < limit] + [min(limit, DEFAULT_CAPTURE_SIZES[-1])]
        sizes = sorted(set(int(s) for s in capture_sizes))
        if not sizes or sizes[0] < 1 or sizes[-1] > limit:
            raise ValueError(f"capture_sizes must be in [1, {limit}] ({what}), got {list(capture_sizes)}")
        self.step, self.builder, self.capture_sizes = step, builder, sizes
        self.hidden_size, self.dtype = hidden_size, dtype
        self.device = builder.device
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the builder on a CUDA device")
        self.x_buf = torch.zeros(builder.max_tokens, hidden_size, dtype=dtype, device=self.device)
        self.graphs: dict = {}
        self.pool = None
        self._warmup_stream = None  # one side stream for every capture's warm-up
        self.graph_memory_bytes = 0
        self.stats = {"replays": 0, "ungraphed_decode_steps": 0, "ungraphed_prefill_or_mixed_steps": 0}
        # one padding-only step of the largest capture size now: it compiles the step (with that size
        # as Inductor's size hint: a hint of 0 or 1 would tune every token-dependent kernel for one
        # row) and runs the layers' host checks (RoPE tables long enough for max_model_len, the caches
        # they need) before any request is admitted. Padding rows write nothing.
        n = self.capture_sizes[-1]
        self.step(self.x_buf[:n], builder.pad_only(n))

    def padded_size(self, n: int) -> int:
        """The capture size a batch of ``n`` tokens is padded to (``ValueError`` past the largest)."""
        i = bisect.bisect_left(self.capture_sizes, n)
        if i == len(self.capture_sizes):
            raise ValueError(f"a batch of {n} tokens is larger than the largest capture size "
                             f"{self.capture_sizes[-1]}")
        return self.capture_sizes[i]

    def bucket(self, batch: Sequence[tuple], decode: Optional[bool] = None) -> Optional[int]:
        """The padded token count a graph serves ``batch`` at in this mode, or ``None`` (the step runs
        unpadded, without a graph). ``ValueError`` for a decode batch past the largest capture size in
        ``FULL_DECODE_ONLY`` (the builder admits it, so it must have a size)."""
        n = sum(k for _, k in batch)
        if n == 0:
            return None
        if self.mode == "FULL":
            return self.padded_size(n) if n <= self.capture_sizes[-1] else None
        decode = self.builder.is_decode(batch) if decode is None else decode
        return self.padded_size(len(batch)) if decode else None

    def _check_x(self, x: torch.Tensor, n_tokens: int) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x must be {self.dtype} [T, {self.hidden_size}] on {self.device}, got {x.dtype} "
                             f"{list(x.shape)} on {x.device}")
        if x.shape[0] != n_tokens:
            raise ValueError(f"x has {x.shape[0]} rows but the batch schedules {n_tokens} tokens")

    # --- capture -----------------------------------------------------------------------------------
    def capture(self, sizes: Optional[Sequence[int]] = None, warmup: int = 2) -> None:
        """Capture the step for ``sizes`` (default: all capture sizes), largest first, one memory pool.
        Each size runs ``warmup`` times on padding-only metadata first (compilation, autotuning and
        kernel JIT happen there, outside the graph)."""
        if not self.cuda_graphs:
            raise ValueError("capture needs cuda_graphs (a CUDA device)")
        for n in sorted(sizes or self.capture_sizes, reverse=True):
            if n not in self.capture_sizes:
                raise ValueError(f"{n} is not a capture size ({self.capture_sizes})")
            if n in self.graphs:
                continue
            meta = self.builder.pad_only(n)
            x = self.x_buf[:n]
            x.zero_()
            with torch.cuda.device(self.device):
                if self._warmup_stream is None:
                    self._warmup_stream = torch.cuda.Stream()
                stream = self._warmup_stream
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(warmup):
                        self.step(x, meta)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                reserved = torch.cuda.memory_reserved(self.device)
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.step(x, meta)
                pool_bytes = self._pool_bytes()
                if pool_bytes is None:  # no snapshot (cudaMallocAsync): what the capture reserved, at least 0
                    pool_bytes = self.graph_memory_bytes + max(0, torch.cuda.memory_reserved(self.device) - reserved)
                self.graph_memory_bytes = pool_bytes
            self.graphs[n] = (graph, out, meta)

    def _pool_bytes(self) -> Optional[int]:
        """Bytes of the segments the captures' pool holds (the allocator snapshot's
        ``segment_pool_id``; a difference of ``memory_reserved`` around a capture can be negative, as
        the allocator may release other cached segments meanwhile), or ``None`` where the allocator
        keeps no snapshot (``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``)."""
        pool = tuple(self.pool) if isinstance(self.pool, (tuple, list)) else self.pool
        dev = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            segments = torch.cuda.memory_snapshot()
        except RuntimeError:
            return None
        return sum(seg["total_size"] for seg in segments
                   if seg.get("device", dev) == dev and tuple(seg.get("segment_pool_id", ())) == pool)

    # --- one step ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, batch: Sequence[tuple]) -> torch.Tensor:
        """One step; a step that raises (a layer's host check, say) leaves the cache manager as it was
        (``KVCacheManager.rollback``): no request is left holding tokens it never computed."""
        self.builder.manager.begin_step()  # the journal rollback undoes: this step's alone
        try:
            return self._run(x, batch)
        except BaseException:
            self.builder.manager.rollback()
            raise

    def _run(self, x: torch.Tensor, batch: Sequence[tuple]) -> torch.Tensor:
        n_tokens = sum(n for _, n in batch)
        self._check_x(x, n_tokens)
        decode = self.builder.is_decode(batch)
        n = self.bucket(batch, decode)
        if n is None:
            meta = self.builder.build(batch)
            self.stats["ungraphed_decode_steps" if decode else "ungraphed_prefill_or_mixed_steps"] += 1
            return self.step(x, meta)
        if self.cuda_graphs and n not in self.graphs:
            self.capture([n])
        self.builder.build(batch, pad_to=n)  # writes the same buffers the graph reads
        self.x_buf[:n_tokens].copy_(x)
        self.x_buf[n_tokens:n].zero_()
        if self.cuda_graphs:
            graph, out, _ = self.graphs[n]
            graph.replay()
            self.stats["replays"] += 1
            return out[:n_tokens]
        self.stats["ungraphed_decode_steps" if decode else "ungraphed_prefill_or_mixed_steps"] += 1
        return self.step(self.x_buf[:n], self.builder.view(n))[:n_tokens]


DecodeGraphRunner = CUDAGraphRunner  # the name from before FULL mode (FULL_DECODE_ONLY is the default)

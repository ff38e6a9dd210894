"""Running a compiled DSv4 step: ``compile_step`` and ``DecodeGraphRunner`` (FULL_DECODE_ONLY).

``compile_step(fn)`` compiles ``fn(x, meta) -> Tensor`` with the dsv4 passes, ``fullgraph=True`` and
Inductor's own CUDA graphs off, with the token dimension dynamic: one graph serves every batch size,
size 1 included (the token dims are marked dynamic and traced size-oblivious, so no ``T >= 2`` guard
is installed).

``DecodeGraphRunner`` (docs/compile.md §6): decode-only batches (one new token for every
request) are padded to the next capture size, their metadata and activations copied into
persistent buffers, and a CUDA graph of the compiled step — captured once per size, warm-up first,
all sizes in one memory pool — is replayed. Prefill and mixed batches run the compiled step without
a graph. Padding tokens have slot −1 and no request, so they never touch a cache.
"""

from __future__ import annotations

import bisect
from typing import Callable, Optional, Sequence

import torch

from .builder import StepMetadataBuilder

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64)


def compile_step(fn: Callable, passes: Optional[dict] = None, options: Optional[dict] = None, **compile_kw):
    """``fn(x, meta)`` compiled once for every token count (see the module doc). ``passes`` are
    ``PassConfig`` fields; ``passes=False`` compiles with plain Inductor (no dsv4 passes)."""
    import dsv4_compile

    plain = {"post_grad_custom_post_pass": None} if passes is False else {}  # no dsv4 passes
    opts = {"triton.cudagraphs": False, **plain, **(options or {})}
    return dsv4_compile.compile(fn, passes=passes or {}, options=opts, **compile_kw)


class DecodeGraphRunner:
    """``runner(x, batch)``: one step of ``batch = [(req_id, n_new_tokens), ...]`` over ``x [T, hidden]``.

    Args:
        step: ``step(x, meta) -> [T, hidden]``, usually ``compile_step(...)`` of the model's forward.
        builder: the ``StepMetadataBuilder`` owning the metadata buffers and the cache manager.
        hidden_size, dtype: the activation buffer.
        capture_sizes: decode batch sizes to capture (each ≤ max_num_seqs); a decode batch is padded
            to the next one. A decode batch larger than the largest is a ``ValueError``. Default:
            1, 2, 4, … 64 cut at ``min(max_num_seqs, max_num_batched_tokens)``.
        cuda_graphs: capture and replay (default: when the builder's device is CUDA). Off, decode
            batches run the step directly (still padded, so the numerics are the graphed ones).

    The returned tensor of a replayed step is a view into the graphs' shared memory pool: valid until
    the next replay of *any* size (clone it to keep it).

    Construction runs one empty step (T = 0: no kernel writes anything), which compiles the step and
    raises the layers' ``ValueError`` for a configuration the runtime cannot serve.

    ``stats`` counts the steps run: ``replays`` (decode steps replayed from a CUDA graph),
    ``ungraphed_decode_steps`` (decode steps that called the step directly: ``cuda_graphs`` off) and
    ``prefill_or_mixed_steps`` (every other batch, which calls the step directly). Captures and their
    warm-up calls are not counted.
    """

    def __init__(self, step: Callable, builder: StepMetadataBuilder, hidden_size: int,
                 capture_sizes: Optional[Sequence[int]] = None, dtype=torch.bfloat16,
                 cuda_graphs: Optional[bool] = None):
        limit = min(builder.manager.cache_config.max_num_seqs, builder.max_tokens)
        if capture_sizes is None:  # the defaults that fit, and the largest batch the runtime admits
            capture_sizes = [s for s in DEFAULT_CAPTURE_SIZES if s < limit] + [min(limit, DEFAULT_CAPTURE_SIZES[-1])]
        sizes = sorted(set(int(s) for s in capture_sizes))
        if not sizes or sizes[0] < 1 or sizes[-1] > limit:
            raise ValueError(f"capture_sizes must be in [1, {limit}] (max_num_seqs and max_num_batched_tokens), "
                             f"got {list(capture_sizes)}")
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
        self.stats = {"replays": 0, "ungraphed_decode_steps": 0, "prefill_or_mixed_steps": 0}
        # one empty step now: it compiles the step and runs the layers' host checks (RoPE tables long
        # enough for CacheConfig.max_model_len, the caches they need) before any request is admitted,
        # so a layer the runtime cannot serve is a ValueError here, not in the middle of a request
        self.step(self.x_buf[:0], builder.build([]))

    def padded_size(self, n: int) -> int:
        i = bisect.bisect_left(self.capture_sizes, n)
        if i == len(self.capture_sizes):
            raise ValueError(f"a decode batch of {n} requests is larger than the largest capture size "
                             f"{self.capture_sizes[-1]}")
        return self.capture_sizes[i]

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
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.step(x, meta)
            self.graphs[n] = (graph, out, meta)

    # --- one step ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, batch: Sequence[tuple]) -> torch.Tensor:
        n_tokens = sum(n for _, n in batch)
        self._check_x(x, n_tokens)
        if not self.builder.is_decode(batch):
            meta = self.builder.build(batch)
            self.stats["prefill_or_mixed_steps"] += 1
            return self.step(x, meta)
        n = self.padded_size(len(batch))
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
        self.stats["ungraphed_decode_steps"] += 1
        return self.step(self.x_buf[:n], self.builder.view(n))[:n_tokens]

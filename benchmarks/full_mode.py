"""Prefill and mixed steps of one V4-Flash CSA layer in both runner modes (issue 16): ``FULL`` (the
step replayed from a token-bucket CUDA graph) against ``FULL_DECODE_ONLY`` (the same compiled step run
without a graph).

    python benchmarks/full_mode.py [--chunk 2048] [--decodes 32] [--context 8192] [--iters 20]
                                   [--out results/full_mode_h200.md]

Two step kinds: a ``--chunk``-token prefill chunk of a request with ``--context`` cached tokens
(chunked prefill: its sparse attention reads the cache), and the same chunk plus ``--decodes``
one-token decodes of other requests at ``--context`` (a mixed step). For each kind and mode:

* **step**: wall time per runner call, back to back (what a server sees: the metadata build, the
  activation copy and the replay or the compiled call; the host runs ahead of the GPU where it can);
* **GPU bound**: the sum of the GPU time of the kernels one replayed step runs (torch.profiler), the
  time the step would take with no host or launch gap;
* **bound / step**: the fraction of the bound the step reaches (the target: ≥ 90 % in ``FULL``), and
  tokens/s.

Every call re-schedules the same batch: the requests are rolled back to their starting length after
each step (``KVCacheManager.rollback``), so every step computes the same positions. The rollback
returns the compressed pages the step took, so every step also copies those block tables to the
device again (both modes alike; a few µs of host time a real step pays only when it takes a page).
The ``replays`` field counts the FULL runner's replays over all step kinds so far.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsv4_compile import DSv4AttentionConfig  # noqa: E402
from dsv4_compile.model import DeepseekV4Attention  # noqa: E402
from dsv4_compile.runtime import CacheConfig, CUDAGraphRunner, KVCacheManager, StepMetadataBuilder, compile_step  # noqa: E402


def kernel_sum_us(fn, reps: int = 5) -> float:
    """GPU µs per call of ``fn`` summed over its kernels (torch.profiler; 0 on the CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / reps


def wall_us(fn, iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def run(chunk: int, decodes: int, context: int, iters: int, device: str):
    cuda = device == "cuda"
    cfg = DSv4AttentionConfig.flash() if cuda else DSv4AttentionConfig.tiny()
    layer_idx = cfg.compress_ratios.index(4)
    max_len = 1 << (context + chunk).bit_length()
    n_req = decodes + 1
    tokens = chunk + decodes
    cc = CacheConfig(max_num_seqs=n_req, max_model_len=max_len, max_num_batched_tokens=tokens,
                     token_budget=n_req * max_len)
    torch.manual_seed(0)
    layer = DeepseekV4Attention(cfg, layer_idx, max_model_len=max_len, device=device)
    mgr = KVCacheManager(cfg, [layer_idx], cc, device=device)
    builder = StepMetadataBuilder(mgr, device)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    reqs = [f"r{i}" for i in range(n_req)]
    for r in reqs:
        mgr.add_request(r)
        mgr.extend(r, context)
    kinds = {f"prefill chunk {chunk}": [(reqs[0], chunk)],
             f"mixed {chunk} + {decodes} decodes": [(reqs[0], chunk)] + [(r, 1) for r in reqs[1:]]}
    buckets = sorted({chunk, tokens})
    runners = {"FULL": CUDAGraphRunner(step, builder, cfg.hidden_size, capture_sizes=buckets, mode="FULL",
                                       cuda_graphs=cuda),
               "FULL_DECODE_ONLY": CUDAGraphRunner(step, builder, cfg.hidden_size, capture_sizes=[n_req],
                                                   cuda_graphs=cuda)}
    rows = []
    with torch.no_grad():
        for kind, batch in kinds.items():
            n = sum(k for _, k in batch)
            x = torch.randn(n, cfg.hidden_size, device=device).bfloat16()

            def call(runner):
                def fn():
                    mgr.begin_step()
                    out = runner(x, batch)
                    mgr.rollback()  # the same positions every call
                    return out
                return fn

            bound = None
            for mode, runner in runners.items():
                fn = call(runner)
                us = wall_us(fn, iters, cuda)
                if mode == "FULL" and cuda:
                    runner.capture([runner.padded_size(n)])
                    graph = runner.graphs[runner.padded_size(n)][0]
                    bound = kernel_sum_us(graph.replay)
                row = dict(kind=kind, mode=mode, tokens=n, step_us=us, tokens_per_s=n / us * 1e6,
                           bound_us=bound or 0.0, replays=runner.stats["replays"])
                rows.append(row)
                print(fmt(row), flush=True)
    return rows


HEADER = ("| step | mode | tokens | step (µs) | tokens/s | GPU bound: kernel sum (µs) | bound / step |\n"
          "|---|---|---|---|---|---|---|")


def fmt(r) -> str:
    frac = f"{100 * r['bound_us'] / r['step_us']:.0f} %" if r["bound_us"] else "—"
    return (f"| {r['kind']} | {r['mode']} | {r['tokens']} | {r['step_us']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['bound_us']:.0f} | {frac} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(HEADER, flush=True)
    rows = run(args.chunk, args.decodes, args.context, args.iters, args.device)
    from _timing import write_results

    md = (f"One V4-Flash CSA layer (`benchmarks/full_mode.py --chunk {args.chunk} --decodes {args.decodes} "
          f"--context {args.context}`), {args.device}, torch {torch.__version__}. Step = wall time per runner "
          f"call, back to back; GPU bound = the kernels of one replayed step.\n\n{HEADER}\n"
          + "\n".join(fmt(r) for r in rows))
    write_results(md, rows, args.out)


if __name__ == "__main__":
    main()

"""Run one DSv4 attention layer through torch.compile and the runtime: a prefill, then decode steps.

    python examples/run_layer.py                      # CPU, tiny config, CSA layer: under a minute
    python examples/run_layer.py --device cuda --config flash --cudagraph   # V4-Flash CSA layer, FULL_DECODE_ONLY
    python examples/run_layer.py --device cuda --config flash --cudagraph full   # prefill replayed too (FULL)

Prints compile time, graph breaks, the fusions the dsv4 passes made, and tokens/s of prefill and
decode (decode steps replay a CUDA graph with --cudagraph, prefill steps too with --cudagraph full;
--decode 0 runs the prefill only). With
tqdm installed (the ``examples`` extra) the loops show a progress bar on a terminal.
"""

import argparse
import time

import torch
from torch._dynamo.utils import counters

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import CacheConfig, CUDAGraphRunner, KVCacheManager, StepMetadataBuilder, compile_step

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional (pip install 'dsv4-compile[examples]')
    tqdm = None

RATIOS = {"swa": 0, "csa": 4, "hca": 128}


def progress(it, desc):
    """``it`` with a tqdm bar on a terminal (the ``examples`` extra); plain ``it`` without tqdm."""
    if tqdm is None:
        return it
    return tqdm(it, desc=desc, unit="step", disable=None, leave=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, choices=["tiny", "flash", "pro"],
                    help="default: tiny on cpu, flash on cuda")
    ap.add_argument("--layer", default="csa", choices=sorted(RATIOS))
    ap.add_argument("--requests", type=int, default=None, help="concurrent requests (default 1 cpu, 8 cuda)")
    ap.add_argument("--prefill", type=int, default=100, help="prompt tokens per request")
    ap.add_argument("--decode", type=int, default=20,
                    help="decode steps (the first is a warm-up, not timed; 0: prefill only)")
    ap.add_argument("--cudagraph", nargs="?", const="decode", default="none", choices=["none", "decode", "full"],
                    help="replay decode steps (decode: FULL_DECODE_ONLY, the default with the flag) or every "
                         "step (full: FULL, prefill padded to a token bucket) from CUDA graphs")
    ap.add_argument("--indexer-fmt", default="fp8", choices=["fp8", "mxfp4"])
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.decode < 0 or args.prefill < 1:
        ap.error("--decode must be >= 0 and --prefill >= 1")
    graphs = args.cudagraph != "none"
    if graphs and device.type != "cuda":
        ap.error("--cudagraph needs --device cuda")
    cfg = getattr(DSv4AttentionConfig, args.config or ("tiny" if device.type == "cpu" else "flash"))()
    n_req = args.requests or (1 if device.type == "cpu" else 8)
    layer_idx = cfg.compress_ratios.index(RATIOS[args.layer])
    max_len = max(512, 1 << (args.prefill + args.decode).bit_length())
    cc = CacheConfig(max_num_seqs=max(n_req, 1), max_model_len=max_len,
                     max_num_batched_tokens=max(args.prefill, 64), token_budget=n_req * max_len,
                     indexer_fmt=args.indexer_fmt)

    torch.manual_seed(0)
    layer = DeepseekV4Attention(cfg, layer_idx, max_model_len=max_len, indexer_fmt=args.indexer_fmt, device=device)
    mgr = KVCacheManager(cfg, [layer_idx], cc, device=device)
    builder = StepMetadataBuilder(mgr, device)
    passes = DSV4PassManager(record=True)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]),
                        options={"post_grad_custom_post_pass": passes})
    mode = "FULL" if args.cudagraph == "full" else "FULL_DECODE_ONLY"
    sizes = None if mode == "FULL" else [s for s in (1, 2, 4, 8, 16, 32, 64) if s < n_req] + [n_req]
    counters.clear()
    # the runner's construction runs one empty step: it compiles (one dynamic graph for every token
    # count) and runs the layer's host checks before any request is admitted
    t0 = time.perf_counter()
    runner = CUDAGraphRunner(step, builder, cfg.hidden_size, capture_sizes=sizes, cuda_graphs=graphs, mode=mode)
    sync(device)
    compile_s = time.perf_counter() - t0
    print(f"{args.layer.upper()} layer {layer_idx} of {args.config or ('tiny' if device.type == 'cpu' else 'flash')} "
          f"(ratio {RATIOS[args.layer]}, {layer.n_heads} heads, hidden {cfg.hidden_size}) on {device}; "
          f"{n_req} request(s), {args.prefill}-token prefill, {args.decode} decode steps; "
          f"caches {mgr.cache_bytes() / 2**20:.1f} MiB")

    if graphs:  # every capture size up front, so no step below pays for a capture
        t0 = time.perf_counter()
        runner.capture()
        print(f"captured {len(runner.graphs)} graphs ({mode}) in {time.perf_counter() - t0:.1f} s, "
              f"{runner.graph_memory_bytes / 2**20:.0f} MiB of graph memory")

    reqs = [f"req{i}" for i in range(n_req)]
    for r in reqs:
        mgr.add_request(r)
    t0 = time.perf_counter()
    for r in progress(reqs, "prefill"):
        out = runner(torch.randn(args.prefill, cfg.hidden_size, device=device).bfloat16(), [(r, args.prefill)])
    sync(device)
    prefill_s = time.perf_counter() - t0

    out_step = f"prefill of {reqs[-1]}"
    decode_s = 0.0
    if args.decode:
        batch = [(r, 1) for r in reqs]
        xs = torch.randn(args.decode, n_req, cfg.hidden_size, device=device).bfloat16()
        out = runner(xs[0], batch)  # warm-up step (first replay), not timed
        sync(device)
        t0 = time.perf_counter()
        for i in progress(range(1, args.decode), "decode"):
            out = runner(xs[i], batch)
        sync(device)
        decode_s = time.perf_counter() - t0
        out_step = f"decode step {args.decode}"

    snap = passes.snapshots[-1] if passes.snapshots else None
    breaks = sum(counters["graph_break"].values())
    print(f"compile (runner construction): {compile_s:.1f} s; Dynamo graphs compiled: "
          f"{counters['stats']['unique_graphs']}; graph breaks: {breaks}")
    if snap is not None:
        print(f"fusions: {', '.join(f'{k} x{v}' for k, v in snap.matches.items() if v)}")
    how = "CUDA-graph replay" if mode == "FULL" and graphs else "compiled, no graph"
    print(f"prefill: {n_req * args.prefill / prefill_s:,.0f} tokens/s ({n_req} x {args.prefill} tokens, {how})")
    steps = args.decode - 1
    how = "CUDA-graph replay" if graphs else "compiled, no graph"
    if steps > 0:
        print(f"decode: {steps * n_req / decode_s:,.0f} tokens/s, {decode_s / steps * 1e3:.2f} ms/step over "
              f"{steps} timed steps after 1 warm-up ({how}); runner stats {runner.stats}")
    elif args.decode == 1:
        print(f"decode: 1 warm-up step, none timed ({how}); runner stats {runner.stats}")
    else:
        print(f"decode: none (--decode 0: prefill only); runner stats {runner.stats}")
    print(f"last output ({out_step}): {tuple(out.shape)} {out.dtype}, finite: {bool(torch.isfinite(out).all())}, "
          f"mean |y| {out.float().abs().mean().item():.4f}")


if __name__ == "__main__":
    main()

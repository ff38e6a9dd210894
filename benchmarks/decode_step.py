"""One V4-Flash CSA attention layer, one decode step: eager vs torch.compile without the dsv4 passes
vs with them vs FULL_DECODE_ONLY CUDA-graph replay (``DecodeGraphRunner``), at B requests x context.

    python benchmarks/decode_step.py [--batches 1 8 32 64] [--contexts 8192 32768] [--weight-formats bf16 fp8]
                                     [--out results/decode_step_h200.md]
    python benchmarks/decode_step.py --plot results/decode_step_h100.json      # PNG from a saved run

Times are GPU time per step from CUDA events around back-to-back steps (for the non-graphed variants
this includes the host launch gaps, as a user without graphs would see) and around graph replays.
Caches are filled with valid random records; every request has ``ctx - 1`` cached tokens and
decodes position ``ctx - 1``, a step that closes a C4 window (the compressors pool and insert: the
heavier of the two kinds of decode step; real decoding closes a window every 4th step). Each weight
format is a row: ``bf16`` (random bf16 weights) and ``fp8`` (the same weights quantized to the
checkpoints' 128x128 FP8 blocks, loaded with ``weight_format="fp8"``). The memory floor is the bytes
one step must read (the weights as stored, SWA + top-k KV records, the indexer K entries it
scores) over the SM streaming-read bandwidth measured in the same run (``_timing.bandwidth_ceilings``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsv4_compile import DSv4AttentionConfig, layouts  # noqa: E402
from dsv4_compile.model import DeepseekV4Attention  # noqa: E402
from dsv4_compile.model.attention import FP8_LINEARS  # noqa: E402
from dsv4_compile.model.fp8 import fp8_checkpoint  # noqa: E402
from dsv4_compile.runtime import (CacheConfig, DecodeGraphRunner, KVCacheManager, StepMetadataBuilder,  # noqa: E402
                                  compile_step)

dsv4 = torch.ops.dsv4


def fill_caches(mgr, cache, g, ratio: int = 4):
    """Valid random records in every slot of one layer's caches (so attention reads finite values): its
    SWA cache and, for a compressed layer of ``ratio`` 4 or 128, its compressed cache and (CSA) its
    indexer K cache, on the caches' device (``g`` a generator there). The compressor states stay zero."""
    chunk = 1 << 16
    parts = [("swa", cache.swa, "fp8_ds_mla")]
    if cache.compressed is not None:
        parts.append((f"c{ratio}", cache.compressed, "fp8_ds_mla"))
    if cache.indexer is not None:
        parts.append(("c4", cache.indexer, mgr.cache_config.indexer_fmt))
    for kind, tensor, fmt in parts:
        bs = mgr.kinds[kind].block_size
        slots = tensor.shape[0] * bs
        dim = layouts.KV_HEAD_DIM if fmt == "fp8_ds_mla" else layouts.INDEXER_HEAD_DIM
        for s in range(0, slots, chunk):
            n = min(chunk, slots - s)
            rows = torch.randn(n, dim, device=tensor.device, generator=g).bfloat16()
            idx = torch.arange(s, s + n, device=tensor.device)
            if fmt == "fp8_ds_mla":
                dsv4.kv_insert(rows, tensor, idx, bs)
            else:
                dsv4.indexer_k_insert(rows, tensor, idx, bs, fmt)


def timed(fn, iters: int, device="cuda") -> float:
    """µs per call of ``iters`` back-to-back calls (after 3 warm-up calls): GPU time from CUDA events
    on a CUDA ``device``, wall-clock time on the CPU."""
    for _ in range(3):
        fn()
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def step_bytes(layer, b: int, ctx: int, cfg) -> int:
    """Bytes one decode step of ``layer`` must read: B requests at ``ctx`` cached tokens."""
    # the checkpoint tensors: bf16 or FP8 weights, FP8 block scales (persistent buffers), sink, ape
    weights = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    rec = layouts.FP8_DS_MLA_RECORD_BYTES
    idx_rec = layouts.record_bytes("fp8")
    r = layer.compress_ratio
    entries = {0: 0, 4: min((ctx + 1) // 4, cfg.index_topk), 128: (ctx + 1) // 128}[r]  # compressed records read
    kv = b * (min(ctx + 1, cfg.sliding_window) + entries) * rec
    index = b * ((ctx + 1) // 4) * sum(idx_rec) if r == 4 else 0
    return weights + kv + index


def profile_replay(graph, reps: int = 10) -> str:
    """GPU time per kernel of one replayed step (torch.profiler), the biggest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time / reps
    total = sum(per.values())
    lines = [f"    {us:8.1f} µs  {100 * us / total:5.1f} %  {name[:110]}" for name, us in
             sorted(per.items(), key=lambda kv: -kv[1])[:25]]
    return f"  kernels of one replayed step (sum {total:.1f} µs):\n" + "\n".join(lines)


def run(batches, contexts, iters: int, profile_cases=(), options=None, weight_format: str = "bf16",
        enable_passes=(), disable_passes=()):
    """Rows of one weight format: ``"bf16"`` (random bf16 weights) or ``"fp8"`` (the same weights
    quantized to the checkpoints' FP8 blocks and loaded with ``weight_format="fp8"``)."""
    from _timing import bandwidth_ceilings, ceiling_fields, ceilings_line

    cfg = DSv4AttentionConfig.flash()
    layer_idx = cfg.compress_ratios.index(4)
    max_b, max_ctx = max(batches), max(contexts)
    max_len = max_ctx + 1024
    torch.manual_seed(0)
    layer = DeepseekV4Attention(cfg, layer_idx, max_model_len=max_len, device="cuda", weight_format=weight_format)
    if weight_format == "fp8":
        layer.load_state_dict(fp8_checkpoint(layer.state_dict(), FP8_LINEARS))
    cc = CacheConfig(max_num_seqs=max_b, max_model_len=max_len, max_num_batched_tokens=max(max_b, 64),
                     token_budget=max_b * max_len)
    mgr = KVCacheManager(cfg, [layer_idx], cc, device="cuda")
    cache = mgr.caches[0]
    fill_caches(mgr, cache, torch.Generator(device="cuda").manual_seed(0))
    builder = StepMetadataBuilder(mgr, "cuda")

    def fwd(x, meta):
        return layer(x, meta, cache)

    t0 = time.perf_counter()
    steps = {"nopass": compile_step(fwd, passes=False, options=options),
             "passes": compile_step(fwd, passes={**{n: True for n in enable_passes}, **{n: False for n in disable_passes}},
                                    options=options)}
    runners = {k: DecodeGraphRunner(s, builder, cfg.hidden_size, capture_sizes=batches) for k, s in steps.items()}
    ceil = bandwidth_ceilings()
    read = ceil["read_tbs"]
    print(ceilings_line(ceil), flush=True)
    print(f"layer weights {sum(p.numel() for p in layer.parameters()) / 1e6:.1f} M "
          f"params; caches {mgr.cache_bytes() / 2**30:.2f} GiB", flush=True)
    rows = []
    cases, emit = cases_progress([(ctx, b) for ctx in contexts for b in batches])
    for ctx, b in cases:
        for r in list(mgr.requests):
            mgr.free_request(r)
        reqs = [f"r{i}" for i in range(b)]
        for r in reqs:
            mgr.add_request(r)
            mgr.extend(r, ctx - 1)  # the timed step decodes position ctx - 1, which closes a C4 window
        for k, runner in runners.items():
            runner.capture([b])  # padding-only warm-up + capture (compiles on the first case)
        batch = [(r, 1) for r in reqs]
        meta = builder.build(batch, pad_to=b)  # the buffers every graph reads
        x = runners["passes"].x_buf[:b]
        x.copy_(torch.randn(b, cfg.hidden_size, device="cuda").bfloat16())
        runners["nopass"].x_buf[:b].copy_(x)  # both graphs see the same activations
        row = {"B": b, "ctx": ctx, "weights": weight_format}
        with torch.no_grad():
            row["eager_us"] = timed(lambda: fwd(x, meta), max(3, iters // 4))
            for k, s in steps.items():
                row[f"{k}_us"] = timed(lambda: s(x, meta), iters)
            for k, runner in runners.items():
                graph = runner.graphs[b][0]
                row[f"{k}_replay_us"] = timed(graph.replay, iters)
        nbytes = step_bytes(layer, b, ctx, cfg)
        row.update(bytes=nbytes, floor_us=nbytes / (read * 1e12) * 1e6, **ceiling_fields(ceil))
        rows.append(row)
        emit(fmt_row(row))
        if (b, ctx) in profile_cases:
            emit(profile_replay(runners["passes"].graphs[b][0]))
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, ceil


HEADER = ("| weights | B | ctx | eager | compile, no passes | compile + passes | no passes, graphed | **passes, graphed** "
          "| vs eager | vs compile no passes | bytes | floor (bytes / read BW) | replay / floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def fmt_row(r) -> str:
    rep = r["passes_replay_us"]
    return (f"| {r.get('weights', 'bf16')} | {r['B']} | {r['ctx'] // 1024}k | {r['eager_us']:.0f} µs | {r['nopass_us']:.0f} µs | "
            f"{r['passes_us']:.0f} µs | {r['nopass_replay_us']:.0f} µs | **{rep:.0f} µs** | "
            f"{r['eager_us'] / rep:.1f}x | {r['nopass_us'] / rep:.1f}x | {r['bytes'] / 1e6:.0f} MB | "
            f"{r['floor_us']:.0f} µs | {rep / r['floor_us']:.2f}x |")


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'dsv4-compile[examples]')"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use; ImportError naming the extra."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MATPLOTLIB_MISSING) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cases_progress(cases):
    """``(iterable, emit)``: ``cases`` with a tqdm bar on a terminal (the ``examples`` extra) and a
    print that keeps the bar below the printed rows; ``cases`` and ``print`` without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return cases, lambda s: print(s, flush=True)
    bar = tqdm(cases, desc="decode_step cases", unit="case", disable=None, leave=False)
    return bar, tqdm.write


def plot(rows, path):
    plt = pyplot()

    contexts = sorted({r["ctx"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    series = [("eager_us", "eager"), ("nopass_us", "compile, no passes"), ("passes_us", "compile + passes"),
              ("nopass_replay_us", "no passes, graphed"), ("passes_replay_us", "passes, graphed (FULL_DECODE_ONLY)"),
              ("floor_us", "memory floor (bytes / streaming read)")]
    formats = sorted({r.get("weights", "bf16") for r in rows})
    for ax, ctx in zip(axes[0], contexts):
        for fmt in formats:  # bf16: every variant; other formats: the graphed step and its floor
            rs = sorted((r for r in rows if r["ctx"] == ctx and r.get("weights", "bf16") == fmt), key=lambda r: r["B"])
            bs = [r["B"] for r in rs]
            for key, label in series:
                if fmt != "bf16" and key not in ("passes_replay_us", "floor_us"):
                    continue
                ax.plot(bs, [r[key] for r in rs], marker="o" if fmt == "bf16" else "s",
                        label=f"{label}, {fmt} weights" if len(formats) > 1 else label,
                        linestyle="--" if key == "floor_us" else ("-" if fmt == "bf16" else "-."))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("decode batch (requests)")
        ax.set_ylabel("GPU time per step (µs)")
        ax.set_title(f"V4-Flash CSA layer decode step, context {ctx // 1024}k")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--out", help="markdown path (JSON rows beside it, PNG beside it when matplotlib exists)")
    ap.add_argument("--plot", help="make the PNG from a saved JSON and exit")
    ap.add_argument("--autotune", action="store_true",
                    help="compile both variants with Inductor's max_autotune_gemm (Triton GEMM templates vs cuBLAS)")
    ap.add_argument("--profile", nargs=2, type=int, action="append", default=[], metavar=("B", "CTX"),
                    help="print the per-kernel GPU time of the graphed step for this case (repeatable)")
    ap.add_argument("--weight-formats", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                    help="the layer's weights: bf16, and/or FP8 blocks run as FP8 GEMMs (weight_format='fp8')")
    ap.add_argument("--enable-passes", nargs="+", default=[], metavar="NAME",
                    help="PassConfig fusions that are off by default to turn on in the 'passes' variants "
                         "(e.g. fp8_linear); the table header names them")
    ap.add_argument("--disable-passes", nargs="+", default=[], metavar="NAME",
                    help="PassConfig fusions that are on by default to turn off in the 'passes' variants (A/B)")
    args = ap.parse_args()
    if args.plot:
        try:
            pyplot()
        except ImportError:
            sys.exit(f"--plot needs matplotlib: {MATPLOTLIB_MISSING}")
        with open(args.plot) as f:
            rows = json.load(f)["rows"]
        plot(rows, os.path.splitext(args.plot)[0] + ".png")
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_step.py needs a CUDA GPU (--plot FILE.json makes the PNG of a saved run "
                 "without one)")
    from _timing import ceilings_line

    rows = []
    for wf in args.weight_formats:
        r, ceil = run(args.batches, args.contexts, args.iters, {tuple(p) for p in args.profile},
                      {"max_autotune_gemm": True} if args.autotune else None, weight_format=wf,
                      enable_passes=args.enable_passes, disable_passes=args.disable_passes)
        rows += r
    dev = torch.cuda.get_device_name()
    extra = f" Passes turned on beyond the defaults: {', '.join(args.enable_passes)}." if args.enable_passes else ""
    if args.disable_passes:
        extra += f" Passes turned off: {', '.join(args.disable_passes)}."
    md = (f"V4-Flash CSA layer decode step on {dev}, torch {torch.__version__}. {ceilings_line(ceil)} The floor is "
          f"the bytes a step must read over the streaming read.{extra}\n\n" + HEADER + "\n"
          + "\n".join(fmt_row(r) for r in rows) + "\n")
    print("\n" + md)
    if args.out:
        base = os.path.splitext(args.out)[0]
        with open(args.out, "w") as f:
            f.write(md)
        with open(base + ".json", "w") as f:
            json.dump({"device": dev, "ceilings": ceil, "rows": rows}, f, indent=1)
        try:
            plot(rows, base + ".png")
        except ImportError:
            print(f"{MATPLOTLIB_MISSING}: no PNG; make it later with --plot {base}.json")


if __name__ == "__main__":
    main()

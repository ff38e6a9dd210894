"""The decode step of a whole DSv4 attention stack (``DeepseekV4AttentionStack``, ``stack.compile()``:
one compiled graph per layer type), graphed (``CUDAGraphRunner``, FULL_DECODE_ONLY), against the sum
over its layers of the single-layer graphed steps, at TP=1 or, under torchrun, tensor parallel
(issue 17).

    python benchmarks/stack_step.py [--config flash|pro] [--batches 1 64] [--context 8192]
                                    [--weight-format bf16|fp8] [--out results/stack_step_h200.md]
    torchrun --nproc_per_node 2 benchmarks/stack_step.py --out results/stack_step_h200.md   # TP=2 rows
    python benchmarks/stack_step.py --preset tiny --device cpu --batches 1 2 --context 64   # CPU smoke run

Presets: ``real`` (default on CUDA) is the released config (``DSv4AttentionConfig.flash()`` /
``.pro()``) with all its layers (43 / 61; the MTP layer left out); ``tiny`` (default on the CPU) is
the tiny config's dims with the same layer mix (``compress_ratios``), CPU-sized.

What is timed, per decode batch B (every request has ``ctx - 1`` cached tokens and decodes position
``ctx - 1``, a step that closes a C4 window, as ``decode_step.py``; the caches are filled directly
with valid random records by ``decode_step.fill_caches``, no prefill):

* **stack step**: ``stack(x, meta, caches)`` — every layer's ``h + attn(attn_norm(h))`` and the
  final norm — captured as one CUDA graph per batch size;
* **single-layer steps**: for each layer type (SWA / CSA / HCA: compress ratio 0 / 4 / 128), a
  one-layer stack (final norm off) holding the stack's own first layer of that type and its caches:
  the same compiled block the stack runs for that layer, alone in a CUDA graph of its own.
  Σ single = Σ over types of (layers of that type) x (its single-layer step);
* **stack / Σ single**: the cost of running the layers as one step (target: <= 1.1 at B=1 and 64 on
  V4-Flash); the stack step also holds the final norm, which no single step has.

Every graph reads the same step metadata (one ``StepMetadataBuilder``, built once per batch) and
random activations. Time = GPU time per step from CUDA events around back-to-back replays
(``decode_step.timed``: 3 warm-up replays, then ``--iters``). The floor is the bytes the step must
read (``decode_step.step_bytes`` summed over the layers: weights as stored on this rank, SWA and
compressed KV records, indexer K entries) over the streaming-read bandwidth measured in the same run
(``_timing.bandwidth_ceilings``). On the CPU (no CUDA graphs) the runners call the compiled step
directly and the times are wall clock: a smoke run, not a measurement.

Tensor parallelism: under torchrun (``WORLD_SIZE`` > 1) every rank initializes the process group
(NCCL on CUDA, with ``NCCL_NVLS_ENABLE=0`` unless set; gloo on the CPU), builds the stack with
``tp=TensorParallel()`` (``H / tp`` query heads per rank, one all-reduce per layer inside the
graphs), takes rank 0's weights (broadcast, so the replicated parts agree bit for bit) and replays
in lockstep; a time is the slowest rank's. Rank 0 prints and writes. Target: TP=2 at B=64 <= 0.6x
the TP=1 step.

``--out`` merges: the rows already in the JSON beside it are kept, except those of the same device,
config, preset, weights, TP, B and context, which this run replaces; the markdown is rewritten from
all rows. Run TP=1 and TP=2 with the same ``--out`` and the table holds both, with each TP>1 row's
"vs TP=1" (its stack step over the TP=1 row's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_step import fill_caches, step_bytes, timed  # noqa: E402
from stack_compile import model_config  # noqa: E402

from dsv4_compile.distributed import TensorParallel  # noqa: E402
from dsv4_compile.model import DeepseekV4AttentionStack  # noqa: E402
from dsv4_compile.model.attention import FP8_LINEARS  # noqa: E402
from dsv4_compile.model.fp8 import fp8_checkpoint  # noqa: E402
from dsv4_compile.model.stack import LAYER_TYPES  # noqa: E402
from dsv4_compile.runtime import CacheConfig, CUDAGraphRunner, StepMetadataBuilder  # noqa: E402

TYPES = ("swa", "csa", "hca")
KEY = ("device", "config", "preset", "weights", "tp", "B", "ctx")  # a row's identity when --out merges


def init_tp(device_kind: str):
    """``(device, TensorParallel or None)``: under torchrun the process group and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        return device, None
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device, TensorParallel()


def build(cfg, args, device, tp, max_b: int):
    """The stack (every rank rank 0's weights), its cache manager (caches full of valid records), one
    metadata builder, and per layer type the one-layer stack of its first layer with that layer's cache."""
    max_len = min(args.context + 1024, cfg.max_position_embeddings)
    layer_ids = list(range(cfg.num_hidden_layers))  # the model's layers (the MTP layer left out)
    kw = dict(max_model_len=max_len, device=device, tp=tp, weight_format=args.weight_format)
    torch.manual_seed(0)
    stack = DeepseekV4AttentionStack(cfg, layer_ids, **kw)
    if tp is not None:  # the replicated parts (wq_a, K=V head, compressors, indexer) the same on every rank
        with torch.no_grad():
            for t in stack.state_dict().values():
                dist.broadcast(t, 0, group=tp.group)
    if args.weight_format == "fp8":  # the same weights in the checkpoints' FP8 blocks, run as FP8 GEMMs
        names = [f"layers.{i}.attn.{n}" for i in layer_ids for n in FP8_LINEARS]
        stack.load_state_dict(fp8_checkpoint(stack.state_dict(), names))
    cc = CacheConfig(max_num_seqs=max_b, max_model_len=max_len, max_num_batched_tokens=max(max_b, 64),
                     token_budget=max_b * max_len)
    mgr = stack.cache_manager(cc, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for k, i in enumerate(layer_ids):
        fill_caches(mgr, mgr.caches[k], g, cfg.compress_ratio(i))
    stack.compile()
    singles = {}
    for t in TYPES:
        k = next((k for k, i in enumerate(layer_ids) if LAYER_TYPES[cfg.compress_ratio(i)] == t), None)
        if k is None:
            continue
        i = layer_ids[k]
        one = DeepseekV4AttentionStack(cfg, [i], final_norm=False, **dict(kw, device="meta"))
        one.layers[str(i)] = stack.layers[str(i)]  # the stack's own layer: its weights, its compiled block
        one.compile()
        singles[t] = (one, mgr.caches[k], stack.layer_types().count(t))
    return stack, mgr, StepMetadataBuilder(mgr, device), singles


@torch.no_grad()  # every step (compile, capture, timing) in one grad mode: no recompile
def run(cfg, args, device, tp) -> list:
    main = tp is None or tp.rank == 0
    say = (lambda s: print(s, flush=True)) if main else (lambda s: None)
    graphs = device.type == "cuda"
    batches = sorted(set(args.batches))
    t0 = time.perf_counter()
    stack, mgr, builder, singles = build(cfg, args, device, tp, max(batches))
    say(f"{stack.extra_repr()}, tp={tp.world_size if tp else 1}; weights "
        f"{sum(t.numel() * t.element_size() for t in stack.state_dict().values()) / 2**30:.2f} GiB per rank, "
        f"caches {mgr.cache_bytes() / 2**30:.2f} GiB; built in {time.perf_counter() - t0:.0f} s")

    def runner(fn):
        return CUDAGraphRunner(fn, builder, cfg.hidden_size, capture_sizes=batches, cuda_graphs=graphs)

    t0 = time.perf_counter()
    runners = {"stack": runner(lambda x, meta: stack(x, meta, mgr.caches))}
    for t, (one, cache, _) in singles.items():
        runners[t] = runner(lambda x, meta, one=one, cache=cache: one(x, meta, [cache]))
    say(f"compiled (padding-only step of B={batches[-1]}) in {time.perf_counter() - t0:.0f} s")
    ceil = None
    if graphs:
        from _timing import bandwidth_ceilings, ceilings_line

        ceil = bandwidth_ceilings(device)
        say(ceilings_line(ceil))
    read = ceil["read_tbs"] if ceil else None
    layers = list(stack.layers.values())
    tp_size = tp.world_size if tp else 1
    rows = []
    say(HEADER)
    for b in batches:
        for r in list(mgr.requests):
            mgr.free_request(r)
        reqs = [f"r{i}" for i in range(b)]
        for r in reqs:
            mgr.add_request(r)
            mgr.extend(r, args.context - 1)  # the timed step decodes position ctx - 1 (closes a C4 window)
        t0 = time.perf_counter()
        if graphs:
            for rn in runners.values():
                rn.capture([b])  # warm-up on padding, then capture: before the metadata below is written
        capture_s = time.perf_counter() - t0
        meta = builder.build([(r, 1) for r in reqs], pad_to=b)  # the buffers every graph reads
        g = torch.Generator(device=device).manual_seed(1)  # the same activations on every rank
        for rn in runners.values():
            rn.x_buf[:b].copy_(torch.randn(b, cfg.hidden_size, device=device, generator=g).bfloat16())
        us = {}
        for name, rn in runners.items():
            fn = rn.graphs[b][0].replay if graphs else (lambda rn=rn: rn.step(rn.x_buf[:b], meta))
            if tp is not None:
                dist.barrier(group=tp.group)
            us[name] = timed(fn, args.iters, device)
        if tp is not None:  # the slowest rank's times
            t = torch.tensor([us[k] for k in runners], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
            us = dict(zip(runners, t.tolist()))
        y = runners["stack"].graphs[b][1][:b] if graphs else runners["stack"].step(runners["stack"].x_buf[:b], meta)
        finite = bool(torch.isfinite(y).all())
        if not finite:
            say(f"WARNING: the stack step's output at B={b} is not finite")
        nbytes = sum(step_bytes(lay.attn, b, args.context, cfg) for lay in layers)
        row = {"device": torch.cuda.get_device_name(device) if graphs else "cpu", "config": args.config,
               "preset": args.preset, "weights": args.weight_format, "tp": tp_size, "B": b, "ctx": args.context,
               "layers": len(layers), "stack_us": us["stack"],
               "single_us": {t: us[t] for t in singles}, "count": {t: n for t, (_, _, n) in singles.items()},
               "bytes": nbytes, "capture_s": capture_s, "graphed": graphs, "finite": finite}
        row["sum_single_us"] = sum(row["single_us"][t] * row["count"][t] for t in singles)
        if read:
            row.update(floor_us=nbytes / (read * 1e12) * 1e6, read_tbs=read)
        rows.append(row)
        say(fmt_row(row, []))
    return rows, ceil


HEADER = ("| config | weights | TP | B | ctx | **stack step** | per layer | SWA single x n | CSA single x n | "
          "HCA single x n | Σ single | **stack / Σ single** | vs TP=1 | floor | stack / floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def fmt_row(r: dict, rows: list) -> str:
    singles = " | ".join(f"{r['single_us'][t]:.0f} µs x {r['count'][t]}" if t in r["single_us"] else "—"
                         for t in TYPES)
    base = next((o for o in rows if o["tp"] == 1 and all(o[k] == r[k] for k in KEY if k != "tp")), None)
    vs = f"{r['stack_us'] / base['stack_us']:.2f}x" if r["tp"] > 1 and base else "—"
    floor = (f"{r['floor_us']:.0f} µs | {r['stack_us'] / r['floor_us']:.2f}x" if "floor_us" in r else "— | —")
    return (f"| {r['config']} ({r['preset']}, {r['layers']} layers) | {r['weights']} | {r['tp']} | {r['B']} | "
            f"{r['ctx']} | **{r['stack_us']:.0f} µs** | {r['stack_us'] / r['layers']:.1f} µs | {singles} | "
            f"{r['sum_single_us']:.0f} µs | **{r['stack_us'] / r['sum_single_us']:.3f}** | {vs} | {floor} |")


def merged(rows: list, out) -> list:
    """``rows`` after the rows of the JSON beside ``out`` that this run does not replace."""
    path = os.path.splitext(out)[0] + ".json" if out else None
    if not path or not os.path.exists(path):
        return rows
    with open(path) as f:
        old = json.load(f)
    ours = {tuple(r[k] for k in KEY) for r in rows}
    kept = [r for r in old if isinstance(r, dict) and all(k in r for k in KEY) and tuple(r[k] for k in KEY) not in ours]
    order = ("device", "config", "preset", "weights", "ctx", "B", "tp")  # TP=1 and TP=2 of one case adjacent
    return sorted(kept + rows, key=lambda r: tuple(r[k] for k in order))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=["real", "tiny"], help="default: real on CUDA, tiny on the CPU")
    ap.add_argument("--config", choices=["flash", "pro"], default="flash")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 64 on CUDA, 1 2 on the CPU)")
    ap.add_argument("--context", type=int, help="cached tokens per request (default 8192 on CUDA, 64 on the CPU)")
    ap.add_argument("--weight-format", default="bf16", choices=["bf16", "fp8"],
                    help="bf16 weights, or the same weights in FP8 blocks run as FP8 GEMMs (real preset)")
    ap.add_argument("--iters", type=int, help="timed steps per measurement (default 40 on CUDA, 3 on the CPU)")
    ap.add_argument("--out", help="markdown path (JSON rows beside it); merges with the rows already there")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU (--device cpu runs the tiny preset)")
    args.preset = args.preset or ("tiny" if cpu else "real")
    args.batches = args.batches or ([1, 2] if cpu else [1, 64])
    args.context = args.context or (64 if cpu else 8192)
    args.iters = args.iters or (3 if cpu else 40)
    if min(args.batches) < 1 or args.context < 2 or args.iters < 1:
        ap.error("--batches must be >= 1, --context >= 2, --iters >= 1")
    if args.weight_format == "fp8" and args.preset == "tiny":
        ap.error("--weight-format fp8 needs --preset real (the tiny o_lora_rank, 64, splits an FP8 weight block)")
    cfg = model_config(args.config, args.preset)
    if args.context + 1 > cfg.max_position_embeddings:
        ap.error(f"--context must stay below max_position_embeddings ({cfg.max_position_embeddings})")

    device, tp = init_tp(args.device)
    rows, ceil = run(cfg, args, device, tp)
    if tp is None or tp.rank == 0:
        from _timing import ceilings_line, write_results

        rows = merged(rows, args.out)
        how = ("GPU time per step from CUDA events around back-to-back CUDA-graph replays. " + ceilings_line(ceil)
               + " The floor is the bytes a step must read (per rank) over the streaming read."
               if ceil else "CPU wall-clock time per step (compiled, no CUDA graphs): a smoke run, not a measurement.")
        md = (f"DSv4 attention stack decode step (the whole stack in one step: `stack.compile()`, one CUDA graph "
              f"per batch size on CUDA) vs the sum over its layers of the single-layer steps of its layer mix "
              f"(benchmarks/stack_step.py), torch {torch.__version__}. Every request holds ctx - 1 cached tokens and "
              f"decodes position ctx - 1. {how} Targets (H200, V4-Flash; reported, not asserted): stack / Σ single "
              f"<= 1.1 at B=1 and B=64; TP=2 at B=64 <= 0.6x TP=1.\n\n"
              + HEADER + "\n" + "\n".join(fmt_row(r, rows) for r in rows))
        write_results(md, rows, args.out)
    if tp is not None:
        dist.barrier(group=tp.group)
        dist.destroy_process_group()
        # leave without the interpreter's teardown, as examples/tp_layer.py (a gloo rank's C++ threads
        # occasionally abort there after all work is done)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

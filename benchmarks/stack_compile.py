"""Compile cost of a whole DSv4 attention stack (``DeepseekV4AttentionStack``): V4-Flash (43 layers)
and V4-Pro (61 layers), cold and warm, for the ways a user may compile it.

    python benchmarks/stack_compile.py                          # tiny dims, 43 / 61 layers (CPU-sized)
    python benchmarks/stack_compile.py --preset real            # the released configs (GPU memory)
    python benchmarks/stack_compile.py --ways stack whole per-layer --out results/stack_compile_cpu.md

Ways:

* ``stack`` — ``stack.compile()``: one compiled graph per layer type (3), shared by the layers.
* ``whole`` — ``compile_step(lambda x, meta: stack(x, meta, caches))``: the whole stack traced as one
  graph (every layer traced and lowered on its own).
* ``per-layer`` — the README's single-layer recipe repeated: one ``compile_step`` per layer. Each adds
  a graph on the same code object; under ``fullgraph=True`` the ninth raises
  ``FailOnRecompileLimitHit`` (reported as such).
* ``compile-layer`` — ``model.stack.compile_layer(layer)`` per layer, the glue eager: the layers
  one by one on one shared graph per type.
* ``eager`` — no compile (the step-time baseline).

Every measurement runs in a fresh process. *Cold*: empty Inductor / Triton caches (a new
``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``); *warm*: a second process on the caches the
cold one filled (Dynamo traces again; AOTAutograd and Inductor hit their caches). Compile time = the
first step's wall time minus the fastest of 4 later steps (a prefill of 2 x 8 tokens each); then a decode step (T=2)
and a one-token step (T=1) must add no graph. ``2nd stack`` is, in the cold process, a second stack of
the same model (other weights) compiled and stepped after the first: the compiled blocks are shared
process-wide, so it traces nothing. The ``--preset tiny`` configs keep the released layer mixes
(``compress_ratios``) on the tiny config's dims, so the graphs are the real ones' structure on
CPU-sized tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MODELS = {"flash": 43, "pro": 61}
WAYS = ("stack", "whole", "per-layer", "compile-layer", "eager")


def model_config(model: str, preset: str):
    from dsv4_compile import DSv4AttentionConfig

    real = DSv4AttentionConfig.flash() if model == "flash" else DSv4AttentionConfig.pro()
    if preset == "real":
        return real
    return dataclasses.replace(DSv4AttentionConfig.tiny(), compress_ratios=real.compress_ratios,
                               num_hidden_layers=real.num_hidden_layers)


def child(args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from dsv4_compile.model import DeepseekV4AttentionStack, compile_layer
    from dsv4_compile.runtime import CacheConfig, StepMetadataBuilder, compile_step

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = model_config(args.model, args.preset)
    max_len = 1024
    cc = CacheConfig(max_num_seqs=4, max_model_len=max_len, max_num_batched_tokens=64, token_budget=4 * max_len)
    layer_ids = list(range(cfg.num_hidden_layers))  # the model's layers (the MTP layer left out)

    def build(seed):
        torch.manual_seed(seed)
        stack = DeepseekV4AttentionStack(cfg, layer_ids, max_model_len=max_len, device=dev)
        mgr = stack.cache_manager(cc, device=dev)
        for r in ("a", "b"):
            mgr.add_request(r)
        return stack, mgr, StepMetadataBuilder(mgr, dev)

    def make_step(stack, mgr):
        if args.way == "stack":
            stack.compile()
            return lambda x, meta: stack(x, meta, mgr.caches)
        if args.way == "whole":
            return compile_step(lambda x, meta: stack(x, meta, mgr.caches))
        if args.way == "per-layer":
            steps = [compile_step(lambda h, meta, lay=lay, c=c: h + lay.attn(lay.attn_norm(h), meta, c))
                     for lay, c in zip(stack.layers.values(), mgr.caches)]

            def step(x, meta):
                for k, s in enumerate(steps):
                    try:
                        x = s(x, meta)
                    except torch._dynamo.exc.FailOnRecompileLimitHit:
                        raise RuntimeError(f"FailOnRecompileLimitHit at layer {k}") from None
                return stack.norm(x)
            return step
        if args.way == "compile-layer":
            fns = [compile_layer(lay.attn) for lay in stack.layers.values()]

            def step(x, meta):
                for lay, fn, c in zip(stack.layers.values(), fns, mgr.caches):
                    x = x + fn(lay.attn_norm(x), meta, c)
                return stack.norm(x)
            return step
        return lambda x, meta: stack(x, meta, mgr.caches)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    out = {"model": args.model, "layers": len(layer_ids), "way": args.way, "device": str(dev)}
    stack, mgr, builder = build(0)
    step = make_step(stack, mgr)
    x16 = torch.randn(16, cfg.hidden_size, device=dev).bfloat16()
    counters.clear()
    try:
        first = timed(lambda: step(x16, builder.build([("a", 8), ("b", 8)])))
    except RuntimeError as e:
        out["error"] = str(e)
        return out
    out["graphs"] = counters["stats"]["unique_graphs"]
    steadies = [timed(lambda: step(x16, builder.build([("a", 8), ("b", 8)]))) for _ in range(4)]
    out["steady_all"] = steadies
    steady = min(steadies)
    out["first_step_s"], out["compile_s"], out["step_ms"] = first, first - steady, steady * 1e3
    for n in (2, 1):  # decode steps: no new graph
        batch = [("a", 1), ("b", 1)][:n]
        step(torch.randn(n, cfg.hidden_size, device=dev).bfloat16(), builder.build(batch))
    out["graphs_after_decode"] = counters["stats"]["unique_graphs"]
    if args.way == "stack":  # a second stack of the same model: the compiled blocks are reused
        stack2, mgr2, builder2 = build(1)
        step2 = make_step(stack2, mgr2)
        first2 = timed(lambda: step2(x16, builder2.build([("a", 8), ("b", 8)])))
        out["second_stack_s"] = max(0.0, first2 - steady)
        out["graphs_after_second"] = counters["stats"]["unique_graphs"]
    return out


def run_child(model: str, way: str, preset: str, cache_dir: str, timeout: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--way", way, "--preset", preset]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "way": way, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"model": model, "way": way, "error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows: list) -> str:
    head = ("| model | layers | way | Dynamo graphs | cold compile (s) | warm compile (s) | 2nd stack (s) | "
            "step, 16 tok (ms) | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cold, warm in rows:
        if "error" in cold:
            lines.append(f"| {cold['model']} | {MODELS[cold['model']]} | {cold['way']} | — | — | — | — | — | "
                         f"{cold['error']} |")
            continue
        note = []
        if cold.get("graphs_after_decode") != cold.get("graphs"):
            note.append(f"decode recompiled: {cold.get('graphs_after_decode')} graphs")
        if "graphs_after_second" in cold and cold["graphs_after_second"] != cold["graphs_after_decode"]:
            note.append(f"2nd stack compiled: {cold['graphs_after_second']} graphs")
        if "error" in warm:
            note.append(f"warm: {warm['error']}")
        graphs = cold["graphs"] if cold["way"] != "eager" else 0
        lines.append(
            f"| {cold['model']} | {cold['layers']} | {cold['way']} | {graphs} | "
            f"{fmt(cold['compile_s'] if cold['way'] != 'eager' else None, '.1f')} | "
            f"{fmt(warm.get('compile_s') if cold['way'] != 'eager' else None, '.1f')} | "
            f"{fmt(cold.get('second_stack_s'), '.2f')} | {cold['step_ms']:.0f} | {'; '.join(note)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "real"), default="tiny")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["flash", "pro"])
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measuring process")
    p.add_argument("--out", help="also write the table (and a .json beside it)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--way", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    rows = []
    for model in args.models:
        for way in args.ways:
            cache_dir = tempfile.mkdtemp(prefix=f"dsv4_stack_{model}_{way}_")
            try:
                cold = run_child(model, way, args.preset, cache_dir, args.timeout)
                warm = run_child(model, way, args.preset, cache_dir, args.timeout) \
                    if "error" not in cold and way != "eager" else {}
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
            rows.append((cold, warm))
            print(json.dumps({"cold": cold, "warm": warm}), file=sys.stderr, flush=True)
    dev = next((c.get("device") for c, _ in rows if c.get("device")), "?")
    text = f"Stack compile cost, preset {args.preset}, device {dev}, torch {_torch_version()}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump([{"cold": c, "warm": w} for c, w in rows], f, indent=1)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()

"""Host time per ``dsv4`` op call (issue 16): where a call's CPU time goes, layer by layer.

    python benchmarks/host_dispatch.py [--device cuda|cpu] [--iters 2000] [--out results.md]
                                       [--step] [--profile N]
    python benchmarks/host_dispatch.py --glue           # our launchers' Python alone (CPU, launches stubbed)

For every op family, on the opcheck inputs of the test suite (small shapes: the host path does
not depend on them; ``tests/`` must be importable, i.e. run from the repository), three host times
per call, each the best of 3 loops of ``--iters`` calls without synchronizing (on CUDA the GPU runs
behind; the launch queue stays far from full):

* **op**: ``torch.ops.dsv4.<op>.default(*args)``, what compiled code calls (Inductor's wrapper calls
  the overload): the dispatcher, ``torch.library.custom_op``'s Python layers (its Autograd kernel,
  its backend wrapper with the aliasing check, ``torch._disable_dynamo``), then ours;
* **ours**: the registered device function called directly: on CUDA the ``register_cuda`` wrapper
  (stride normalization), the op's own checks and the Triton launch; on the CPU the op's Python
  function (checks and the pure-PyTorch reference, whose compute is then part of it);
* **dispatch** = op − ours: what the custom-op machinery adds.

``--glue`` (no GPU needed) times our CUDA functions on CPU tensors with Triton's launch replaced by
a no-op (``JITFunction.run``): the Python of our launchers alone (stride normalization, checks, launch
configuration, output allocation), with the checks (CPU tensors: value checks included) and inside
``ops._lib.trusted()`` (how a fullgraph compiled step calls them: no checks).

``--step`` adds the host time of whole compiled, non-graphed steps of one V4-Flash CSA layer (real
dimensions on CUDA, the tiny test config on the CPU): a B=1 decode step and a 2048-token prefill
chunk, ``compile_step`` with the default passes. Host time of a step = wall time of the call without
synchronizing, after the GPU has drained (median of 30), beside the metadata build of the same
batch (for the prefill chunk the request is freed and re-admitted before each build, so its build
time includes copying the changed block tables). ``--profile N`` prints cProfile's N dearest functions (own time) over 20 decode steps.

Mutated caches are cloned once up front and reused: a call overwrites the same slots each time. The
target (issue 16): ≤ 15 µs per op call from Python on the H200 machine's host.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import dsv4_compile  # noqa: E402,F401
from dsv4_compile.ops._lib import CUDA_KERNELS  # noqa: E402


def host_us(fn, iters: int, device: torch.device) -> float:
    """Best of 3: host µs per call of ``fn`` (no synchronization inside a loop)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return best


def cases(device: str):
    """One ``(name, overload, args, kwargs)`` per op: the first opcheck case of each."""
    import test_strided_args  # the suite's opcheck cases of every op family

    seen, out = set(), []
    for op, args, kw in test_strided_args._cases(device):
        name = op._schema.name.split("::")[1]
        if name not in seen:
            seen.add(name)
            out.append((name, op, args, kw))
    return out


def run(device: torch.device, iters: int):
    import dsv4_compile.ops as ops_pkg

    rows = []
    for name, op, args, kw in cases(device.type):
        mutated = {i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write}
        args = [a.clone() if i in mutated else a for i, a in enumerate(args)]
        if device.type == "cuda":
            ours = CUDA_KERNELS[name]
        else:
            ours = next(getattr(m, name) for m in vars(ops_pkg).values()
                        if hasattr(m, name) and hasattr(getattr(m, name), "_init_fn"))._init_fn
        t_op = host_us(lambda: op(*args, **kw), iters, device)
        t_ours = host_us(lambda: ours(*args, **kw), iters, device)
        rows.append(dict(op=name, device=device.type, op_us=t_op, ours_us=t_ours, dispatch_us=t_op - t_ours))
        print(fmt(rows[-1]), flush=True)
    return rows


def step_host(device: torch.device, profile_top: int = 0):
    """Host µs of compiled, non-graphed CSA-layer steps (decode B=1; a 2048-token prefill chunk)."""
    import statistics

    from dsv4_compile import DSv4AttentionConfig
    from dsv4_compile.model import DeepseekV4Attention
    from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

    cuda = device.type == "cuda"
    cfg = DSv4AttentionConfig.flash() if cuda else DSv4AttentionConfig.tiny()
    layer_idx = cfg.compress_ratios.index(4)
    chunk = 2048 if cuda else 64
    max_len = 16384 if cuda else 512
    torch.manual_seed(0)
    layer = DeepseekV4Attention(cfg, layer_idx, max_model_len=max_len, device=device)
    cc = CacheConfig(max_num_seqs=8, max_model_len=max_len, max_num_batched_tokens=chunk,
                     token_budget=8 * max_len)
    mgr = KVCacheManager(cfg, [layer_idx], cc, device=device)
    cache = mgr.caches[0]
    builder = StepMetadataBuilder(mgr, device)

    def fwd(x, meta):
        return layer(x, meta, cache)

    step = compile_step(fwd)
    rows = []

    def host(batch):
        times = []
        t_meta = []
        x = torch.randn(sum(n for _, n in batch), cfg.hidden_size, device=device).bfloat16()
        with torch.no_grad():
            for i in range(33):
                for r, n in batch:
                    if n > 1:  # a prefill chunk starts its request over (positions stay in range)
                        mgr.free_request(r)
                        mgr.add_request(r)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                meta = builder.build(batch)
                t1 = time.perf_counter()
                step(x, meta)
                t2 = time.perf_counter()
                if i >= 3:
                    t_meta.append((t1 - t0) * 1e6)
                    times.append((t2 - t1) * 1e6)
        return statistics.median(t_meta), statistics.median(times)

    mgr.add_request("d")
    mgr.extend("d", max_len // 2)
    mgr.add_request("p")
    for name, batch in (("decode B=1", [("d", 1)]), (f"prefill chunk {chunk}", [("p", chunk)])):
        meta_us, step_us = host(batch)
        rows.append(dict(step=name, device=device.type, meta_us=meta_us, step_us=step_us))
        print(f"| {name} | {meta_us:.0f} | {step_us:.0f} |", flush=True)
    if profile_top:
        import cProfile
        import pstats

        x = torch.randn(1, cfg.hidden_size, device=device).bfloat16()
        meta = builder.build([("d", 1)])
        pr = cProfile.Profile()
        with torch.no_grad():
            pr.enable()
            for _ in range(20):
                step(x, meta)
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(profile_top)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(profile_top)
    return rows


def glue(iters: int):
    """Host µs per call of each op's CUDA function on CPU tensors, Triton launches stubbed out."""
    from triton.runtime.jit import JITFunction

    from dsv4_compile.ops import _lib

    launches = [0]

    def stub(self, *args, grid, warmup, **kwargs):
        launches[0] += 1

    real, JITFunction.run = JITFunction.run, stub
    rows = []
    try:
        for name, op, args, kw in cases("cpu"):
            fn = CUDA_KERNELS[name]
            launches[0] = 0
            fn(*args, **kw)
            n = launches[0]
            checked = host_us(lambda: fn(*args, **kw), iters, torch.device("cpu"))
            with _lib.trusted():
                trusted = host_us(lambda: fn(*args, **kw), iters, torch.device("cpu"))
            rows.append(dict(op=name, launches=n, checked_us=checked, trusted_us=trusted))
            print(fmt_glue(rows[-1]), flush=True)
    finally:
        JITFunction.run = real
    return rows


GLUE_HEAD = ("| op | Triton launches | our Python, checked (µs) | our Python, trusted (µs) |\n"
             "|---|---|---|---|")


def fmt_glue(r) -> str:
    return f"| {r['op']} | {r['launches']} | {r['checked_us']:.1f} | {r['trusted_us']:.1f} |"


def fmt(r) -> str:
    return f"| {r['op']} | {r['op_us']:.1f} | {r['ours_us']:.1f} | {r['dispatch_us']:.1f} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--glue", action="store_true", help="our launchers' Python alone (CPU, launches stubbed)")
    ap.add_argument("--step", action="store_true", help="also time whole compiled CSA-layer steps")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile's N dearest functions")
    args = ap.parse_args()
    from _timing import write_results

    if args.glue:
        print(GLUE_HEAD, flush=True)
        rows = glue(args.iters)
        md = (f"Our launchers' Python per op call (`benchmarks/host_dispatch.py --glue`), torch {torch.__version__}: "
              f"the CUDA functions on CPU tensors, Triton's launch stubbed out. Best of 3 x {args.iters} calls."
              f"\n\n{GLUE_HEAD}\n" + "\n".join(fmt_glue(r) for r in rows))
        write_results(md, rows, args.out)
        return
    device = torch.device(args.device)
    head = "| op | op call (µs) | ours (µs) | dispatch = op − ours (µs) |\n|---|---|---|---|"
    print(head, flush=True)
    rows = run(device, args.iters)
    step_md = ""
    if args.step:
        shead = "| compiled step, no graph | metadata build (µs) | step call (µs) |\n|---|---|---|"
        print(shead, flush=True)
        srows = step_host(device, args.profile)
        rows += srows
        step_md = "\n\nHost µs of whole steps, median of 30:\n\n" + shead + "\n" + "\n".join(
            f"| {r['step']} | {r['meta_us']:.0f} | {r['step_us']:.0f} |" for r in srows)

    what = ("the registered CUDA function (checks + Triton launch)" if device.type == "cuda"
            else "the op's Python function (checks + the CPU reference's compute)")
    md = (f"Host µs per `dsv4` op call (`benchmarks/host_dispatch.py --device {device.type}`), torch "
          f"{torch.__version__}; ours = {what}. Best of 3 x {args.iters} calls.\n\n{head}\n"
          + "\n".join(fmt(r) for r in rows if "op" in r) + step_md)
    write_results(md, rows, args.out)


if __name__ == "__main__":
    main()

"""Host time per ``dsv4`` op call (issue 16): where a call's CPU time goes, layer by layer.

    python benchmarks/host_dispatch.py [--device cuda|cpu] [--iters 2000] [--out results.md]

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


def fmt(r) -> str:
    return f"| {r['op']} | {r['op_us']:.1f} | {r['ours_us']:.1f} | {r['dispatch_us']:.1f} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    head = "| op | op call (µs) | ours (µs) | dispatch = op − ours (µs) |\n|---|---|---|---|"
    print(head, flush=True)
    rows = run(device, args.iters)
    from _timing import write_results

    what = ("the registered CUDA function (checks + Triton launch)" if device.type == "cuda"
            else "the op's Python function (checks + the CPU reference's compute)")
    md = (f"Host µs per `dsv4` op call (`benchmarks/host_dispatch.py --device {device.type}`), torch "
          f"{torch.__version__}; ours = {what}. Best of 3 x {args.iters} calls.\n\n{head}\n"
          + "\n".join(fmt(r) for r in rows))
    write_results(md, rows, args.out)


if __name__ == "__main__":
    main()

"""Indexer-q region benchmark (H=64, D=128): GPU time per call under CUDA-graph replay, TB/s and the
fraction of the SM streaming-read bandwidth measured in the same run (``_timing.bandwidth_ceilings``).

Columns: our fused op called directly; the plain form (``dsv4.rope`` → quant → weight scaling, as
``dsv4_compile.model.IndexerQ`` writes it) compiled by ``dsv4_compile.compile`` with static and with
dynamic token dimension (the pass turns it into the fused op); and the same region written in plain
PyTorch (``dsv4_compile.reference``, pure aten) compiled by plain Inductor, static (one compile per
T, ``cache_size_limit`` raised: Inductor's best case) and dynamic (``mark_dynamic`` on the tokens).

    python benchmarks/indexer_q.py [--fmt fp8 mxfp4] [--tokens 1 8 ...] [--out results.md] [--sweep]
    python benchmarks/indexer_q.py --backends [--fmt ...] [--tokens ...]   # CuTe vs Triton vs plain Inductor
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv4_compile  # noqa: E402
from dsv4_compile import reference  # noqa: E402
from dsv4_compile.kernels.triton import indexer_q as iq_kernels  # noqa: E402
from dsv4_compile.rope import cos_sin_cache  # noqa: E402

from _timing import (bandwidth_ceilings, ceiling_fields, ceilings_line, fmt_row, graph_time_us,  # noqa: E402
                     input_sets, pct_read, table, write_results)

H, D = 64, 128
WEIGHT_SCALE = D**-0.5 * H**-0.5
TOKENS = [1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384]
dsv4 = torch.ops.dsv4


def region_bytes(t: int, fmt: str) -> int:
    """Fewest bytes the region must move: q, weights, positions and two table rows in; outputs out."""
    read = t * H * D * 2 + t * H * 2 + t * 8 + t * 64 * 4
    write = t * H * (D + 4) if fmt == "fp8" else t * H * (D // 2 + D // 32 + 4)
    return read + write


def plain_dsv4(fmt):
    """The plain form over our primitive ops (what the pass fuses)."""

    def fp8(q, positions, cs, weights):
        y = dsv4.rope(q, positions, cs)
        q_fp8, q_scale = dsv4.fp8_block_quant(y, D, 1e-4)
        return q_fp8, weights.float() * WEIGHT_SCALE * q_scale.squeeze(-1)

    def mxfp4(q, positions, cs, weights):
        torch._check(weights.shape[0] == q.shape[0])  # one token dim (nothing else ties them)
        packed, scale = dsv4.mxfp4_quant(dsv4.rope(q, positions, cs))
        return packed, scale, weights.float() * WEIGHT_SCALE

    return fp8 if fmt == "fp8" else mxfp4


def plain_aten(fmt):
    """The same region in pure PyTorch (the reference), for plain Inductor."""
    if fmt == "fp8":
        return lambda q, p, cs, w: reference.indexer_q_rope_fp8(q, p, cs, w, WEIGHT_SCALE)
    return lambda q, p, cs, w: reference.indexer_q_rope_mxfp4(q, p, cs, w, WEIGHT_SCALE)


def make_inputs(t, i, cs):
    g = torch.Generator(device="cuda").manual_seed(1000 * t + i)
    q = torch.randn(t, H, D, device="cuda", generator=g).bfloat16()
    pos = torch.randint(0, cs.shape[0], (t,), device="cuda", generator=g)
    w = torch.randn(t, H, device="cuda", generator=g).bfloat16()
    return q, pos, cs, w


def time_fn(fn, sets, mark_dynamic=False):
    if mark_dynamic:
        for q, pos, _, w in sets:
            for x in (q, pos, w):
                torch._dynamo.maybe_mark_dynamic(x, 0)
    return graph_time_us([lambda a=a: fn(*a) for a in sets])


def run(fmts, tokens, sweep):
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    cs = cos_sin_cache(64, 65536, 160000.0, device="cuda")
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    rows = []
    if sweep:
        for t in (1, 128, 4096, 16384):
            sets = input_sets(lambda i: make_inputs(t, i, cs), region_bytes(t, "fp8"))
            res = []
            for bh in (1, 2, 4, 8, 16, 32):
                for nw in (1, 2, 4, 8):
                    us = graph_time_us([lambda a=a: iq_kernels.indexer_q_rope_fp8(*a, WEIGHT_SCALE, False, bh, nw) for a in sets])
                    res.append((us, bh, nw))
            res.sort()
            print(f"sweep fp8 T={t}: best " + ", ".join(f"BH={b} w={w} {u:.1f}us" for u, b, w in res[:4]), flush=True)
    for fmt in fmts:
        fused_op = dsv4.indexer_q_rope_fp8 if fmt == "fp8" else dsv4.indexer_q_rope_mxfp4
        ours_static = dsv4_compile.compile(plain_dsv4(fmt), dynamic=False)
        ours_dynamic = dsv4_compile.compile(plain_dsv4(fmt))
        ind_static = torch.compile(plain_aten(fmt), fullgraph=True, dynamic=False)
        ind_dynamic = torch.compile(plain_aten(fmt), fullgraph=True)
        for t in tokens:
            nbytes = region_bytes(t, fmt)
            sets = input_sets(lambda i: make_inputs(t, i, cs), nbytes)
            row = {"fmt": fmt, "T": t, "bytes": nbytes, **ceiling_fields(ceil)}
            row["fused_op"] = time_fn(lambda *a: fused_op(*a, WEIGHT_SCALE), sets)
            row["ours_static"] = time_fn(ours_static, sets)
            row["inductor_static"] = time_fn(ind_static, sets)
            dyn_sets = input_sets(lambda i: make_inputs(t, i, cs), nbytes)
            row["ours_dynamic"] = time_fn(ours_dynamic, dyn_sets, mark_dynamic=True)
            row["inductor_dynamic"] = time_fn(ind_dynamic, dyn_sets, mark_dynamic=True)
            rows.append(row)
            print(fmt_row(row, "fmt", "MB"), flush=True)
    return ceil, rows



def run_backends(fmts, tokens):
    """The fused kernel per backend (CuTe DSL, Triton) called directly, and the plain-PyTorch region
    under plain Inductor (static token dim), side by side in one run. Without the CuTe DSL its
    column reads "n/a"."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if HAVE_CUTE:
        from dsv4_compile.kernels.cute import indexer_q as cute_kernels
    else:
        print("the CuTe DSL is not installed (pip install 'dsv4-compile[cute]'): CuTe column n/a", flush=True)

    torch._dynamo.config.cache_size_limit = 256
    cs = cos_sin_cache(64, 65536, 160000.0, device="cuda")
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    lines = [ceilings_line(ceil), "", "Each cell: GPU µs per call, TB/s (% of read BW).", "",
             "| fmt | T | MB | CuTe DSL | Triton | plain Inductor |", "|---|---|---|---|---|---|"]
    for fmt in fmts:
        name = "indexer_q_rope_" + fmt
        inductor = torch.compile(plain_aten(fmt), fullgraph=True, dynamic=False)
        for t in tokens:
            nbytes = region_bytes(t, fmt)
            sets = input_sets(lambda i: make_inputs(t, i, cs), nbytes)
            cells = [time_fn(lambda *a: getattr(cute_kernels, name)(*a, WEIGHT_SCALE, False), sets) if HAVE_CUTE
                     else None]
            cells.append(time_fn(lambda *a: getattr(iq_kernels, name)(*a, WEIGHT_SCALE, False), sets))
            cells.append(time_fn(inductor, sets))
            row = " | ".join("n/a" if us is None else
                             f"{us:.1f} µs {nbytes / (us * 1e-6) / 1e12:.2f} TB/s "
                             f"({pct_read(nbytes, us, ceil['read_tbs']):.0f}%)" for us in cells)
            lines.append(f"| {fmt} | {t} | {nbytes / 1e6:.2f} | {row} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", nargs="+", default=["fp8", "mxfp4"], choices=["fp8", "mxfp4"])
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--out", default=None, help="write the markdown table (and a .json beside it) here")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton kernel's heads-per-program / warps")
    ap.add_argument("--backends", action="store_true", help="CuTe vs Triton kernels vs plain Inductor, then exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/indexer_q.py needs a CUDA GPU")
    if args.backends:
        md = run_backends(args.fmt, args.tokens)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md + "\n")
        return
    ceil, rows = run(args.fmt, args.tokens, args.sweep)
    write_results(table(ceil, rows, "fmt", "MB"), rows, args.out)


if __name__ == "__main__":
    main()

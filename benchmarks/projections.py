"""Projection GEMMs of one V4-Flash attention layer: ``dsv4::fp8_block_gemm`` (FP8 weights as the
checkpoint stores them, activations quantized 1x128) against the bf16 GEMM of the dequantized
weight (``F.linear``, cuBLAS) and ``torch._scaled_mm`` with block-wise scales where this torch / GPU
accepts them (cuBLAS; sm_90 takes 1x128 activation and 128x128 weight scales).

Shapes (N x K, V4-Flash, TP 1): ``wq_a+wkv`` 1536 x 4096 (one fused GEMM of x), ``wq_b`` 32768 x 1024,
``indexer.wq_b`` 8192 x 1024, ``q_proj`` 40960 x 1024 (the layer runs ``wq_b`` and ``indexer.wq_b`` as this
one GEMM of ``qr``), ``wo_a`` 8 groups of 1024 x 4096 (the FP8 op's grouped form, one call;
bf16: one batched matmul, as the bf16 model's ``grouped_linear``), ``wo_b`` 4096 x 8192; and the
bf16 ``comp_proj`` 2624 x 4096 with fp32 output (``dsv4::linear_fp32`` against cuBLAS). Timing:
CUDA-graph replay, rotating over enough weight copies that every call reads its weight from DRAM;
the rate is the weight bytes (FP8 + scales, or bf16) over the time, as % of the streaming-read
bandwidth measured in the same run. At decode sizes the op runs the GEMV, the CuTe-DSL kernel
(``kernels/cute/gemm.py``, Hopper) or the Triton tiled kernel (``kernels/triton/gemm.py``); the
Triton and CuTe-DSL kernels' times, each forced, are beside it up to 64 rows. The activation quant
is timed over 32 calls per graph (one call alone would time the graph launch); ``fp8_linear`` is the
quant fused into the GEMM (compare it with the GEMM + the quant).

    python benchmarks/projections.py [--m 1 8 32 64 2048 8192] [--out results.md]
    python benchmarks/projections.py --sweep     # the Triton kernel's configs (N tile, stages, split-K) at decode sizes
    python benchmarks/projections.py --check    # CPU: the op == the reference at small shapes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv4_compile  # noqa: E402,F401
from dsv4_compile.kernels.triton import gemm as gemm_kernels  # noqa: E402

from _timing import bandwidth_ceilings, ceiling_fields, ceilings_line, graph_time_us, pct_read, write_results  # noqa: E402

dsv4 = torch.ops.dsv4
# (N, K) of the weight; wo_a's input is [M, G, K] (group g times weight rows g·N/G ...)
SHAPES = {"wq_a+wkv": (1536, 4096), "wq_b": (32768, 1024), "indexer.wq_b": (8192, 1024),
          "q_proj (wq_b+indexer.wq_b)": (40960, 1024), "wo_a (8 groups)": (8192, 4096), "wo_b": (4096, 8192)}


def _weights(N, K, device, copies):
    out = []
    for i in range(copies):
        g = torch.Generator(device=device).manual_seed(i)
        w = (torch.randn(N, K, device=device, generator=g) * 16).to(torch.float8_e4m3fn)
        s = torch.exp2(torch.randint(-8, -4, (-(-N // 128), K // 128), device=device, generator=g).float())
        out.append((w, s, (w.float() * s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)).bfloat16()))
    return out


def _scaled_mm_call(x_q, x_s, w, s):
    """``torch._scaled_mm`` with 1x128 / 128x128 scales (in the layouts cuBLAS takes), or the reason
    this build refuses them."""
    try:
        fn = lambda: gemm_kernels._scaled_mm(x_q, x_s, w, s, torch.bfloat16)  # noqa: E731
        fn()
        return fn
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        return str(e).splitlines()[0][:120]


GROUPS = {"wo_a (8 groups)": 8}


def _cute_runs(x_q, w) -> bool:
    """Whether the CuTe-DSL decode GEMM (``kernels/cute/gemm.py``) can run this call here."""
    from dsv4_compile.kernels.cute import _common

    if not _common.HAVE_CUTE:
        return False
    from dsv4_compile.kernels.cute import gemm as cute_gemm

    return cute_gemm.supports(x_q, w, torch.bfloat16)


def _activations(name, M, N, K):
    """(bf16 x as the projection sees it, its FP8 quant): ``[M, K]``, or ``[M, G, K]`` grouped."""
    g = GROUPS.get(name, 1)
    x = torch.randn(M, g, K, device="cuda").bfloat16() if g > 1 else torch.randn(M, K, device="cuda").bfloat16()
    return x, dsv4.fp8_block_quant(x, 128)


def run(ms):
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    rows = []
    for name, (N, K) in SHAPES.items():
        G = GROUPS.get(name, 1)
        copies = max(2, -(-(256 << 20) // (N * K)))
        ws = _weights(N, K, "cuda", copies)
        for M in ms:
            x, (x_q, x_s) = _activations(name, M, N, K)
            fp8_bytes = N * K + ws[0][1].numel() * 4
            row = dict(name=name, M=M, N=N, K=K, **ceiling_fields(ceil), fp8_weight_bytes=fp8_bytes,
                       bf16_weight_bytes=2 * N * K)
            row["fp8_us"] = graph_time_us([lambda w=w, s=s: dsv4.fp8_block_gemm(x_q, x_s, w, s) for w, s, _ in ws])
            # decode sizes: the op runs the GEMV, the CuTe-DSL kernel or the Triton tiled kernel; each forced beside it
            tiled = [lambda w=w, s=s: gemm_kernels.fp8_block_gemm(x_q, x_s, w, s, backend="triton") for w, s, _ in ws]
            row["tiled_us"] = graph_time_us(tiled) if M <= 64 else None
            cute = [lambda w=w, s=s: gemm_kernels.fp8_block_gemm(x_q, x_s, w, s, backend="cute") for w, s, _ in ws]
            row["cute_us"] = graph_time_us(cute) if _cute_runs(x_q, ws[0][0]) else None
            row["quant_us"] = graph_time_us([lambda: dsv4.fp8_block_quant(x, 128)] * 32)
            # the activation quant fused into the GEMM (2-D projections; the grouped wo_a takes FP8 o)
            row["linear_us"] = (graph_time_us([lambda w=w, s=s: dsv4.fp8_linear(x, w, s) for w, s, _ in ws])
                                if G == 1 else None)
            if G > 1:
                xg = x.transpose(0, 1)
                row["bf16_us"] = graph_time_us([lambda wb=wb: torch.bmm(xg, wb.view(G, N // G, K).transpose(1, 2))
                                                for _, _, wb in ws])
                row["scaled_mm_us"], row["scaled_mm_refused"] = None, "grouped: not one cuBLAS call"
            else:
                row["bf16_us"] = graph_time_us([lambda wb=wb: F.linear(x, wb) for _, _, wb in ws])
                sm = [_scaled_mm_call(x_q, x_s, w, s) for w, s, _ in ws[:1]]
                if callable(sm[0]):
                    sm = [_scaled_mm_call(x_q, x_s, w, s) for w, s, _ in ws]
                    row["scaled_mm_us"], row["scaled_mm_refused"] = graph_time_us(sm), None
                else:
                    row["scaled_mm_us"], row["scaled_mm_refused"] = None, sm[0]
            rows.append(row)
            print(fmt(row), flush=True)
        del ws
        torch.cuda.empty_cache()
    return ceil, rows


def fmt(r):
    read = r["read_tbs"]
    cells = [r["name"], f"{r['M']}", f"{r['fp8_us']:.1f} µs ({pct_read(r['fp8_weight_bytes'], r['fp8_us'], read):.0f}%)",
             f"{r['tiled_us']:.1f} µs ({pct_read(r['fp8_weight_bytes'], r['tiled_us'], read):.0f}%)"
             if r.get("tiled_us") else "—",
             f"{r['cute_us']:.1f} µs ({pct_read(r['fp8_weight_bytes'], r['cute_us'], read):.0f}%)"
             if r.get("cute_us") else "—",
             f"{r['quant_us']:.1f} µs",
             f"{r['linear_us']:.1f} µs" if r.get("linear_us") else "—",
             f"{r['bf16_us']:.1f} µs ({pct_read(r['bf16_weight_bytes'], r['bf16_us'], read):.0f}%)",
             f"{r['scaled_mm_us']:.1f} µs" if r["scaled_mm_us"] else f"refused ({r.get('scaled_mm_refused')})"]
    return "| " + " | ".join(cells) + " |"


def table(ceil, rows):
    head = ("| weight | M | fp8_block_gemm (% of read BW, FP8 weight bytes) | Triton tiled kernel (M ≤ 64) "
            "| CuTe-DSL kernel (M ≤ 64, Hopper) | act quant | fp8_linear (quant fused) "
            "| bf16 F.linear (% of read BW, bf16 bytes) | torch._scaled_mm block-wise |\n"
            + "|---" * 9 + "|")
    return f"{ceilings_line(ceil)}\n\n{head}\n" + "\n".join(fmt(r) for r in rows)


def check():
    """CPU: the op (its CPU path is the reference) against a float64 product of the dequantized
    values, within fp32 summation error; the bf16-dequantized weights the bf16 column uses match."""
    for M, (N, K) in ((3, (200, 256)), (1, (384, 512))):
        g = torch.Generator().manual_seed(M)
        x_q, x_s = dsv4.fp8_block_quant(torch.randn(M, K, generator=g), 128)
        w, s, wb = _weights(N, K, "cpu", 1)[0]
        got = dsv4.fp8_block_gemm(x_q, x_s, w, s, torch.float32).double()
        xd = x_q.double() * x_s.double().repeat_interleave(128, 1)
        wd = w.double() * s.double().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)
        want = xd @ wd.T
        assert ((got - want).abs() <= K * 2.0**-24 * (xd.abs() @ wd.abs().T) + 1e-30).all()
        assert torch.equal(wb, wd.bfloat16())
    print("all checks passed")


def sweep(ms):
    """The Triton kernel's configurations at decode sizes (``gemm_config`` keywords): per shape and M,
    the default's time and the three fastest, as % of the streaming-read bandwidth."""
    ceil = bandwidth_ceilings()
    print(ceilings_line(ceil), flush=True)
    configs = [dict(block_n=bn, stages=st, splits=sp) for bn in (64, 128) for st in (3, 4)
               for sp in (1, 2, 3, 4, 6, 8, 12, 16)]
    for name, (N, K) in SHAPES.items():
        ws = _weights(N, K, "cuda", max(2, -(-(256 << 20) // (N * K))))
        fp8_bytes = N * K + ws[0][1].numel() * 4
        for M in ms:
            _, (x_q, x_s) = _activations(name, M, N, K)
            res = []
            for cfg in [{}] + configs:
                calls = [lambda w=w, s=s: gemm_kernels.fp8_block_gemm(x_q, x_s, w, s, backend="triton", **cfg)
                         for w, s, _ in ws]
                try:
                    res.append((graph_time_us(calls), cfg))
                except Exception as e:  # noqa: BLE001 (a config the GPU cannot run: report, go on)
                    print(f"  {name} M={M} {cfg}: {type(e).__name__}: {str(e)[:80]}")
            default = res[0][0]
            best = sorted(res[1:], key=lambda r: r[0])[:3]
            cells = "; ".join(f"{t:.1f} µs ({pct_read(fp8_bytes, t, ceil['read_tbs']):.0f}%) {c}" for t, c in best)
            print(f"| {name} | {M} | default {default:.1f} µs ({pct_read(fp8_bytes, default, ceil['read_tbs']):.0f}%) "
                  f"| {cells} |", flush=True)
        del ws
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", nargs="+", type=int, default=[1, 8, 32, 64, 2048])
    ap.add_argument("--out", default=None)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/projections.py needs a CUDA GPU (or --check, which runs on CPU)")
    if args.sweep:
        sweep([m for m in args.m if m <= 64])
        return
    ceil, rows = run(args.m)
    comp = run_comp_proj(args.m, ceil)
    write_results(table(ceil, rows) + "\n\n" + comp_table(comp), rows + comp, args.out)


# comp_proj of a V4-Flash CSA layer: the indexer's weights_proj (64) + the main compressor's [wkv; wgate]
# (2·2·512) + the indexer compressor's (2·2·128) rows of bf16 weight, fp32 output
COMP_PROJ = (64 + 2048 + 512, 4096)


def run_comp_proj(ms, ceil):
    """``dsv4::linear_fp32`` (one row: the GEMV) against cuBLAS ``mm(..., out_dtype=float32)``, over
    rotating bf16 weights."""
    N, K = COMP_PROJ
    ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(max(2, -(-(256 << 20) // (2 * N * K))))]
    rows = []
    for M in ms:
        x = torch.randn(M, K, device="cuda").bfloat16()
        row = dict(name="comp_proj (bf16, fp32 out)", M=M, N=N, K=K, **ceiling_fields(ceil),
                   bf16_weight_bytes=2 * N * K)
        row["linear_fp32_us"] = graph_time_us([lambda w=w: dsv4.linear_fp32(x, w) for w in ws])
        row["mm_us"] = graph_time_us([lambda w=w: torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws])
        rows.append(row)
        print(comp_fmt(row), flush=True)
    return rows


def comp_fmt(r):
    read, b = r["read_tbs"], r["bf16_weight_bytes"]
    return (f"| {r['name']} | {r['M']} | {r['linear_fp32_us']:.1f} µs ({pct_read(b, r['linear_fp32_us'], read):.0f}%) "
            f"| {r['mm_us']:.1f} µs ({pct_read(b, r['mm_us'], read):.0f}%) |")


def comp_table(rows):
    head = ("| weight | M | dsv4::linear_fp32 (% of read BW, bf16 bytes) | cuBLAS mm, out_dtype=float32 |\n"
            "|---|---|---|---|")
    return head + "\n" + "\n".join(comp_fmt(r) for r in rows)


if __name__ == "__main__":
    main()

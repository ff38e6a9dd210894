"""Compile the plain-form indexer query (RoPE → FP8/MXFP4 quant → weight scaling) with the dsv4
passes and show that it became one fused kernel call with the same bytes as eager.

    python examples/indexer_q.py [--fmt fp8|mxfp4] [--hadamard] [--tokens 64] [--device cpu|cuda]
"""

import argparse

import torch

import dsv4_compile
from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.model import IndexerQ
from dsv4_compile.rope import layer_cos_sin_cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="fp8", choices=["fp8", "mxfp4"])
    ap.add_argument("--hadamard", action="store_true", help="reference-faithful mode (Hadamard before quant)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    cfg = DSv4AttentionConfig.tiny() if args.device == "cpu" else DSv4AttentionConfig.flash()
    layer = cfg.compress_ratios.index(4)  # a CSA layer: the indexer exists there
    model = IndexerQ(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, args.fmt,
                     args.hadamard, device=args.device)
    cos_sin = layer_cos_sin_cache(cfg, layer, max_pos=4096, device=args.device)
    t = args.tokens
    qr = torch.randn(t, cfg.q_lora_rank, device=args.device).bfloat16()
    x = torch.randn(t, cfg.hidden_size, device=args.device).bfloat16()
    positions = torch.randint(0, 4096, (t,), device=args.device)

    passes = DSV4PassManager(record=True)  # same as dsv4_compile.inductor_options(), plus snapshots
    compiled = dsv4_compile.compile(model, options={"post_grad_custom_post_pass": passes})
    out, ref = compiled(qr, x, positions, cos_sin), model(qr, x, positions, cos_sin)

    snap = passes.snapshots[-1]
    print(f"{args.fmt} indexer q, {t} tokens on {args.device}; fusions: {snap.matches}")
    print("post-grad graph after the dsv4 passes:\n  " + snap.after.replace("\n", "\n  "))
    for name, a, b in zip(("q", "scale", "weights")[: len(out) - 1] + ("weights",), out, ref):
        same = torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
        diff = "" if same else f" (max |diff| {(a.float() - b.float()).abs().max().item():.3g})"
        print(f"  {name:8s} {tuple(a.shape)} {str(a.dtype):22s} compiled == eager: {same}{diff}")


if __name__ == "__main__":
    main()

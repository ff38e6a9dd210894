"""Attention-core benchmark: ``dsv4::sparse_attn`` and ``dsv4::indexer_topk`` at decode (V4-Flash).

One decode token per request, B requests, every request at context ``ctx`` (its position is
``ctx − 1``): 64 query heads of 512, one SWA window of 128 slots and the top-512 compressed (C4)
entries, all live; the indexer scores every visible entry (``ctx // 4``) with 64 heads of 128 and
keeps the top 512. Caches are per request (block 64, pages in a random order), so nothing is shared
between the B tokens.

Timing: GPU time per call under CUDA-graph replay, rotating over input sets (different q and top-k
picks) whose touched records exceed L2. Rates count the bytes each op must move:

* ``sparse_attn``: KV records read (``(128 + 512) × 584 B`` per token: the "KV read" column, the
  target's measure), plus q, the indices and the bf16 output;
* ``indexer_topk``: the visible K records (``ctx/4 × 132 B`` per token), q, weights, the table rows and
  the int32 output.

Both are compared with the same math in plain PyTorch (``dsv4_compile.reference.attention``: the
vectorized gather + dequant, fp32 scores, softmax with the sink column / ``torch.topk``) compiled by
plain Inductor, and with the SM streaming-read bandwidth measured in the same run (every % is of it;
``_timing.bandwidth_ceilings``).

    python benchmarks/attention.py [--batches 1 8 32 64] [--contexts 8192 32768 65536] [--out results.md]
    python benchmarks/attention.py --sweep --batches 64 --contexts 65536   # sparse_attn launch configurations
    python benchmarks/attention.py --layers csa hca swa --models flash pro --batches 1 8 32 64 --contexts 65536
    python benchmarks/attention.py --layers csa --prefill 4096 --contexts 65536   # prefill TFLOPS
    python benchmarks/attention.py --check        # CPU: small shapes, ops == plain forms, then exit
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dsv4_compile  # noqa: E402,F401
from dsv4_compile import layouts  # noqa: E402
from dsv4_compile.reference import attention as ref  # noqa: E402

from _timing import (bandwidth_ceilings, ceiling_fields, ceilings_line, graph_time_us, input_sets,  # noqa: E402
                     pct_read, write_results)

dsv4 = torch.ops.dsv4
H, WINDOW, TOPK, IDX_H = 64, 128, 512, 64
BS = 64  # SWA, C4 and indexer pages
SCALE = layouts.KV_HEAD_DIM**-0.5
REC = layouts.FP8_DS_MLA_RECORD_BYTES
IDX_REC = layouts.INDEXER_FP8_RECORD_BYTES


def _random_kv_pages(pages, bs, device, g):
    """``pages`` ``fp8_ds_mla`` pages of ``bs`` slots filled with random records: any e4m3 byte but NaN,
    finite bf16 rope, UE8M0 scales near 2^0."""
    c = torch.randint(0, 126, (pages, layouts.page_bytes("fp8_ds_mla", bs)), dtype=torch.uint8, device=device,
                      generator=g)
    c[:, : bs * 576].view(pages, bs, 576)[:, :, 448:] = torch.randn(pages, bs, 64, device=device, generator=g
                                                                   ).bfloat16().view(torch.uint8).view(pages, bs, 128)
    c[:, bs * 576: bs * 576 + bs * 8] = 124 + torch.randint(0, 6, (pages, bs * 8), dtype=torch.uint8, device=device,
                                                           generator=g)
    return c


def _random_caches(b, ctx, device, g):
    """Per-request SWA, C4 and indexer K caches filled with random records (bytes written directly:
    any e4m3 byte but NaN, exponents near 127, finite bf16 rope)."""
    n_comp = ctx // 4
    swa_pages = -(-WINDOW // BS) + 1
    comp_pages = -(-n_comp // BS)

    swa = _random_kv_pages(b * swa_pages, BS, device, g)
    comp = _random_kv_pages(b * comp_pages, BS, device, g)
    idx = torch.zeros(b * comp_pages, layouts.page_bytes("fp8", BS), dtype=torch.uint8, device=device)
    k = torch.randn(b * comp_pages * BS, 128, device=device, generator=g)
    dsv4.indexer_k_insert(k, idx, torch.arange(k.shape[0], device=device), BS, "fp8")
    # the SWA table spans every position; only the pages of the last window are allocated
    swa_table = torch.full((b, (ctx - 1) // BS + 1), -1, dtype=torch.int32, device=device)
    swa_table[:, -swa_pages:] = torch.randperm(b * swa_pages, device=device, generator=g).view(b, swa_pages).int()
    comp_table = torch.randperm(b * comp_pages, device=device, generator=g).view(b, comp_pages).int()
    return swa, comp, idx, swa_table, comp_table


def make_case(b, ctx, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    swa, comp, idx, swa_table, comp_table = _random_caches(b, ctx, device, g)
    positions = torch.full((b,), ctx - 1, dtype=torch.int64, device=device)
    token_to_req = torch.arange(b, device=device)
    swa_idx, _ = dsv4.swa_indices(positions, swa_table, token_to_req, BS, WINDOW)
    sink = torch.randn(H, device=device, generator=g)

    def inputs(i):
        gi = torch.Generator(device=device).manual_seed(1000 * seed + i)
        q = (torch.randn(b, H, 512, device=device, generator=gi) * 0.3).bfloat16()
        local = torch.stack([torch.randperm(ctx // 4, device=device, generator=gi)[:TOPK] for _ in range(b)]).int()
        comp_idx, _ = dsv4.global_topk_indices(local, comp_table, token_to_req, BS)
        iq = torch.randn(b, IDX_H, 128, device=device, generator=gi).to(torch.float8_e4m3fn)
        w = torch.rand(b, IDX_H, device=device, generator=gi)
        return dict(q=q, comp_idx=comp_idx, iq=iq, w=w)

    return dict(swa=swa, comp=comp, idx=idx, comp_table=comp_table, positions=positions, token_to_req=token_to_req,
                swa_idx=swa_idx, sink=sink, inputs=inputs)


def attn_call(fn, c, s):
    return lambda: fn(s["q"], c["swa"], c["swa_idx"], c["comp"], s["comp_idx"], c["sink"], SCALE, BS, BS)


def topk_call(fn, c, s):
    return lambda: fn(s["iq"], None, s["w"], c["idx"], c["comp_table"], c["token_to_req"], c["positions"], BS, "fp8",
                      TOPK, 4)


def attn_bytes(b):
    kv = b * (WINDOW + TOPK) * REC
    return kv, kv + b * H * 512 * 2 * 2 + b * (WINDOW + TOPK) * 4


def topk_bytes(b, ctx):
    n = ctx // 4
    return b * n * IDX_REC + b * IDX_H * (128 + 4) + b * (-(-n // BS)) * 4 + b * TOPK * 4


def _sets(case_fn, per_set_bytes):
    return input_sets(case_fn, per_set_bytes, min_total=160 << 20, max_sets=16)


def run(batches, contexts, plain=True):
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    plain_attn = torch.compile(ref.sparse_attn, fullgraph=True, dynamic=True)
    plain_topk = torch.compile(ref.indexer_topk, fullgraph=True, dynamic=True)
    torch._dynamo.config.cache_size_limit = 256
    rows = []
    for ctx in contexts:
        for b in batches:
            c = make_case(b, ctx, "cuda")
            kv, total = attn_bytes(b)
            sets = _sets(c["inputs"], kv)
            row = dict(B=b, ctx=ctx, **ceiling_fields(ceil), attn_kv_bytes=kv, attn_bytes=total,
                       topk_bytes=topk_bytes(b, ctx))
            row["attn_us"] = graph_time_us([attn_call(dsv4.sparse_attn, c, s) for s in sets])
            row["topk_us"] = graph_time_us([topk_call(dsv4.indexer_topk, c, s) for s in sets])
            if plain:
                row["attn_plain_us"] = graph_time_us([attn_call(plain_attn, c, s) for s in sets[:4]], reps=5)
                row["topk_plain_us"] = graph_time_us([topk_call(plain_topk, c, s) for s in sets[:2]], reps=5)
            rows.append(row)
            print(fmt(row), flush=True)
            del c, sets
            torch.cuda.empty_cache()
    return ceil, rows


def _rate(nbytes, us, read_tbs):
    """TB/s and % of the streaming-read ceiling."""
    return f"{nbytes / (us * 1e-6) / 1e12:5.2f} TB/s ({pct_read(nbytes, us, read_tbs):3.0f}%)"


def fmt(r):
    cells = [f"{r['B']}", f"{r['ctx'] // 1024}k",
             f"{r['attn_us']:.1f} µs", _rate(r["attn_kv_bytes"], r["attn_us"], r["read_tbs"]),
             _rate(r["attn_bytes"], r["attn_us"], r["read_tbs"])]
    cells.append(f"{r['attn_plain_us']:.1f} µs ({r['attn_plain_us'] / r['attn_us']:.1f}×)" if "attn_plain_us" in r
                 else "-")
    cells += [f"{r['topk_us']:.1f} µs", _rate(r["topk_bytes"], r["topk_us"], r["read_tbs"])]
    cells.append(f"{r['topk_plain_us']:.1f} µs ({r['topk_plain_us'] / r['topk_us']:.1f}×)" if "topk_plain_us" in r
                 else "-")
    return "| " + " | ".join(cells) + " |"


def table(ceil, rows):
    head = ("| B | ctx | sparse_attn | KV read (% of read BW) | all bytes (% of read BW) | plain Inductor "
            "| indexer_topk | bytes (% of read BW) | plain Inductor |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return f"{ceilings_line(ceil)}\n\n{head}\n" + "\n".join(fmt(r) for r in rows)


def sweep(b: int, ctx: int):
    """sparse_attn launch configurations (heads per program, candidates per tile, warps, splits)."""
    from dsv4_compile.kernels.triton import attention as kernels

    read = bandwidth_ceilings()["read_tbs"]
    c = make_case(b, ctx, "cuda")
    kv, _ = attn_bytes(b)
    sets = _sets(c["inputs"], kv)
    print(f"streaming read {read:.2f} TB/s; B={b} ctx={ctx}")
    default = kernels.launch_config(b, H, WINDOW + TOPK, torch.device("cuda"))
    us = graph_time_us([attn_call(kernels.sparse_attn, c, s) for s in sets])
    print(f"default BH={default[0]} BN={default[1]} warps={default[3]} splits={default[4]}: {us:7.1f} µs "
          f"{_rate(kv, us, read)}", flush=True)
    for bh, warps in ((16, 4), (32, 8), (64, 8)):
        for bn in (16, 32, 64) if bh < 64 else (32, 64):
            for splits in {16: (None, 4, 8, 16), 32: (None,), 64: (None, 2, 4)}[bh]:
                fn = lambda *a, **k: kernels.sparse_attn(*a, block_h=bh, block_n=bn, num_warps=warps,  # noqa: E731
                                                         splits=splits, **k)
                try:
                    us = graph_time_us([attn_call(fn, c, s) for s in sets])
                except Exception as e:  # a config the compiler rejects (shared memory)
                    print(f"BH={bh} BN={bn} warps={warps} splits={splits}: {type(e).__name__}")
                    continue
                print(f"BH={bh:3d} BN={bn:3d} warps={warps} splits={splits}: {us:7.1f} µs "
                      f"{_rate(kv, us, read)}", flush=True)


# --- sparse_attn by layer type and model, decode and prefill -----------------------------------------
MODELS = {"flash": (64, 512), "pro": (128, 1024)}  # V4-Flash / V4-Pro: query heads, compressed top-k
COMP = {"csa": (4, layouts.C4_BLOCK_SIZE), "hca": (128, layouts.C128_BLOCK_SIZE)}  # ratio, entries per page


def layer_case(layer, model, b, ctx, device, prefill_t=0, seed=0):
    """``sparse_attn`` inputs of one layer type (``csa``: the window + the top-k of the C4 entries;
    ``hca``: the window + every visible C128 entry; ``swa``: the window alone) for ``b`` decode tokens
    (one per request, position ``ctx − 1``) or, with ``prefill_t``, one request's last ``prefill_t``
    positions (causal: each token's own window and visible entries). Each input set has its own q,
    picks and cache pages (one pool), so a pass over the sets reads distinct records."""
    heads, topk = MODELS[model]
    reqs, T = (1, prefill_t) if prefill_t else (b, b)
    positions = (torch.arange(ctx - T, ctx, device=device) if prefill_t
                 else torch.full((b,), ctx - 1, dtype=torch.int64, device=device))
    token_to_req = torch.zeros(T, dtype=torch.int64, device=device) if prefill_t else torch.arange(b, device=device)
    swa_pages = -(-(WINDOW + T) // BS) + 1  # the pages the tokens' windows touch (per request)
    ratio, cbs = COMP.get(layer, (1, 1))
    n_comp = ctx // ratio if layer != "swa" else 0
    comp_pages = -(-n_comp // cbs)
    vis = ((positions + 1) // ratio).clamp(max=n_comp) if n_comp else None
    g = torch.Generator(device=device).manual_seed(seed)
    live = int(torch.clamp(positions + 1, max=WINDOW).sum())
    if n_comp:
        live += int(vis.clamp(max=topk).sum()) if layer == "csa" else int(vis.sum())
    kv_bytes = live * REC
    n_sets = max(1, min(16, -(-(160 << 20) // max(kv_bytes, 1))))

    swa = _random_kv_pages(n_sets * reqs * swa_pages, BS, device, g)
    comp = _random_kv_pages(n_sets * reqs * comp_pages, cbs, device, g) if n_comp else None
    sink = torch.randn(heads, device=device, generator=g)
    sets = []
    for i in range(n_sets):
        table = torch.full((reqs, (ctx - 1) // BS + 1), -1, dtype=torch.int32, device=device)
        table[:, -swa_pages:] = (i * reqs * swa_pages + torch.arange(reqs * swa_pages, device=device)
                                 ).view(reqs, swa_pages).int()
        swa_idx, _ = dsv4.swa_indices(positions, table, token_to_req, BS, WINDOW)
        q = (torch.randn(T, heads, 512, device=device, generator=g) * 0.3).bfloat16()
        comp_idx = None
        if n_comp:
            ctable = (i * reqs * comp_pages + torch.randperm(reqs * comp_pages, device=device, generator=g)
                      ).view(reqs, comp_pages).int()
            entries = torch.arange(n_comp, device=device).expand(T, n_comp)
            if layer == "csa":  # top-k of random scores among each token's visible entries (−1 past them)
                score = torch.rand(T, n_comp, device=device, generator=g).masked_fill(entries >= vis[:, None], -1)
                val, local = score.topk(min(topk, n_comp), dim=1)
                local = torch.where(val >= 0, local, -1)
            else:  # every visible entry
                local = torch.where(entries < vis[:, None], entries, -1)
            comp_idx, _ = dsv4.global_topk_indices(local.int(), ctable, token_to_req, cbs)
        sets.append(dict(q=q, swa_idx=swa_idx, comp_idx=comp_idx))
    return dict(swa=swa, comp=comp, cbs=cbs, sink=sink, sets=sets, T=T, heads=heads, kv_bytes=kv_bytes,
                flop=4 * heads * 512 * live)


def layer_call(fn, c, s):
    return lambda: fn(s["q"], c["swa"], s["swa_idx"], c["comp"], s["comp_idx"], c["sink"], SCALE, BS, c["cbs"])


def layer_rows(cases):
    """GPU µs of ``sparse_attn`` per (layer, model, B, ctx, prefill T) case."""
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    rows = []
    for layer, model, b, ctx, prefill_t in cases:
        c = layer_case(layer, model, b, ctx, "cuda", prefill_t=prefill_t)
        row = dict(layer=layer, model=model, B=b, T=c["T"], ctx=ctx, prefill=bool(prefill_t), heads=c["heads"],
                   **ceiling_fields(ceil), kv_bytes=c["kv_bytes"], flop=c["flop"])
        row["attn_us"] = graph_time_us([layer_call(dsv4.sparse_attn, c, s) for s in c["sets"]],
                                       reps=10 if prefill_t else 20)
        rows.append(row)
        print(layer_fmt(row), flush=True)
        del c
        torch.cuda.empty_cache()
    return ceil, rows


def layer_fmt(r):
    return "| " + " | ".join([
        r["layer"].upper(), f"V4-{r['model'].capitalize()} ({r['heads']} heads)",
        f"{r['T']}" + (" (prefill)" if r["prefill"] else ""), f"{r['ctx'] // 1024}k", f"{r['attn_us']:.1f} µs",
        _rate(r["kv_bytes"], r["attn_us"], r["read_tbs"]), f"{r['flop'] / (r['attn_us'] * 1e-6) / 1e12:.1f}"]) + " |"


def layer_table(ceil, rows):
    head = ("| layer | model | tokens | ctx | sparse_attn | KV read (% of read BW) | TFLOPS (4·H·512 per live "
            "candidate) |\n|---|---|---|---|---|---|---|")
    return f"{ceilings_line(ceil)}\n\n{head}\n" + "\n".join(layer_fmt(r) for r in rows)


# --- indexer_topk: logits and selection apart, context / max_model_len sweeps, prefill ---------------
IDX_REC_BYTES = {"fp8": layouts.INDEXER_FP8_RECORD_BYTES, "mxfp4": 64 + 4}


def indexer_case(b, ctx, mml, fmt, device, per_set_bytes_min=160 << 20, prefill_t=0, seed=0):
    """B decode tokens (one per request, position ``ctx − 1``) or, with ``prefill_t``, one request's
    last ``prefill_t`` positions up to ``ctx − 1``; block tables ``mml / 4 / 64`` pages wide (−1
    past the live pages). Enough input sets (q, weights and a table over distinct pages of one pool)
    that one pass over them reads more than L2 holds."""
    n = ctx // 4
    pages = -(-n // BS)
    width = max(pages, -(-(mml // 4) // BS))
    reqs = 1 if prefill_t else b
    T = prefill_t or b
    n_sets = max(1, min(8, -(-per_set_bytes_min // (reqs * n * IDX_REC_BYTES[fmt]))))
    pool = n_sets * reqs * pages
    g = torch.Generator(device=device).manual_seed(seed)
    cache = torch.empty(pool, layouts.page_bytes(fmt, BS), dtype=torch.uint8, device=device)
    for p0 in range(0, pool, 4096):  # random keys, inserted in pieces (bf16 staging stays small)
        p1 = min(pool, p0 + 4096)
        k = torch.randn((p1 - p0) * BS, 128, device=device, generator=g).bfloat16()
        dsv4.indexer_k_insert(k, cache, torch.arange(p0 * BS, p1 * BS, device=device), BS, fmt)
    perm = torch.randperm(pool, device=device, generator=g).int()
    if prefill_t:
        positions = torch.arange(ctx - prefill_t, ctx, device=device)
        token_to_req = torch.zeros(T, dtype=torch.int64, device=device)
    else:
        positions = torch.full((b,), ctx - 1, dtype=torch.int64, device=device)
        token_to_req = torch.arange(b, device=device)
    sets = []
    for i in range(n_sets):
        table = torch.full((reqs, width), -1, dtype=torch.int32, device=device)
        table[:, :pages] = perm[i * reqs * pages:(i + 1) * reqs * pages].view(reqs, pages)
        x = torch.randn(T, IDX_H, 128, device=device, generator=g)
        q, qs = (x.to(torch.float8_e4m3fn), None) if fmt == "fp8" else dsv4.mxfp4_quant(x)
        w = torch.rand(T, IDX_H, device=device, generator=g)
        sets.append(dict(q=q, qs=qs, w=w, table=table))
    return dict(cache=cache, positions=positions, token_to_req=token_to_req, sets=sets, fmt=fmt, T=T,
                L=width * BS, reqs=reqs)


def indexer_rows(cases, split=True, topk=TOPK, **config):
    """GPU µs of the op, and (``split``) of its logits kernel and its selection alone."""
    ceil = bandwidth_ceilings()
    print(f"torch {torch.__version__}; " + ceilings_line(ceil), flush=True)
    rows = []
    for b, ctx, mml, fmt, prefill_t in cases:
        c = indexer_case(b, ctx, mml, fmt, "cuda", prefill_t=prefill_t)
        T, L = c["T"], c["L"]
        call = lambda s: lambda: dsv4.indexer_topk(s["q"], s["qs"], s["w"], c["cache"], s["table"],  # noqa: E731
                                                   c["token_to_req"], c["positions"], BS, fmt, topk, 4)
        # visible entries read: decode n per token; prefill Σ over the chunk's causal lengths
        vis = int(((c["positions"] + 1) // 4).clamp(max=L).sum())
        kbytes = vis * IDX_REC_BYTES[fmt]
        row = dict(B=b, T=T, ctx=ctx, mml=mml, fmt=fmt, prefill=bool(prefill_t), **ceiling_fields(ceil),
                   k_bytes=kbytes, visible=vis)
        row["op_us"] = graph_time_us([call(s) for s in c["sets"]], reps=10 if prefill_t else 20)
        if split:
            from dsv4_compile.kernels.triton import attention as kernels
            from dsv4_compile.kernels.triton import topk as topk_kernels

            lconf = {k: v for k, v in config.items() if k not in ("chunk", "max_chunk")}
            # one logits buffer per input set (up to 4 GiB of them): a graph of only two calls was
            # mostly its own launch at small B (B = 1: 9.4 µs for a 3.4 µs logits kernel)
            n_bufs = max(2, min(len(c["sets"]), (4 << 30) // max(T * L * 4, 1)))
            bufs = [torch.empty(T, L, device="cuda") for _ in c["sets"][:n_bufs]]
            # the kernel the op runs (CuTe on Hopper for FP8), and the Triton kernel beside it (with a
            # Triton configuration from the command line both columns time the Triton kernel)
            for key, fn in (("logits_us", kernels.op_logits_into), ("logits_triton_us", kernels.indexer_logits_into)):
                lcall = lambda s, buf, fn=fn: lambda: fn(  # noqa: E731
                    buf, s["q"], s["qs"], s["w"], c["cache"], s["table"], c["token_to_req"], c["positions"], BS, fmt,
                    4, **lconf)
                row[key] = graph_time_us([lcall(s, buf) for s, buf in zip(c["sets"], bufs)])
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            scall = lambda buf: lambda: topk_kernels.select_topk(buf, c["positions"], c["token_to_req"],  # noqa: E731
                                                                 c["reqs"], 4, topk, sms, chunk=config.get("chunk"),
                                                                 max_chunk=config.get("max_chunk", topk_kernels.MAX_CHUNK))
            row["select_us"] = graph_time_us([scall(buf) for buf in bufs])
        rows.append(row)
        print(indexer_fmt(row), flush=True)
        del c
        torch.cuda.empty_cache()
    return ceil, rows


def indexer_fmt(r):
    cells = [f"{r['T']}" + (" (prefill)" if r["prefill"] else ""), f"{r['ctx'] // 1024}k", f"{r['mml'] // 1024}k",
             r["fmt"], f"{r['op_us']:.1f} µs"]
    if "logits_us" in r:
        cells += [f"{r['logits_us']:.1f} µs", _rate(r["k_bytes"], r["logits_us"], r["read_tbs"]),
                  f"{r['logits_triton_us']:.1f} µs", f"{r['select_us']:.1f} µs"]
    else:
        cells += ["-", "-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


def indexer_table(ceil, rows):
    head = ("| tokens | ctx | max_model_len | fmt | indexer_topk | logits kernel | K bytes (% of read BW) "
            "| Triton logits kernel | selection |\n|---|---|---|---|---|---|---|---|---|")
    return f"{ceilings_line(ceil)}\n\n{head}\n" + "\n".join(indexer_fmt(r) for r in rows)


def check():
    """CPU: the ops equal the plain forms at small shapes, and the plain forms compile fullgraph."""
    c = make_case(3, 4096, "cpu")
    s = c["inputs"](0)
    got = attn_call(dsv4.sparse_attn, c, s)()
    want = attn_call(torch.compile(ref.sparse_attn, fullgraph=True), c, s)()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    sel = topk_call(dsv4.indexer_topk, c, s)()
    sel2 = topk_call(torch.compile(ref.indexer_topk, fullgraph=True), c, s)()
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(sel, sel2))
    plain = torch.compile(ref.sparse_attn, fullgraph=True, dynamic=True)
    for layer, model, b, t in (("csa", "flash", 2, 0), ("hca", "pro", 2, 0), ("swa", "flash", 1, 0),
                               ("csa", "pro", 1, 6)):
        c = layer_case(layer, model, b, 2048 if layer != "hca" else 4096, "cpu", prefill_t=t)
        s = c["sets"][0]
        assert s["q"].shape[1] == MODELS[model][0] and (s["comp_idx"] is None) == (layer == "swa")
        torch.testing.assert_close(layer_call(dsv4.sparse_attn, c, s)().float(), layer_call(plain, c, s)().float(),
                                   rtol=1e-2, atol=1e-2)
    print("all checks passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 65536])
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-Inductor columns")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--indexer", action="store_true",
                    help="indexer_topk only: op, logits kernel and selection apart, over --batches x --contexts x "
                         "--mml x --fmts (max_model_len below the context is skipped)")
    ap.add_argument("--mml", nargs="+", type=int, default=None, help="max_model_len values (default: each context)")
    ap.add_argument("--fmts", nargs="+", default=["fp8"])
    ap.add_argument("--prefill", nargs="+", type=int, default=[], help="--indexer / --layers: prefill chunks of "
                    "T tokens of one request at each context (instead of decode batches)")
    ap.add_argument("--op-only", action="store_true", help="--indexer: the op alone (older trees)")
    ap.add_argument("--chunk", type=int, default=None, help="--indexer: selection chunk (first round)")
    ap.add_argument("--max-chunk", type=int, default=None, help="--indexer: largest selection chunk (later rounds)")
    ap.add_argument("--logits-programs", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--layers", nargs="+", choices=["csa", "hca", "swa"], default=None,
                    help="sparse_attn alone per layer type (x --models x --batches x --contexts, or --prefill T "
                         "tokens of one request), KV bandwidth and TFLOPS")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["flash"])
    ap.add_argument("--select-variant", choices=["cute", "registers", "looped"], default=None,
                    help="--indexer: the selection kernel variant (sets DSV4_TOPK_SELECT for the op too)")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (or --check, which runs on CPU)")
    if args.select_variant:
        os.environ["DSV4_TOPK_SELECT"] = args.select_variant
    if args.layers:
        cases = [(layer, model, b, ctx, t) for model in args.models for layer in args.layers for ctx in args.contexts
                 for b, t in ([(1, t) for t in args.prefill] if args.prefill else [(b, 0) for b in args.batches])]
        ceil, rows = layer_rows(cases)
        write_results(layer_table(ceil, rows), rows, args.out)
        return
    if args.indexer:
        cases = [(b, ctx, mml, fmt, t) for fmt in args.fmts for ctx in args.contexts
                 for mml in (args.mml or [ctx]) if mml >= ctx
                 for b, t in ([(1, t) for t in args.prefill] if args.prefill else [(b, 0) for b in args.batches])]
        config = {k: v for k, v in dict(chunk=args.chunk, max_chunk=args.max_chunk, programs=args.logits_programs,
                                        block_n=args.block_n).items() if v is not None}
        ceil, rows = indexer_rows(cases, split=not args.op_only, **config)
        write_results(indexer_table(ceil, rows), rows, args.out)
        return
    if args.sweep:
        for b in args.batches:
            sweep(b, args.contexts[-1])
        return
    ceil, rows = run(args.batches, args.contexts, plain=not args.no_plain)
    write_results(table(ceil, rows), rows, args.out)


if __name__ == "__main__":
    main()

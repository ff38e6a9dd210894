"""``DeepseekV4Attention`` through the paged runtime (eager and compiled) against the dense reference.

Each request's tokens are fed step by step (one prefill, a prefill in two chunks, two requests of
different lengths sharing steps, then one-token decode steps), and every produced row is compared
with row p of ``reference.layer.dense_attention`` on that request's whole sequence (row p of the
dense output only depends on tokens 0..p).

Indexer-score ties: with the tiny config's 4 indexer heads an entry whose dot product is negative
for every head scores exactly 0, so some rows' k-th and (k+1)-th largest scores tie and several
top-k sets are valid (which one ``torch.topk`` returns is unspecified; a different pick moved one
row's output by 20% of the output scale). On such rows (scores within ``TIE_RTOL``) the layer must
pick *a* valid set — checked on its captured indices in eager mode — and its output must match the
dense output under that set (eager) or under the closest valid resolution (compiled, enumerated).
Every other row must select exactly the dense top-k set and is compared one to one.

Errors observed (CPU, torch 2.13+cpu; max |y - ref| / max |ref| and ||y - ref|| / ||ref|| per
request, against the tolerances RTOL = 2e-2 and RMS_RTOL = 2e-3):
  eager SWA and HCA: 0 (bit-exact); eager CSA (fp8): ≤ 1.6e-3 / 1e-4; CSA mxfp4 + Hadamard, bf16
  o-proj: ≤ 1.7e-3 / 2.2e-4; compiled CSA: ≤ 1.6e-3 / 3.7e-4; compiled HCA: ≤ 2.7e-3 / 2.5e-4
  (bf16 rounding flips from GEMMs over another number of rows and other summation orders).
The wrong references of ``test_comparison_detects_wrong_layers`` give (max / rms): sink + 0.1:
≥ 4.2e-2 / 2.0e-2; sink + 1: ≥ 0.28 / 0.10; no compressed entries: ≥ 0.30 / 0.13; compressor ape
x 1.1: CSA 2.0e-2 / 2.9e-2, HCA 1.5e-2 / 8.5e-3; reversed indexer ranking: 0.48 / 0.56.

GPU (``cuda`` marker): the layer runs on CUDA (Triton kernels, cuBLAS GEMMs, the compiled step
through Inductor) on inputs drawn on the CPU and copied there; the dense reference runs on a CPU
copy of the layer (``copy.deepcopy(layer).cpu()``, same parameters and RoPE table bit for bit), and
every output and captured top-k row is copied to the CPU before it is compared. Same checks, same
``RTOL`` and ``TIE_RTOL`` (the Triton indexer logits agree to ~1e-5 relative), but ``GPU_RMS_RTOL``
(see there: the kernel's bf16 probabilities, amplified by the FP8 quantization of the output).
Emulated on the CPU (those Triton kernels under the interpreter, with ``conftest``'s round-to-nearest
casts, in place of the reference ops): eager SWA / CSA / HCA ≤ 1.1e-2 / 8.8e-3 (max / rms), with a
bf16 o-proj ≤ 6.2e-3 / 3.7e-3 — not measured on a GPU, where the GEMMs add the CPU-sized
≲ 4e-4 rms of other summation orders.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from dsv4_compile.config import DSv4AttentionConfig
from dsv4_compile.model.attention import DeepseekV4Attention
from dsv4_compile.reference.layer import dense_attention, output_projection, sink_attention
from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

CFG = DSv4AttentionConfig.tiny()
SWA, CSA, HCA = 0, 1, 2  # tiny layer indices by compress ratio 0, 4, 128
RTOL = 2e-2  # per row, of the request's output scale max |ref|
RMS_RTOL = 2e-3  # ||y - ref|| / ||ref|| over the request: catches small systematic errors
# Indexer scores this close (relative to the row's largest |score|) count as tied: one bf16 / e4m3
# rounding flip in q or k (a GEMM summed in another order, a fused norm) moves a score by ~1e-3.
TIE_RTOL = 1e-3
D = 10  # decode steps
DEV = "cuda"
# ||y - ref|| / ||ref|| bound on CUDA. The sparse-attention kernel rounds the probabilities to bf16
# before P·V (flash style; the denominator sums fp32 P): per probability a relative error |δ| ≤ 2^-8
# (half a bf16 ulp at mantissa 1), RMS ≈ 1.7e-3 over spread mantissas. The values are not coherent,
# so o = Σ P_j v_j / l and its error Σ δ_j P_j v_j / l both grow as sqrt(Σ P_j²): o moves by ≈ 1.7e-3
# of its RMS however many candidates it has (no averaging down). The FP8 (e4m3, 128-block)
# quantization of o before wo_a amplifies that: a shift |e| below a step Δ flips a rounding with
# probability |e| / Δ, by Δ, so the two quantized o differ by RMS sqrt(Δ·|e|); with Δ ≈ 2^-3.5 |o|
# (2^-4 .. 2^-3) and E|e| ≈ 0.8 · 1.7e-3 |o| that is ≈ 1e-2, which wo_a / wo_b (dense random
# weights) carry through unchanged. The bound is twice that estimate (below sqrt(2^-3 · 2^-8) ≈
# 2.2e-2, every factor at its worst) and 5x under the gross wrong references (sink + 1: 0.10, no
# compressed entries: 0.13). Per row, RTOL stays: one row's worst error is ~1e-2 of the scale.
GPU_RMS_RTOL = 2e-2


def make_layer(idx: int, device=None, **kw) -> DeepseekV4Attention:
    torch.manual_seed(1000 + idx)
    return DeepseekV4Attention(CFG, idx, max_model_len=512, device=device, **kw)


def make_runtime(layer: DeepseekV4Attention, indexer_fmt: str = "fp8", device=None):
    """The layer's caches and metadata builder on ``device`` (default: the CPU)."""
    mgr = KVCacheManager(CFG, [layer.layer_idx], CacheConfig(max_num_seqs=4, max_model_len=512,
                                                             max_num_batched_tokens=256, token_budget=4096,
                                                             indexer_fmt=indexer_fmt), device=device)
    return mgr, StepMetadataBuilder(mgr, device)


def schedule(name: str, p: int) -> list:
    """Steps ``[(req_id, n_new), ...]`` of a scenario whose first request gets a ``p``-token prompt."""
    decode = [[("a", 1)]] * D
    if name == "prefill":
        return [[("a", p)]] + decode
    if name == "chunked":  # the chunk boundary splits a C4 window and a C128 window
        return [[("a", 70)], [("a", p - 70)]] + decode
    if name == "two_requests":  # b's prompt straddles steps and (HCA) the first 128-window
        return ([[("a", p - 60), ("b", 70)], [("b", 61), ("a", 60)]]
                + [[("a", 1), ("b", 1)] if i % 2 else [("b", 1), ("a", 1)] for i in range(D)] + [[("b", 1)]])
    raise ValueError(name)


def run(step_fn, builder, steps, seed: int = 0, capture=None, device=None):
    """Runs ``steps`` through ``step_fn(x, meta)``; returns per request ``(x [S, hidden], y [S, hidden])``
    and, with ``capture`` (a list a forward hook appends the indexer's top-k rows to), per request the
    top-k row of every position. The inputs are drawn on the CPU and each step's ``x`` is copied to
    the builder's device (``device``, when given, must be of its type); everything returned is on the CPU."""
    if device is not None:
        assert torch.device(device).type == builder.device.type, f"the metadata is on {builder.device}, not {device}"
    g = torch.Generator().manual_seed(seed)  # a CPU generator: the same inputs on every device
    total: dict = {}
    for step in steps:
        for rid, n in step:
            total[rid] = total.get(rid, 0) + n
    xs = {rid: torch.randn(n, CFG.hidden_size, generator=g).to(torch.bfloat16) for rid, n in total.items()}
    ys = {rid: [] for rid in total}
    sel = {rid: [] for rid in total}
    done = dict.fromkeys(total, 0)
    for step in steps:
        for rid, _ in step:
            if rid not in builder.manager.requests:
                builder.manager.add_request(rid)
        x = torch.cat([xs[rid][done[rid] : done[rid] + n] for rid, n in step])
        if capture is not None:
            capture.clear()
        y = step_fn(x.to(builder.device), builder.build(step))
        t = 0
        for rid, n in step:
            ys[rid].append(y[t : t + n].cpu())  # copied off the GPU now (no-op on the CPU)
            if capture is not None:
                sel[rid].append(capture[0][t : t + n].cpu())
            done[rid] += n
            t += n
    out = {rid: (xs[rid], torch.cat(ys[rid])) for rid in total}
    return out, ({rid: torch.cat(v) for rid, v in sel.items()} if capture is not None else None)


def tied_rows(scores: torch.Tensor, topk: int) -> dict:
    """Rows whose top-``topk`` set is ambiguous: ``{p: (sure [n] bool, tied entry ids, m)}`` where
    ``sure`` are the entries above the k-th score and ``m`` entries of ``tied`` complete the set."""
    out = {}
    for p in range(scores.shape[0]):
        s = scores[p]
        vis = torch.isfinite(s)
        if int(vis.sum()) <= topk:
            continue
        vals = s[vis].sort(descending=True).values
        delta = TIE_RTOL * float(vals.abs().max())
        kth = float(vals[topk - 1])
        if float(vals[topk]) < kth - delta:
            continue
        sure = vis & (s > kth + delta)
        tied = torch.nonzero(vis & ((s - kth).abs() <= delta)).flatten().tolist()
        out[p] = (sure, tied, topk - int(sure.sum()))
    return out


def check_selection(aux: dict, topk_rows: torch.Tensor, ties: dict, topk: int) -> torch.Tensor:
    """The layer's captured top-k rows (local indices, −1 padding) select exactly the dense top-k set,
    or, on a tied row, a valid one. Returns the layer's selection as a mask ``[S, n]``."""
    want = aux["comp_mask"]
    s, n = want.shape
    idx = topk_rows.to(torch.int64)
    assert bool((idx < n).all()), "the layer selected an entry that is not closed yet"
    got = torch.zeros(s, n + 1, dtype=torch.bool).scatter_(1, torch.where(idx >= 0, idx, n), True)[:, :n]
    for p in range(s):
        if p in ties:
            sure, tied, _ = ties[p]
            allowed = sure.clone()
            allowed[tied] = True
            ok = bool(got[p][sure].all()) and not bool((got[p] & ~allowed).any()) and int(got[p].sum()) == topk
            assert ok, f"row {p}: {torch.nonzero(got[p]).flatten().tolist()} is not a top-{topk} set"
        else:
            assert torch.equal(got[p], want[p]), (f"row {p}: layer selected {torch.nonzero(got[p]).flatten().tolist()}, "
                                                  f"dense {torch.nonzero(want[p]).flatten().tolist()}")
    return got


def dense_with_selection(layer, aux: dict, rows: list, comp_rows: torch.Tensor) -> torch.Tensor:
    """Dense output rows ``rows`` (positions, repeats allowed) attending to the compressed entries
    ``comp_rows [len(rows), n]`` instead of the dense top-k, from ``dense_attention``'s ``aux``."""
    mask = torch.cat((aux["swa_mask"][rows], comp_rows), dim=1)
    o = sink_attention(aux["q"][rows], aux["keys"], mask, layer.attn_sink, layer.softmax_scale)
    return output_projection(layer, o, torch.tensor(rows))


def closest_tie_resolution(layer, y_row: torch.Tensor, aux: dict, p: int, tie) -> torch.Tensor:
    """Dense output row ``p`` under the valid resolution of a tied top-k that is closest to ``y_row``."""
    sure, tied, m = tie
    combos = list(itertools.combinations(tied, m))
    assert len(combos) <= 256, f"row {p}: {len(tied)} tied entries for {m} places"
    comp_rows = sure.expand(len(combos), -1).clone()
    for c, combo in enumerate(combos):
        comp_rows[c, list(combo)] = True
    alts = dense_with_selection(layer, aux, [p] * len(combos), comp_rows)
    return alts[(alts.float() - y_row.float()).abs().amax(dim=1).argmin()]


def compare(layer, x: torch.Tensor, y: torch.Tensor, topk_rows=None, min_selecting_rows: int = 0,
            rms_rtol: float = RMS_RTOL) -> tuple:
    """Asserts ``y`` matches the dense reference (module doc) of ``layer`` (on the CPU): every row
    within ``RTOL`` of the output scale and the whole within ``rms_rtol`` (relative Frobenius norm).
    Returns both relative errors."""
    assert layer.wq_a.weight.device.type == "cpu", "compare takes the CPU copy of the layer"
    x, y = x.cpu(), y.cpu()
    topk_rows = topk_rows.cpu() if topk_rows is not None else None
    s = x.shape[0]
    aux: dict = {}
    ref = dense_attention(layer, x, torch.arange(s), aux)
    if layer.compress_ratio == 4:
        k = layer.indexer.topk
        n_vis = (torch.arange(s) + 1) // 4
        assert int((n_vis > k).sum()) >= min_selecting_rows, "the sequence is too short for top-k to select"
        ties = tied_rows(aux["index_scores"], k)
        assert len(ties) <= s // 5, f"{len(ties)} tied rows: the scores are degenerate"
        if topk_rows is not None:
            got = check_selection(aux, topk_rows, ties, k)
            if ties:
                ref = dense_with_selection(layer, aux, list(range(s)), got)
        else:
            ref = ref.clone()
            for p, tie in ties.items():
                ref[p] = closest_tie_resolution(layer, y[p], aux, p, tie)
    if layer.compress_ratio == 128:
        assert s >= 128, "the sequence is too short for a compressed entry"
    diff, ref = y.float() - ref.float(), ref.float()
    scale = ref.abs().max()
    row_err = diff.abs().amax(dim=1)
    worst = float(row_err.max() / scale)
    rms = float(diff.norm() / ref.norm())
    bad = torch.nonzero(row_err > RTOL * scale).flatten().tolist()
    assert not bad, f"rows {bad[:10]} differ from the dense reference: max error {worst:.3g} of the output scale"
    assert rms <= rms_rtol, f"the outputs differ from the dense reference: relative RMS error {rms:.3g}"
    return worst, rms


# --- eager --------------------------------------------------------------------------------------
PROMPT = {SWA: 150, CSA: 150, HCA: 200}


@pytest.mark.parametrize("name", ["prefill", "chunked", "two_requests"])
@pytest.mark.parametrize("idx", [SWA, CSA, HCA], ids=["swa", "csa", "hca"])
def test_eager_layer_matches_dense_reference(idx, name):
    layer = make_layer(idx)
    mgr, builder = make_runtime(layer)
    capture = []
    if layer.indexer is not None:
        layer.indexer.register_forward_hook(lambda mod, args, out: capture.append(out))
    outs, sel = run(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, schedule(name, PROMPT[idx]),
                    seed=idx, capture=capture if layer.indexer is not None else None)
    for rid, (x, y) in outs.items():
        compare(layer, x, y, sel[rid] if sel else None, min_selecting_rows=40)


def test_eager_csa_mxfp4_hadamard_bf16_o_proj_matches_dense_reference():
    layer = make_layer(CSA, indexer_fmt="mxfp4", hadamard=True, fp8_o_proj=False)
    mgr, builder = make_runtime(layer, "mxfp4")
    capture = []
    layer.indexer.register_forward_hook(lambda mod, args, out: capture.append(out))
    outs, sel = run(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, schedule("two_requests", 150),
                    seed=7, capture=capture)
    for rid, (x, y) in outs.items():
        compare(layer, x, y, sel[rid], min_selecting_rows=40)


@pytest.mark.parametrize("idx", [SWA, CSA, HCA], ids=["swa", "csa", "hca"])
def test_comparison_detects_wrong_layers(idx):
    """The comparison can fail: the layer's outputs do not match a dense reference with a slightly or
    grossly perturbed sink, without the compressed entries, with a 10% different compressor position
    bias, or (CSA) with the indexer's ranking reversed."""
    layer = make_layer(idx)
    mgr, builder = make_runtime(layer)
    (x, y), = run(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, schedule("prefill", PROMPT[idx]),
                  seed=idx)[0].values()
    compare(layer, x, y)

    wrong = {"sink + 0.1": lambda m: m.attn_sink.add_(0.1), "sink + 1": lambda m: m.attn_sink.add_(1.0)}
    if idx != SWA:
        wrong["no compressed entries"] = lambda m: setattr(m, "compress_ratio", 0)
        wrong["ape x 1.1"] = lambda m: m.compressor.ape.mul_(1.1)
    if idx == CSA:
        wrong["reversed indexer ranking"] = lambda m: m.indexer.weights_proj.weight.neg_()
    assert_wrong_references_fail(layer, x, y, wrong)


def assert_wrong_references_fail(layer, x, y, wrong: dict, **kw) -> None:
    """``compare`` fails on its tolerance checks for each ``wrong`` edit of a copy of ``layer`` (CPU)."""
    for name, edit in wrong.items():
        other = copy.deepcopy(layer)
        edit(other)
        try:
            compare(other, x, y, **kw)
        except AssertionError as e:
            assert "differ from the dense reference" in str(e), f"{name}: {e}"
            continue
        pytest.fail(f"the layer matches a dense reference with {name}")


# --- compiled -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[CSA, HCA], ids=["csa", "hca"])
def compiled_run(request):
    """One compile per layer type: chunked prompts, two requests sharing steps, decode steps of 2 and
    1 tokens, all through the same dynamic-shape graph."""
    idx = request.param
    layer = make_layer(idx)
    mgr, builder = make_runtime(layer)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    outs, _ = run(step, builder, compiled_schedule(PROMPT[idx]), seed=100 + idx)
    return layer, outs


def compiled_schedule(p: int) -> list:
    return ([[("a", 70)], [("a", p - 70 - 40), ("b", 40)], [("b", 91), ("a", 40)]]
            + [[("a", 1), ("b", 1)] if i % 2 else [("b", 1), ("a", 1)] for i in range(D)] + [[("a", 1)]])


def test_compiled_layer_matches_dense_reference(compiled_run):
    layer, outs = compiled_run
    for x, y in outs.values():
        compare(layer, x, y, min_selecting_rows=20)


# --- GPU ----------------------------------------------------------------------------------------
def cuda_layer(idx: int, **kw) -> tuple:
    """The layer on the GPU and its CPU copy for the dense reference (identical parameters and
    buffers: copied before any hook or compile touches the layer)."""
    layer = make_layer(idx, device=DEV, **kw)
    return layer, copy.deepcopy(layer).cpu()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["prefill", "two_requests"])
@pytest.mark.parametrize("idx", [SWA, CSA, HCA], ids=["swa", "csa", "hca"])
def test_eager_layer_on_cuda_matches_dense_reference(idx, name):
    layer, ref_layer = cuda_layer(idx)
    mgr, builder = make_runtime(layer, device=DEV)
    capture = []
    if layer.indexer is not None:
        layer.indexer.register_forward_hook(lambda mod, args, out: capture.append(out))
    outs, sel = run(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, schedule(name, PROMPT[idx]),
                    seed=idx, capture=capture if layer.indexer is not None else None, device=DEV)
    for rid, (x, y) in outs.items():
        compare(ref_layer, x, y, sel[rid] if sel else None, min_selecting_rows=40, rms_rtol=GPU_RMS_RTOL)


@pytest.mark.cuda
def test_comparison_on_cuda_detects_wrong_layers():
    """The GPU comparison can fail: the HCA layer on CUDA does not match a dense reference with a
    perturbed sink (+0.1 fails per row, +1 grossly) or without the compressed entries."""
    layer, ref_layer = cuda_layer(HCA)
    mgr, builder = make_runtime(layer, device=DEV)
    (x, y), = run(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, schedule("prefill", PROMPT[HCA]),
                  seed=HCA, device=DEV)[0].values()
    compare(ref_layer, x, y, rms_rtol=GPU_RMS_RTOL)
    wrong = {"sink + 0.1": lambda m: m.attn_sink.add_(0.1), "sink + 1": lambda m: m.attn_sink.add_(1.0),
             "no compressed entries": lambda m: setattr(m, "compress_ratio", 0)}
    assert_wrong_references_fail(ref_layer, x, y, wrong, rms_rtol=GPU_RMS_RTOL)


@pytest.fixture(scope="module", params=[CSA, HCA], ids=["csa", "hca"])
def compiled_run_cuda(request):
    """``compiled_run`` on the GPU: one compile per layer type (its own lambda, so its own dynamo
    cache entries), returning the CPU copy of the layer for the reference."""
    idx = request.param
    layer, ref_layer = cuda_layer(idx)
    mgr, builder = make_runtime(layer, device=DEV)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    outs, _ = run(step, builder, compiled_schedule(PROMPT[idx]), seed=100 + idx, device=DEV)
    return ref_layer, outs


@pytest.mark.cuda
def test_compiled_layer_on_cuda_matches_dense_reference(compiled_run_cuda):
    ref_layer, outs = compiled_run_cuda
    for x, y in outs.values():
        compare(ref_layer, x, y, min_selecting_rows=20, rms_rtol=GPU_RMS_RTOL)

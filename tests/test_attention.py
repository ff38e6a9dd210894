"""The attention core: ``sparse_attn`` against a dense recomputation (gather + fp32 softmax with the
sink column), ``indexer_topk`` against ``torch.topk`` on independently dequantized logits, the Triton
kernels against both, the debug index switch, opcheck, fakes, ValueErrors, and a CUDA-graph replay."""

import warnings

import pytest
import torch
import triton
import triton.language as tl

import dsv4_compile  # noqa: F401
from dsv4_compile import layouts
from dsv4_compile.kernels.triton import attention as kernels
from dsv4_compile.kernels.triton._common import sm_programs
from dsv4_compile.reference import attention as ref
from dsv4_compile.reference import cache as ref_cache

dsv4 = torch.ops.dsv4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCALE = layouts.KV_HEAD_DIM**-0.5


# --- scenario builders ----------------------------------------------------------------------------
def _filled_kv_cache(n_blocks, bs, seed, extra=0):
    """An fp8_ds_mla cache with every slot written (random values of magnitude ~2)."""
    g = torch.Generator().manual_seed(seed)
    pb = layouts.page_bytes("fp8_ds_mla", bs)
    full = torch.zeros(n_blocks, pb + extra, dtype=torch.uint8)
    cache = full[:, :pb] if extra else full
    kv = (torch.randn(n_blocks * bs, 512, generator=g) * 2).bfloat16()
    ref_cache.kv_insert(kv, cache, torch.arange(n_blocks * bs), bs)
    return cache


def _indices(t, width, capacity, g, fill):
    """[t, width] distinct random slots, the first ``fill[i]`` entries of row i valid, −1 after."""
    rows = []
    for i in range(t):
        row = torch.full((width,), -1, dtype=torch.int32)
        n = fill[i]
        row[:n] = torch.randperm(capacity, generator=g)[:n].int()
        rows.append(row[torch.randperm(width, generator=g)])  # −1 holes anywhere in the row
    return torch.stack(rows) if rows else torch.empty(0, width, dtype=torch.int32)


def _on(device, args):
    """``args`` with every tensor moved to ``device`` (other items as they are)."""
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def _attn_case(t=6, h=8, w=16, k=24, swa_bs=16, comp_bs=2, seed=0, with_comp=True, swa_blocks=3, comp_blocks=12):
    g = torch.Generator().manual_seed(seed)
    swa = _filled_kv_cache(swa_blocks, swa_bs, seed + 1)
    comp = _filled_kv_cache(comp_blocks, comp_bs, seed + 2, extra=64) if with_comp else None
    q = (torch.randn(t, h, 512, generator=g) * 0.5).bfloat16()
    sink = torch.randn(h, generator=g)
    sink[0] = float("-inf")  # a padded head
    swa_fill = [w, w // 2, 0, w, 0, 3] * (t // 6 + 1)
    comp_fill = [k, 0, k // 3, k, 0, 1] * (t // 6 + 1)  # row 1: only SWA; row 2: only compressed; row 4: none
    swa_idx = _indices(t, w, swa.shape[0] * swa_bs, g, swa_fill)
    comp_idx = _indices(t, k, comp.shape[0] * comp_bs, g, comp_fill) if with_comp else None
    return q, swa, swa_idx, comp, comp_idx, sink, swa_bs, comp_bs


def _dense(q, swa, swa_idx, comp, comp_idx, sink, swa_bs, comp_bs):
    """Per token: gather the valid candidates, append the sink column, fp32 softmax, drop it, @ V."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for t in range(q.shape[0]):
        slots = [(swa, s, swa_bs) for s in swa_idx[t].tolist() if s >= 0]
        if comp is not None:
            slots += [(comp, s, comp_bs) for s in comp_idx[t].tolist() if s >= 0]
        if not slots:
            continue
        kv = torch.cat([dsv4.kv_gather(c, torch.tensor([s]), bs) for c, s, bs in slots]).float()  # [N, 512]
        logits = q[t].float() @ kv.T * SCALE  # [H, N]
        full = torch.cat((logits, sink[:, None]), dim=1)
        p = torch.softmax(full, dim=1)[:, :-1]
        out[t] = torch.nan_to_num(p) @ kv
    return out


def _assert_close_bf16(got, want):
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def _assert_one_bf16_rounding(got, want):
    """``got`` (bf16) within one bf16 rounding of ``want``: the same sums rounded in another order."""
    assert bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all())


# --- sparse_attn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_comp", [True, False])
def test_sparse_attn_matches_dense_recomputation(with_comp):
    args = _attn_case(with_comp=with_comp)
    out = dsv4.sparse_attn(*args[:6], SCALE, *args[6:])
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    _assert_close_bf16(out, _dense(*args))
    assert bool((out[4] == 0).all())  # no candidates → 0 (every head, finite sink or not)
    assert bool((out[1] != 0).any())  # only SWA candidates
    assert bool((out[2] != 0).any()) == with_comp  # only compressed candidates


def test_sparse_attn_sink_only_in_the_denominator():
    q, swa, swa_idx, _, _, _, bs, _ = _attn_case(t=1, with_comp=False)
    no_sink = torch.full((q.shape[1],), float("-inf"))
    big_sink = torch.full((q.shape[1],), 30.0)
    a = dsv4.sparse_attn(q, swa, swa_idx, None, None, no_sink, SCALE, bs, 2).float()
    b = dsv4.sparse_attn(q, swa, swa_idx, None, None, big_sink, SCALE, bs, 2).float()
    assert a.abs().max() > 0.1 and b.abs().max() < 1e-6  # the sink takes the mass and adds no value


@pytest.mark.parametrize("splits,dv,t", [(None, None, 7), (1, 512, 7), (3, 512, 7), (1, 256, 7), (3, 128, 7),
                                         (9, 512, 7), (9, 512, 1), (3, 128, 1)])
def test_sparse_attn_kernel_matches_reference(kernel_device, splits, dv, t):
    """Every split / value-dim share; one token's splits (20 rows of (token, head)) merge in the
    all-at-once combine kernel, seven tokens' (140 rows) in the loop."""
    args = _attn_case(t=t, h=20, seed=3)  # 20 heads: two head blocks, the second partly masked
    dev = _on(kernel_device, args)
    want = ref.sparse_attn(*args[:6], SCALE, *args[6:])
    counts = [k.launches + k.fast for k in (kernels._combine_all_kernel, kernels._combine_kernel)]
    got = kernels.sparse_attn(*dev[:6], SCALE, *dev[6:], splits=splits, block_dv=dv, block_n=16)
    _assert_close_bf16(got.cpu(), want.float())
    assert t < 5 or bool((got[4].cpu() == 0).all())
    merged = [k.launches + k.fast - c for k, c in zip((kernels._combine_all_kernel, kernels._combine_kernel), counts)]
    if splits and splits > 1:
        assert merged == ([1, 0] if t == 1 else [0, 1])


def test_launch_config_wide_splits_fill_one_wave(monkeypatch):
    """64-head programs split the candidates in as many parts as fit one wave, at least 2, each a whole
    number of BN-candidate tiles (measured on the H200: B = 16 of 640 candidates 5 splits 34.8 µs vs 4 splits 40.1;
    the 128-candidate SWA layer at B = 32 2 splits 16.2 µs vs 1 split 20.1)."""
    monkeypatch.setattr(kernels, "sm_programs", lambda device: 132)
    cpu = torch.device("cpu")
    for T, n_cand, want in ((16, 640, 5), (24, 640, 5), (32, 640, 4), (48, 640, 2), (64, 640, 2), (256, 640, 2),
                            (32, 128, 2), (64, 128, 2), (256, 128, 1), (4096, 128, 1), (4096, 640, 2)):
        bh, bn, dv, warps, splits, per_split = kernels.launch_config(T, 64, n_cand, cpu)
        assert (bh, warps) == (64, 8) and splits == want and splits * per_split >= n_cand, (T, n_cand, splits)
    assert kernels.launch_config(8, 64, 640, cpu)[0] == 16  # few tokens: 16-head programs


def test_combine_config_bounds_and_covers_every_split():
    """Every split in one load (NS >= splits, a power of two), at most 8192 partial values per
    program, value-dim chunks that tile 512, and more programs when the tokens leave SMs idle."""
    for T, H, splits in ((1, 64, 20), (1, 64, 300), (64, 64, 2), (3, 20, 3), (1, 128, 33), (500, 64, 2)):
        ns, bh, dc = kernels.combine_config(T, H, splits, sms=132)
        assert ns >= splits and ns & (ns - 1) == 0 and 512 % dc == 0 and bh & (bh - 1) == 0
        assert ns * bh * dc <= 8192 or (bh == 1 and dc == 16)
    assert kernels.combine_config(1, 64, 20, 132) == (32, 2, 64)  # 256 programs for one token
    assert kernels.combine_config(64, 64, 2, 132) == (2, 16, 256)  # 512 programs


def test_sparse_attn_kernel_masks_indices_past_the_cache(kernel_device):
    q, swa, swa_idx, comp, comp_idx, sink, sbs, cbs = _attn_case(seed=5)
    past = swa_idx.clone()
    past[past < 0] = swa.shape[0] * sbs + 7  # beyond the cache: must be skipped like −1, never read
    dev = lambda *xs: [x.to(kernel_device) for x in xs]  # noqa: E731
    a = kernels.sparse_attn(*dev(q, swa, swa_idx, comp, comp_idx, sink), SCALE, sbs, cbs)
    b = kernels.sparse_attn(*dev(q, swa, past, comp, comp_idx, sink), SCALE, sbs, cbs)
    assert torch.equal(a, b)


# --- indexer_topk -----------------------------------------------------------------------------------
def _indexer_inputs(g, fmt, n_pages, t, h, bs):
    """(cache of ``n_pages`` pages of random keys, a random permutation of the pages, queries, their
    MXFP4 scales or None), drawn from ``g`` in that order."""
    cache = torch.zeros(n_pages, layouts.page_bytes(fmt, bs), dtype=torch.uint8)
    k = torch.randn(n_pages * bs, 128, generator=g).bfloat16()
    ref_cache.indexer_k_insert(k, cache, torch.arange(n_pages * bs), bs, fmt)
    perm = torch.randperm(n_pages, generator=g)
    x = torch.randn(t, h, 128, generator=g)
    q, q_scale = (x.to(torch.float8_e4m3fn), None) if fmt == "fp8" else torch.ops.dsv4.mxfp4_quant(x)
    return cache, perm, q, q_scale


def _topk_case(fmt, t=7, h=4, bs=16, n_req=3, blocks_per_req=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache, perm, q, q_scale = _indexer_inputs(g, fmt, n_req * blocks_per_req + 2, t, h, bs)
    table = perm[: n_req * blocks_per_req].view(n_req, blocks_per_req).int()
    table[2, 3] = -1  # an unallocated page (request 2 never reaches it)
    weights = torch.rand(t, h, generator=g) + 0.1
    token_to_req = torch.tensor([0, 1, 2, 0, 1, -1, 0][:t])
    #   visible n = (p+1)//4:  255→64 (all of req 0), 90→22, 40→10, 0→0, 63→16, pad, 4→1
    positions = torch.tensor([255, 90, 40, 0, 63, 5, 4][:t])
    return q, q_scale, weights, cache, table, token_to_req, positions, bs


def _logit_bound(device):
    """How far a kernel logit may be from the fp64 one, as a fraction of its Σ_h w·Σ_i |q_i·k_i|: on a
    GPU the logits are tensor-core e4m3 dots (FP8, and MXFP4's folded or per-block E2M1 values), which
    keep about 14 accumulator bits inside one K block (docs/numerics.md §7.2; measured on the H200:
    FP8 2^-16, MXFP4 2^-26), bounded at 2^-11 as for ``fp8_block_gemm``; the interpreter sums in fp32
    (about 2^-27 measured), bounded at 1e-6."""
    return 2.0 ** -11 if torch.device(device).type == "cuda" else 1e-6


def _dense_logits(q, q_scale, weights, cache, table, token_to_req, positions, bs, fmt, abs_terms=False):
    """Per token, per visible entry: dequantize k through the table by hand, Σ_h w·relu(q·k) (fp64);
    with ``abs_terms`` also Σ_h w·Σ_i |q_i·k_i| per entry (what tensor-core accumulation error scales
    with)."""
    qf = q.double() if fmt == "fp8" else dsv4_compile.reference.mxfp4_dequant(q, q_scale).double()
    rows, abs_rows = [], []
    for t in range(q.shape[0]):
        r, p = int(token_to_req[t]), int(positions[t])
        n = 0 if r < 0 or p < 0 else min((p + 1) // 4, table.shape[1] * bs)
        pages = [int(table[r, s // bs]) for s in range(n)]
        slots = [pg * bs + s % bs if pg >= 0 else -1 for s, pg in zip(range(n), pages)]  # unallocated: zeros
        k = dsv4.indexer_k_gather(cache, torch.tensor(slots, dtype=torch.int64), bs, fmt).double()
        rows.append((torch.relu(qf[t] @ k.T) * weights[t].double()[:, None]).sum(0))
        abs_rows.append((qf[t].abs() @ k.abs().T * weights[t].double()[:, None]).sum(0))
    return (rows, abs_rows) if abs_terms else rows


def _check_topk(sel, logits_rows, topk, slack_rows=None):
    """Row t: n <= topk → exactly 0..n−1 then −1; else ``topk`` distinct entries, each scoring at least
    the k-th best (set equality with ``torch.topk``; ``slack_rows[t]``, absolute per entry, absorbs
    near-ties: the kept entry's and the k-th best's error bounds)."""
    for t, lg in enumerate(logits_rows):
        row = sel[t].tolist()
        n = lg.shape[0]
        if n <= topk:
            assert row == list(range(n)) + [-1] * (topk - n), (t, row)
            continue
        assert len(set(row)) == topk and min(row) >= 0 and max(row) < n, (t, row)
        assert row == sorted(row), (t, row)  # increasing entry order
        if slack_rows is None:
            assert set(row) == set(torch.topk(lg, topk).indices.tolist()), t
        else:
            kth = torch.topk(lg, topk).values[-1]
            assert bool((lg[row] >= kth - slack_rows[t][row] - slack_rows[t].max()).all()), t


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("topk", [8, 16, 70])
def test_indexer_topk_is_torch_topk_of_dequantized_logits(fmt, topk):
    case = _topk_case(fmt)
    sel = dsv4.indexer_topk(*case, fmt, topk)
    assert sel.dtype == torch.int32 and sel.shape == (7, topk)
    _check_topk(sel, _dense_logits(*case, fmt), topk)
    assert sel[5].tolist() == [-1] * topk and sel[3].tolist() == [-1] * topk  # padding / nothing visible


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_indexer_logits_kernel_matches_reference(kernel_device, fmt):
    case = _topk_case(fmt, h=20, seed=1)  # 20 heads: head blocks with masking
    dev = _on(kernel_device, case)
    want = ref.indexer_logits(*case, fmt, 4)
    got = kernels.indexer_logits(*dev, fmt, 4, block_n=16, block_h=16).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    # two programs per token (each walks every other tile), page indices loaded one tile ahead or not
    # (FP8; MXFP4 never prefetches), the tile loop pipelined or not (on a GPU): the same bits
    for cfg in (dict(programs=2, prefetch=False), dict(programs=2, prefetch=True), dict(stages=1), dict(stages=2)):
        other = kernels.indexer_logits(*dev, fmt, 4, block_n=16, block_h=16, **cfg).cpu()
        assert torch.equal(other, got), cfg
    # one head block of every head (queries kept across tiles) against head blocks of 16 (20 heads:
    # a masked block)
    one = kernels.indexer_logits(*dev, fmt, 4, block_n=16, block_h=32).cpu()
    assert torch.equal(torch.isinf(one), torch.isinf(want))
    torch.testing.assert_close(one[fin], want[fin], rtol=1e-5, atol=1e-5)
    # the op's default configuration (on a GPU: tensor-core dots)
    dense, abs_terms = _dense_logits(*case, fmt, abs_terms=True)
    slack = [_logit_bound(kernel_device) * a for a in abs_terms]
    for topk in (8, 20):
        _check_topk(kernels.indexer_topk(*dev, fmt, topk, 4).cpu(), dense, topk, slack_rows=slack)


def _set_mx_scales(scales, row, exps):
    """Rewrite one MXFP4 row's four UE8M0 scale bytes in place (``scales`` a uint8 view)."""
    scales[row] = torch.tensor(exps, dtype=torch.uint8)


@pytest.mark.parametrize("block_h", [16, 32])
def test_indexer_logits_mxfp4_fold_boundary(kernel_device, block_h):
    """The MXFP4 kernel folds rows whose block exponents lie within ``MX_FOLD_SPREAD`` of their
    largest into e4m3 and takes exact per-block dots for the rest: keys and a query head at the
    spread limit (5, folded) and past it (6, 9: exact pass), against the fp64 recomputation."""
    q, qs, w, cache, table, req, pos, bs = _topk_case("mxfp4", h=20, seed=2)
    spread = int(kernels.MX_FOLD_SPREAD)
    page_scales = cache[:, bs * 64:bs * 68].view(cache.shape[0], bs, 4)
    # keys: entry 3 of page table[0, 0] at the limit, entry 5 one past it, entry 9 of page table[1, 0]
    # four past it (0.5·2^-9 is an e4m3 subnormal: folding it would lose bits)
    _set_mx_scales(page_scales[int(table[0, 0])], 3, (127, 127 - spread, 126, 127))
    _set_mx_scales(page_scales[int(table[0, 0])], 5, (127, 126, 127 - spread - 1, 125))
    _set_mx_scales(page_scales[int(table[1, 0])], 9, (130, 121, 130, 130))
    # entry 2 of page table[1, 0] at the limit too: with token 4's head 11 (below) key and query
    # spreads add up to 10 binades inside one dot
    _set_mx_scales(page_scales[int(table[1, 0])], 2, (127, 127 - spread, 124, 127))
    # entry 7 of page table[0, 1] (request 0's entry 23, in a tile of folding keys): a zero scale
    # byte (the scale 0, as in the reference, not 2^-127), its logit about 1e-36, so it is compared
    # without the absolute tolerance below
    _set_mx_scales(page_scales[int(table[0, 1])], 7, (3, 0, 2, 1))
    # queries: token 2's head 7 one past the limit (its whole row takes the exact pass), token 4's
    # head 11 at it
    qs[2, 7] = torch.tensor((127 - spread - 1, 127, 126, 125), dtype=torch.uint8)
    qs[4, 11] = torch.tensor((127, 127 - spread, 127, 124), dtype=torch.uint8)
    case = (q, qs, w, cache, table, req, pos, bs)
    want = _dense_logits(*case, "mxfp4")
    dev = _on(kernel_device, case)
    got = kernels.indexer_logits(*dev, "mxfp4", 4, block_n=16, block_h=block_h).cpu()
    for t, row in enumerate(want):
        n = row.shape[0]
        assert torch.isinf(got[t, n:]).all()
        torch.testing.assert_close(got[t, :n].double(), row, rtol=1e-5, atol=1e-5)
    assert int(req[0]) == 0 and int(table[0, 1]) >= 0 and 0 < abs(float(want[0][23])) < 1e-30
    torch.testing.assert_close(got[0, 23].double(), want[0][23], rtol=1e-5, atol=0.0)
    if kernel_device.type == "cuda":  # the byte-permute decode against the arithmetic one: same bits
        other = kernels.indexer_logits(*dev, "mxfp4", 4, block_n=16, block_h=block_h, prmt=False).cpu()
        assert torch.equal(other, got)


@triton.jit
def _e2m1_bytes_kernel(c_ptr, o_ptr):
    code = tl.arange(0, 16).to(tl.uint8)
    c = tl.load(c_ptr + tl.arange(0, 8))
    tl.store(o_ptr + tl.arange(0, 8)[:, None] * 16 + tl.arange(0, 16)[None, :],
             kernels._e2m1_e4m3(code[None, :], c[:, None]))


def test_e2m1_e4m3_folding_is_exact_to_the_spread_limit(kernel_device):
    """``_e2m1_e4m3(code, 48 − 8d)`` is the e4m3 byte of ``E2M1(code) · 2^-d`` for every code and
    every ``d <= MX_FOLD_SPREAD``, and not for ``d = MX_FOLD_SPREAD + 1`` (0.5·2^-6 is an e4m3
    subnormal): the limit is the largest exact one."""
    from dsv4_compile.reference.quant import mxfp4_dequant

    spread = int(kernels.MX_FOLD_SPREAD)
    ds = torch.arange(8, dtype=torch.int32)
    out = torch.empty(8, 16, dtype=torch.uint8, device=kernel_device)
    _e2m1_bytes_kernel[(1,)]((48 - 8 * ds).to(kernel_device), out)
    got = out.cpu().view(torch.float8_e4m3fn).float()
    codes = torch.arange(16, dtype=torch.uint8)
    # one 32-element block holding each code twice (low and high nibble), scale 2^0
    vals = mxfp4_dequant((codes | (codes << 4))[None, :], torch.full((1, 1), 127, dtype=torch.uint8))[0, ::2]
    exact = [torch.equal(got[d], vals * 2.0 ** -d) for d in range(8)]
    assert all(exact[: spread + 1]) and not exact[spread + 1], exact


def _logits_case(t, h, bs, n_req, blocks_per_req, fmt, seed=0):
    """A random indexer case of ``t`` tokens spread over ``n_req`` requests, every page allocated."""
    g = torch.Generator().manual_seed(seed)
    cache, perm, q, q_scale = _indexer_inputs(g, fmt, n_req * blocks_per_req, t, h, bs)
    table = perm.view(n_req, blocks_per_req).int()
    req = torch.arange(t) % n_req
    pos = torch.randint(0, 4 * blocks_per_req * bs, (t,), generator=g)
    return q, q_scale, torch.rand(t, h, generator=g) + 0.1, cache, table, req, pos, bs


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_indexer_logits_kernel_at_batch_sizes_of_the_pipelined_form(kernel_device, fmt):
    """40 tokens of 64 heads with the default configuration (on a GPU, FP8: the software-pipelined
    128-entry form, every head in one block) against the reference, and the unpipelined loop over the
    same tiles: the same bits."""
    case = _logits_case(40, 64, 16, 5, 4, fmt, seed=3)
    want, abs_terms = _dense_logits(*case, fmt, abs_terms=True)
    dev = _on(kernel_device, case)
    got = kernels.indexer_logits(*dev, fmt, 4).cpu()
    bound = _logit_bound(kernel_device)
    for t, row in enumerate(want):
        n = row.shape[0]
        assert torch.isinf(got[t, n:]).all()
        err = (got[t, :n].double() - row).abs()
        assert bool((err <= bound * abs_terms[t]).all()), (t, float((err / abs_terms[t]).max()))
    assert torch.equal(kernels.indexer_logits(*dev, fmt, 4, stages=1).cpu(), got)


def test_indexer_logits_mxfp4_unaligned_rows(kernel_device):
    """A cache and queries at 16-byte-unaligned addresses and strides (the byte-permute decode needs
    aligned rows; the kernel takes the arithmetic decode for these): the aligned results."""
    q, qs, w, cache, table, req, pos, bs = _topk_case("mxfp4", h=20, seed=4)
    dev = _on(kernel_device, (q, qs, w, cache, table, req, pos))
    want = kernels.indexer_logits(*dev, bs, "mxfp4", 4).cpu()
    big = torch.zeros(cache.shape[0], cache.shape[1] + 3, dtype=torch.uint8, device=kernel_device)
    odd_cache = big[:, 1:1 + cache.shape[1]]
    odd_cache.copy_(dev[3])
    qbig = torch.zeros(q.numel() + 1, dtype=torch.uint8, device=kernel_device)
    odd_q = qbig[1:].view(q.shape)
    odd_q.copy_(dev[0])
    assert odd_cache.data_ptr() % 16 and odd_cache.stride(0) % 16 and odd_q.data_ptr() % 16
    got = kernels.indexer_logits(odd_q, dev[1], dev[2], odd_cache, *dev[4:], bs, "mxfp4", 4).cpu()
    assert torch.equal(got, want)


def _nan_logits_agree(case, fmt, kernel_device, topk=8):
    """The kernel's logits are NaN exactly where the reference's are (equal elsewhere up to summation
    order), and its selection is the reference's: NaN ranks first."""
    want = ref.indexer_logits(*case, fmt, 4)
    dev = _on(kernel_device, case)
    for bh in (16, 32):  # head blocks with masking; one block of every head
        got = kernels.indexer_logits(*dev, fmt, 4, block_n=16, block_h=bh).cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), bh
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert torch.isnan(want).any()
    assert torch.equal(kernels.indexer_topk(*dev, fmt, topk, 4).cpu(), ref.indexer_topk(*case, fmt, topk, 4))


def test_indexer_logits_keep_nan_mxfp4(kernel_device):
    """A key or query block with the UE8M0 NaN scale 0xFF (what ``mxfp4_quant`` writes for a block
    holding a NaN) makes NaN logits, as in the reference, so the selection keeps the entry (a NaN
    ranks first) instead of dropping it: ``max(NaN, 0)`` in hardware gives 0, the kernel's ReLU keeps
    NaN."""
    q, qs, w, cache, table, req, pos, bs = _topk_case("mxfp4", h=20, seed=2)
    page_scales = cache[:, bs * 64:bs * 68].view(cache.shape[0], bs, 4)
    _set_mx_scales(page_scales[int(table[0, 0])], 3, (127, 255, 126, 127))  # one NaN block
    _set_mx_scales(page_scales[int(table[1, 0])], 9, (255, 255, 255, 255))
    qs[4, 11, 2] = 255  # token 4's head 11: every entry's logit is NaN
    _nan_logits_agree((q, qs, w, cache, table, req, pos, bs), "mxfp4", kernel_device)


@pytest.mark.cuda
def test_indexer_logits_keep_nan_fp8():
    """An e4m3 NaN (0x7F / 0xFF) in an FP8 key makes NaN logits for that entry, as in the reference
    (GPU only: the Triton interpreter reads e4m3 0x7F as 480)."""
    q, qs, w, cache, table, req, pos, bs = _topk_case("fp8", h=20, seed=2)
    vals = cache[:, : bs * 128].view(cache.shape[0], bs, 128)
    vals[int(table[0, 0]), 3, 5] = 0x7F
    vals[int(table[1, 0]), 9, 100] = 0xFF
    _nan_logits_agree((q, qs, w, cache, table, req, pos, bs), "fp8", torch.device("cuda"))


# --- the CuTe-DSL logits kernels (Hopper: TMA / bulk copies + wgmma; FP8 and MXFP4) ---------------------
def _cute_logits():
    """``kernels.cute.indexer_logits`` where it runs (a Hopper GPU with CuTe DSL), else skip."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not (torch.cuda.is_available() and HAVE_CUTE and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the CuTe indexer logits kernels need a Hopper GPU and CuTe DSL")
    from dsv4_compile.kernels.cute import indexer_logits

    return indexer_logits


def _paged_case(seed, fmt, t, h, bs, n_req, blocks_per_req, idx_dtype=torch.int64):
    """``t >= 9`` tokens over ``n_req >= 2`` requests of ``fmt`` keys in ``bs``-entry pages: token 1 a
    padding token (request −1), 2 at position −1 (nothing visible), 3 seeing every entry of request 0
    (an unallocated page, −1, among them), 4 seeing 70 entries (a partial tile), 5 of request
    ``n_req`` (past the table: padding), 6 at a position past the table (its count clamps to the
    table width), 7 seeing every entry of request 1 (its last page index is past the cache); head
    weights of both signs. MXFP4 also takes the exact per-block form somewhere: key rows 7 and 6
    binades past their largest block (request 0's first page, request 1's third), a NaN block scale
    (request 0's third page), a zero one (request 1's first page); query heads past the spread in
    tokens 3 (which sees the −1 page) and 8, a zero query block scale in token 4 and a NaN one in
    token 0 (its whole row NaN). A key row at the spread limit (request 1's second page) folds, in
    tiles token 7 takes in the folded form. Returns the case and the same case as ``_dense_logits``
    reads it (the unreadable pages as −1, gathered as zero keys; requests past the table as −1)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = n_req * blocks_per_req + 3
    cache, perm, q, q_scale = _indexer_inputs(g, fmt, n_pages, t, h, bs)
    table = perm[: n_req * blocks_per_req].view(n_req, blocks_per_req).int()
    table[0, 1] = -1
    table[1, blocks_per_req - 1] = n_pages + 5
    full = 4 * blocks_per_req * bs - 1  # the position at which every entry of a request is visible
    req = torch.arange(t) % n_req
    pos = torch.randint(0, full + 1, (t,), generator=g)
    req[1], pos[2] = -1, -1
    req[3], pos[3] = 0, full
    pos[4] = 4 * 70 - 1
    req[5] = n_req
    pos[6] = full + 4 * 100
    req[7], pos[7] = 1, full
    w = torch.rand(t, h, generator=g) - 0.3
    if fmt == "mxfp4":
        scales = cache[:, bs * 64: bs * 68].view(n_pages, bs, 4)
        _set_mx_scales(scales[int(table[0, 0])], 3, (127, 120, 126, 127))
        _set_mx_scales(scales[int(table[0, 2])], 9, (127, 255, 126, 127))
        _set_mx_scales(scales[int(table[1, 0])], 5, (0, 1, 2, 3))
        _set_mx_scales(scales[int(table[1, 1])], 3, (127, 122, 126, 127))
        _set_mx_scales(scales[int(table[1, 2])], 4, (127, 121, 127, 126))
        for t_, h_, exps in ((8, 7, (127, 100, 127, 127)), (3, 7, (127, 100, 127, 127)), (4, 11, (127, 0, 126, 127)),
                             (0, 5, (127, 127, 255, 127))):
            q_scale[t_, h_ % h] = torch.tensor(exps, dtype=torch.uint8)
    case = (q, q_scale, w, cache, table, req.to(idx_dtype), pos.to(idx_dtype), bs)
    readable = torch.where((table >= 0) & (table < n_pages), table, -1)
    return case, (q, q_scale, w, cache, readable, torch.where(req < n_req, req, -1), pos, bs)


def _cuda_with_poisoned_tail(case):
    """``case`` on the GPU with its cache a prefix view of a buffer whose 8 pages past the cache hold
    0xFF bytes (e4m3 NaN keys, NaN scales): a page index past the cache that were read would make NaN
    logits instead of zeros."""
    dev = _on("cuda", case)
    cache = case[3]
    big = torch.full((cache.shape[0] + 8, cache.shape[1]), 0xFF, dtype=torch.uint8, device="cuda")
    big[: cache.shape[0]] = dev[3]
    dev[3] = big[: cache.shape[0]]
    return dev


def _strided_rows(x, pad):
    """``x`` ``[T, H, R]`` as a view into a buffer with ``pad`` zero elements before and after each row."""
    wide = torch.zeros(*x.shape[:2], x.shape[2] + 2 * pad, dtype=x.dtype, device=x.device)
    wide[:, :, pad: pad + x.shape[2]] = x
    return wide[:, :, pad: pad + x.shape[2]]


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("h", [64, 20])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_cute_indexer_logits_match_dense_logits(fmt, bs, h, idx_dtype):
    """The CuTe kernels against fp64 logits of independently gathered keys, within the tensor-core
    bound (NaN where the fp64 logit is NaN: MXFP4's NaN block scale); nothing written at or past a
    token's visible count; the same bits for one CTA per token (its stage ring wrapping several times),
    fewer stages, one consumer warpgroup, and without PDL; queries (and MXFP4 query scales) read
    through strided views."""
    il = _cute_logits()
    case, readable = _paged_case(5, fmt, 9, h, bs, 3, 5, idx_dtype)
    want, abs_terms = _dense_logits(*readable, fmt, abs_terms=True)
    q, qs, w, cache, table, req, pos, _ = _cuda_with_poisoned_tail(case)
    q_strided = _strided_rows(q.view(torch.uint8), 64 if fmt == "fp8" else 32).view(q.dtype)
    qs_strided = None if qs is None else _strided_rows(qs, 2)  # rows 8 bytes apart at offset 2: copied
    L = table.shape[1] * bs

    def run(qq, qqs, **cfg):
        out = torch.full((q.shape[0], L + 5), 7.0, device="cuda")
        il.indexer_logits_into(out, qq, qqs, w, cache, table, req, pos, bs, fmt, 4, **cfg)
        return out.cpu()

    got = run(q, qs)
    bound = _logit_bound("cuda")
    for t, row in enumerate(want):
        n = row.shape[0]
        assert bool((got[t, n:] == 7.0).all()), t
        nan = torch.isnan(row)
        assert torch.equal(torch.isnan(got[t, :n]), nan), t
        err = (got[t, :n].double() - row).abs()[~nan]
        assert bool((err <= bound * abs_terms[t][~nan]).all()), (t, float((err / abs_terms[t][~nan]).max()))
    assert sum(r.shape[0] for r in want) > 4 * 64 and want[1].shape[0] == want[2].shape[0] == want[5].shape[0] == 0
    assert want[6].shape[0] == L and want[4].shape[0] == 70
    if fmt == "mxfp4":  # the exact form ran: a NaN row (the NaN block scale) among the logits
        assert any(bool(torch.isnan(r).any()) for r in want)
    bits = got.view(torch.int32)  # bitwise, so that NaN logits compare equal too
    for cfg in (dict(programs=1, stages=2), dict(programs=1, stages=3, consumers=1), dict(programs=2, pdl=False)):
        assert torch.equal(run(q, qs, **cfg).view(torch.int32), bits), cfg
    assert torch.equal(run(q_strided, qs_strided).view(torch.int32), bits)


@pytest.mark.parametrize("kernel, stages, consumers", [("IndexerLogitsKernel", 4, 3), ("IndexerLogitsKernel", 6, 4),
                                                       ("IndexerLogitsKernel", 0, 1),
                                                       ("IndexerLogitsMxfp4Kernel", 4, 4),
                                                       ("IndexerLogitsMxfp4Kernel", 3, 2)])
def test_cute_indexer_logits_reject_rings_the_warpgroups_cannot_share(kernel, stages, consumers):
    """A stage ring the consumer warpgroups cannot share (stages not a multiple of them, more of them
    than the kernel has named barriers for) is a ``ValueError`` from the kernel itself, before any
    compile (no GPU needed); so is an ``out`` narrower than the table."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("needs CuTe DSL")
    from dsv4_compile.kernels.cute import indexer_logits as il

    with pytest.raises(ValueError, match="cannot be shared"):
        getattr(il, kernel)(64, stages, consumers, False)
    q = torch.zeros(2, 4, 128, dtype=torch.uint8)
    table = torch.zeros(1, 2, dtype=torch.int32)
    cache = torch.zeros(2, 8448, dtype=torch.uint8)
    args = (q, None, torch.zeros(2, 4), cache, table, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            64, "fp8", 4)
    with pytest.raises(ValueError, match="out must be"):
        il.indexer_logits_into(torch.zeros(2, 100), *args)


@pytest.mark.cuda
def test_cute_indexer_logits_keep_nan():
    """An e4m3 NaN in a key makes that entry's logit NaN (the ReLU is ``max.NaN``), as in the reference."""
    il = _cute_logits()
    case, readable = _paged_case(6, "fp8", 9, 64, 64, 2, 3)  # token 3 sees all three pages of request 0
    cache = case[3]
    vals = cache[:, : 64 * 128].view(cache.shape[0], 64, 128)
    vals[int(case[4][0, 0]), 3, 5] = 0x7F
    vals[int(case[4][0, 2]), 60, 100] = 0xFF
    want = _dense_logits(*readable, "fp8")
    q, qs, w, cache, table, req, pos, bs = _on("cuda", case)
    out = torch.full((q.shape[0], table.shape[1] * bs), 7.0, device="cuda")
    got = il.indexer_logits_into(out, q, qs, w, cache, table, req, pos, bs, "fp8", 4).cpu()
    assert any(torch.isnan(r).any() for r in want)
    for t, row in enumerate(want):
        assert torch.equal(torch.isnan(got[t, : row.shape[0]]), torch.isnan(row)), t


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_indexer_topk_runs_the_cute_logits_on_hopper(monkeypatch, fmt):
    """The op takes the CuTe logits for pages of 64 entries (FP8 when the table holds enough tiles) and
    the Triton kernel with ``DSV4_BACKEND=triton``; both selections are ``torch.topk``'s up to
    near-ties within the bound (rows with a NaN logit aside: their order is the selection's own
    contract); a CUDA graph of the op replays what eager computes."""
    il = _cute_logits()
    calls = []
    real = il.indexer_logits_into
    monkeypatch.setattr(il, "indexer_logits_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    case, readable = _paged_case(7, fmt, 9, 64, 64, 3, 60)  # 9 x 60 tiles: enough work for ``preferred``
    dense, abs_terms = _dense_logits(*readable, fmt, abs_terms=True)
    finite = [t for t, r in enumerate(dense) if not bool(torch.isnan(r).any())]
    slack = [_logit_bound("cuda") * a for a in abs_terms]
    dev = _cuda_with_poisoned_tail(case)

    def check(sel):
        _check_topk(sel[finite], [dense[t] for t in finite], 64, slack_rows=[slack[t] for t in finite])

    sel = dsv4.indexer_topk(*dev, fmt, 64).cpu()
    assert calls, "the op did not run the CuTe logits kernel"
    check(sel)
    assert len(finite) >= 5
    monkeypatch.setenv("DSV4_BACKEND", "triton")
    n_calls = len(calls)
    check(dsv4.indexer_topk(*dev, fmt, 64).cpu())
    assert len(calls) == n_calls
    monkeypatch.delenv("DSV4_BACKEND")
    x = torch.randn(dev[0].shape[0], 64, 128, device="cuda") * 2
    fresh, fresh_s = (x.to(torch.float8_e4m3fn), None) if fmt == "fp8" else dsv4.mxfp4_quant(x)
    want = dsv4.indexer_topk(fresh, fresh_s, *dev[2:], fmt, 64)
    graph = torch.cuda.CUDAGraph()
    dsv4.indexer_topk(*dev, fmt, 64)  # warm up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = dsv4.indexer_topk(*dev, fmt, 64)
    dev[0].copy_(fresh)
    if fmt == "mxfp4":
        dev[1].copy_(fresh_s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_indexer_topk_kernel_on_an_empty_cache(kernel_device):
    q, qs, w, cache, table, req, pos, bs = _topk_case("fp8")
    empty = cache[:0]
    # topk = 64 >= every row's visible count: rows are exact (with fewer, all-zero logits tie arbitrarily)
    got = kernels.indexer_topk(q.to(kernel_device), None, w.to(kernel_device), empty.to(kernel_device),
                               table.to(kernel_device), req.to(kernel_device), pos.to(kernel_device), bs, "fp8", 64, 4)
    n = ref.visible_entries(pos, req, table.shape[0], 4, table.shape[1] * bs)
    assert int(n.max()) == 64
    assert torch.equal(got.cpu(), ref.select_topk(torch.where(torch.arange(64)[None] < n[:, None], 0.0,
                                                              float("-inf")), n, 64))


# --- op contract --------------------------------------------------------------------------------------
def _op_cases(device):
    a = [x.to(device) if isinstance(x, torch.Tensor) else x for x in _attn_case(t=3, h=4, w=8, k=8)]
    t = [x.to(device) if isinstance(x, torch.Tensor) else x for x in _topk_case("fp8", t=7)]
    m = [x.to(device) if isinstance(x, torch.Tensor) else x for x in _topk_case("mxfp4", t=4)]
    return [
        (dsv4.sparse_attn.default, (*a[:6], SCALE, *a[6:])),
        (dsv4.sparse_attn.default, (a[0], a[1], a[2], None, None, a[5], SCALE, a[6], 1)),
        (dsv4.indexer_topk.default, (*t, "fp8", 8, 4)),
        (dsv4.indexer_topk.default, (*m, "mxfp4", 100, 4)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(4))
def test_opcheck(device, case):
    op, args = _op_cases(device)[case]
    utils = None
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        # test_schema compares inputs with allclose, which torch lacks for e4m3: check the inputs by bytes
        utils = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
        before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
        op(*args)
        after = [a for a in args if isinstance(a, torch.Tensor)]
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.dtype == torch.float8_e4m3fn
                   else torch.equal(x, y) for x, y in zip(before, after))
    torch.library.opcheck(op, args, test_utils=utils or torch.library._OPCHECK_DEFAULT_UTILS)


@pytest.mark.parametrize("case", range(4))
def test_fakes_match_real(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _op_cases("cpu")[case]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args])
    assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


def test_bad_inputs_raise_value_error():
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=3, h=4, w=8, k=8)
    tq, tqs, tw, tc, tt, tr, tp, tbs = _topk_case("fp8")
    cases = [
        lambda: dsv4.sparse_attn(q.float(), swa, si, comp, ci, sink, SCALE, sbs, cbs),  # q dtype
        lambda: dsv4.sparse_attn(q[..., :256], swa, si, comp, ci, sink, SCALE, sbs, cbs),  # head dim
        lambda: dsv4.sparse_attn(q, swa, si[:2], comp, ci, sink, SCALE, sbs, cbs),  # rows
        lambda: dsv4.sparse_attn(q, swa, si + 10_000, comp, ci, sink, SCALE, sbs, cbs),  # past the cache
        lambda: dsv4.sparse_attn(q, swa, si - 5, comp, ci, sink, SCALE, sbs, cbs),  # below −1
        lambda: dsv4.sparse_attn(q, swa, si, comp, None, sink, SCALE, sbs, cbs),  # comp half given
        lambda: dsv4.sparse_attn(q, swa, si, comp, ci, sink[:2], SCALE, sbs, cbs),  # sink per head
        lambda: dsv4.sparse_attn(q, swa, si, comp, ci, sink.bfloat16(), SCALE, sbs, cbs),  # sink dtype
        lambda: dsv4.sparse_attn(q, swa, si, comp, ci, sink, -1.0, sbs, cbs),  # scale
        lambda: dsv4.sparse_attn(q, swa[:, :100], si, comp, ci, sink, SCALE, sbs, cbs),  # pages too small
        lambda: dsv4.indexer_topk(tq, tqs, tw, tc, tt, tr, tp, tbs, "fp4", 8, 4),  # fmt
        lambda: dsv4.indexer_topk(tq.view(torch.uint8), tqs, tw, tc, tt, tr, tp, tbs, "fp8", 8, 4),  # q dtype
        lambda: dsv4.indexer_topk(tq, tqs, tw.bfloat16(), tc, tt, tr, tp, tbs, "fp8", 8, 4),  # weights dtype
        lambda: dsv4.indexer_topk(tq, tqs, tw[:, :2], tc, tt, tr, tp, tbs, "fp8", 8, 4),  # weights shape
        lambda: dsv4.indexer_topk(tq, tqs, tw, tc, tt, tr, tp, tbs, "fp8", 0, 4),  # topk
        lambda: dsv4.indexer_topk(tq, tqs, tw, tc, tt + 100, tr, tp, tbs, "fp8", 8, 4),  # page past the cache
        lambda: dsv4.indexer_topk(tq, tqs, tw, tc, tt, tr + 5, tp, tbs, "fp8", 8, 4),  # request past the table
        lambda: dsv4.indexer_topk(tq, tqs, tw, tc, tt, tr, tp[:3], tbs, "fp8", 8, 4),  # positions length
        lambda: dsv4.indexer_topk(tq.view(torch.uint8)[..., :64], None, tw, tc, tt, tr, tp, tbs, "mxfp4", 8, 4),
    ]
    for i, bad in enumerate(cases):
        with pytest.raises(ValueError):
            bad()
            pytest.fail(f"case {i} did not raise")


def test_debug_switch_is_read_per_call(monkeypatch):
    from dsv4_compile.ops import _lib

    monkeypatch.delenv(_lib.DEBUG_ENV, raising=False)
    assert not _lib.debug_checks()
    monkeypatch.setenv(_lib.DEBUG_ENV, "1")
    assert _lib.debug_checks()
    monkeypatch.setenv(_lib.DEBUG_ENV, "0")
    assert not _lib.debug_checks()


# --- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_debug_switch_checks_device_indices(monkeypatch):
    from dsv4_compile.ops import _lib

    q, swa, si, comp, ci, sink, sbs, cbs = [x.cuda() if isinstance(x, torch.Tensor) else x
                                             for x in _attn_case(t=3, h=4, w=8, k=8)]
    past = si + 10_000
    monkeypatch.setenv(_lib.DEBUG_ENV, "0")
    out = dsv4.sparse_attn(q, swa, past, comp, ci, sink, SCALE, sbs, cbs)  # masked, no error, no sync
    assert out.shape == q.shape
    monkeypatch.setenv(_lib.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="swa_indices"):
        dsv4.sparse_attn(q, swa, past, comp, ci, sink, SCALE, sbs, cbs)
    kv = torch.zeros(2, 512, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="slot_mapping"):
        dsv4.kv_insert(kv, swa, torch.tensor([0, swa.shape[0] * sbs], device="cuda"), sbs)


@pytest.mark.cuda
@pytest.mark.parametrize("t,h,w,k", [(1, 64, 128, 512), (5, 64, 128, 512), (37, 128, 128, 256), (300, 16, 64, 64)])
def test_sparse_attn_gpu_matches_reference(t, h, w, k):
    g = torch.Generator().manual_seed(t)
    swa = _filled_kv_cache(8, 64, t + 1)
    comp = _filled_kv_cache(40, 64, t + 2)
    q = (torch.randn(t, h, 512, generator=g) * 0.5).bfloat16()
    sink = torch.randn(h, generator=g)
    fill_w = torch.randint(0, w + 1, (t,), generator=g).tolist()
    fill_k = torch.randint(0, k + 1, (t,), generator=g).tolist()
    si = _indices(t, w, swa.shape[0] * 64, g, fill_w)
    ci = _indices(t, k, comp.shape[0] * 64, g, fill_k)
    want = ref.sparse_attn(q, swa, si, comp, ci, sink, SCALE, 64, 64)
    args = [x.cuda() for x in (q, swa, si, comp, ci, sink)]
    got = dsv4.sparse_attn(*args, SCALE, 64, 64)
    _assert_close_bf16(got.cpu(), want.float())
    for splits in (1, 4):
        _assert_close_bf16(kernels.sparse_attn(*args, SCALE, 64, 64, splits=splits).cpu(), want.float())



def _cute_attn():
    """The wgmma sparse_attn module where it runs (CuTe DSL on a Hopper GPU), else None."""
    if not torch.cuda.is_available():
        return None
    from dsv4_compile.kernels.cute._common import backend

    if backend(torch.device("cuda")) != "cute" or torch.cuda.get_device_capability()[0] != 9:
        return None
    from dsv4_compile.kernels.cute import sparse_attn as cute_attn

    return cute_attn


def test_sparse_attn_wgmma_launch_plan():
    """Host side of the Hopper kernel (no GPU needed): splits cover every candidate in whole
    64-candidate tiles within one wave of CTAs; the op prefers it from two (token, 64-head) CTAs on;
    it never claims a CPU tensor."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("CuTe DSL not installed")
    from dsv4_compile.kernels.cute import sparse_attn as cute_attn

    for t, h, n, sms in ((1, 64, 640, 132), (8, 64, 640, 132), (64, 64, 640, 132), (64, 128, 1152, 132),
                         (4096, 64, 640, 132), (3, 20, 180, 132), (1, 64, 0, 132), (1, 64, 1, 8)):
        splits, per = cute_attn.splits_for(t, h, n, sms)
        ctas = t * -(-h // 64)
        assert per % 64 == 0 and per > 0
        assert splits * per >= n and (splits - 1) * per < max(n, 1)  # every candidate, no empty split
        assert splits == 1 or ctas * splits <= sms  # split only within one wave
    assert cute_attn.splits_for(64, 64, 640, 132) == (2, 320)
    assert cute_attn.splits_for(1, 64, 640, 132) == (10, 64)
    q = torch.zeros(1, 64, 512, dtype=torch.bfloat16)
    assert not cute_attn.preferred(q, 64) and cute_attn.preferred(torch.zeros(2, 64, 512, dtype=torch.bfloat16), 64)
    assert cute_attn.preferred(torch.zeros(1, 128, 512, dtype=torch.bfloat16), 1)
    assert cute_attn.preferred(q, 65)  # two tiles: one token's splits run as value-dim groups
    assert not cute_attn.supports(q, torch.zeros(2, 37440, dtype=torch.uint8), None)


H200_CLUSTERS = {2: 66, 3: 39, 4: 30, 5: 22, 6: 17, 7: 15, 8: 15, 9: 9, 10: 7}  # an H200's clusters at once, by size


def _h200_cluster_capacity(monkeypatch, cute_attn):
    """The H200's cluster capacities (``H200_CLUSTERS``; 7 for 11-16 CTAs) in place of the device query."""
    monkeypatch.setattr(cute_attn, "cluster_capacity", lambda dev, n: H200_CLUSTERS.get(n, 7 if n <= 16 else 0))


def test_sparse_attn_split_plan_value_groups(monkeypatch):
    """The op's default split plan (no GPU: the H200's 132 SMs and cluster capacities stand in):
    value-dim groups where the split CTAs fill at most half the SMs (the most that do) or, two of
    them, five eighths; half the splits as two groups where the splits would not merge in one
    cluster; else one group and the cluster rules; rows of two tiles unsplit as 8 or 4 groups from
    SMs / 8 rows while those fit one wave."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("CuTe DSL not installed")
    from dsv4_compile.kernels.cute import sparse_attn as cute_attn

    _h200_cluster_capacity(monkeypatch, cute_attn)
    plan = lambda t, h, n: cute_attn.split_plan(t, h, n, 132, 0)  # noqa: E731
    # V4-Flash CSA (640 candidates = 10 tiles): 10 / 20 / 40 CTAs -> 4 / 2 / 2 groups; B = 8: 80 CTAs,
    # 8 clusters of 10 do not fit (7) -> 5 splits of 2 tiles as 2 groups (80 CTAs); B = 16: 5 splits
    # merge in 16 clusters of 5 (<= 22) -> unchanged; B = 32: 4 splits, 128 CTAs -> unchanged
    assert [plan(t, 64, 640) for t in (1, 2, 4, 8, 16, 32)] == [
        (10, 64, 4), (10, 64, 2), (10, 64, 2), (5, 128, 2), (5, 128, 1), (4, 192, 1)]
    # SWA-only (128 candidates, 2 tiles): split CTAs 2 / 16 / 30 -> 8 / 4 / 2 groups; from 16 rows (132 / 8)
    # unsplit as 8 groups (16 rows) or 4 (17-33); 34 and 64 rows: 4 groups would not fit one wave -> two
    # splits, no groups
    assert [plan(t, 64, 128) for t in (1, 8, 15, 16, 17, 32, 33, 34, 64)] == [
        (2, 64, 8), (2, 64, 4), (2, 64, 2), (1, 128, 8), (1, 128, 4), (1, 128, 4), (1, 128, 4), (2, 64, 1),
        (2, 64, 1)]
    assert plan(8, 128, 128) == (1, 128, 8) and plan(16, 128, 128) == (1, 128, 4)  # V4-Pro: 2 head blocks
    assert [cute_attn.unsplit_groups(16, n, 132) for n in (1, 2, 3)] == [1, 8, 1]  # two-tile rows only
    # V4-Pro CSA (128 heads = 2 blocks, 1152 candidates = 18 tiles): B = 1 36 CTAs -> 2 groups (72 <= 82);
    # B = 8 six splits (96 CTAs), halved to 3 (48) still no groups (96 > 82)
    assert plan(1, 128, 1152) == (18, 64, 2) and plan(8, 128, 1152) == (6, 192, 1)
    assert plan(4096, 64, 640) == (1, 640, 1) and plan(1, 64, 64) == (1, 64, 1)  # unsplit: no groups
    assert [cute_attn.value_groups(c, 132) for c in (1, 8, 9, 16, 17, 33, 34, 41, 42)] == [8, 8, 4, 4, 2, 2, 2, 2, 1]


def test_sparse_attn_cluster_merge_rule(monkeypatch):
    """The splits merge within their cluster only where every cluster is resident at once and the
    grid has at least CLUSTER_MIN_CTAS CTAs (no GPU needed: the H200's capacities stand in for the
    device query); no cluster of one CTA or past MAX_CLUSTER; value-dim groups merge in clusters of a
    group's splits where all fit at once; a failed capacity query gives 0 (the combine kernel), warns
    once per device and is cached."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("CuTe DSL not installed")
    from dsv4_compile.kernels.cute import sparse_attn as cute_attn

    _h200_cluster_capacity(monkeypatch, cute_attn)
    rule = {t: cute_attn.cluster_merge(t, 64, cute_attn.splits_for(t, 64, 640, 132)[0], 0)
            for t in (1, 2, 4, 8, 16, 32, 64)}
    # V4-Flash CSA: 10 splits at B <= 13 (B = 8: 8 clusters of 10 > 7), 4 at B = 32 (32 > 30)
    assert rule == {1: False, 2: False, 4: True, 8: False, 16: True, 32: False, 64: True}
    assert cute_attn.cluster_merge(32, 128, 2, 0)  # V4-Pro: two head blocks a token, 64 clusters of 2
    assert not cute_attn.cluster_merge(4096, 64, 1, 0)  # unsplit
    # where a cluster of every split does not fit: the largest run of splits whose clusters all do
    runs = {t: cute_attn.cluster_run(t, 64, cute_attn.splits_for(t, 64, 640, 132)[0], 0) for t in (1, 2, 8, 12, 32)}
    assert runs == {1: 0, 2: 0, 8: 5, 12: 2, 32: 2}  # 16 clusters of 5 <= 22; 24 > 22, 60 of 2 <= 66; 64 <= 66
    assert cute_attn.cluster_run(16, 128, 4, 0) == 2  # V4-Pro B = 16: 64 clusters of 2
    assert cute_attn.cluster_run(16, 64, 5, 0) == 0 and cute_attn.cluster_run(64, 64, 2, 0) == 0  # no proper divisor
    assert cute_attn.cluster_run(40, 64, 6, 0) == 0  # 80 clusters of 3 > 39, 120 of 2 > 66
    # the plan's value-dim groups: each group's splits in one cluster where all such clusters fit at once
    group = lambda t, h, n, g: cute_attn.group_cluster(t, h, n, g, 0)  # noqa: E731
    # (8 clusters of 10 > 7: runs of 5; 18 > MAX_CLUSTER: runs of 9; 16 / 32 CTAs: the combine kernel)
    assert [group(1, 64, 10, 4), group(2, 64, 10, 2), group(4, 64, 10, 2), group(8, 64, 5, 2)] == [10, 10, 5, 5]
    assert [group(4, 64, 2, 8), group(8, 64, 2, 4), group(1, 128, 18, 2), group(2, 128, 9, 2)] == [2, 2, 9, 9]
    assert [group(1, 64, 2, 8), group(2, 64, 2, 8), group(16, 64, 1, 8), group(64, 64, 7, 2)] == [0, 0, 0, 0]
    # a call's whole plan, (splits, candidates a split, cluster, groups, partials for the combine kernel)
    plan = lambda t, n, **kw: cute_attn.launch_plan(t, 64, n, 132, 0, **kw)  # noqa: E731
    assert [plan(1, 640), plan(4, 640), plan(64, 640), plan(1, 128), plan(8, 128), plan(16, 128)] == [
        (10, 64, 10, 4, 1), (10, 64, 5, 2, 2), (2, 320, 2, 1, 1), (2, 64, 0, 8, 2), (2, 64, 2, 4, 1),
        (1, 128, 0, 8, 1)]
    assert cute_attn.launch_plan(1, 128, 1152, 132, 0) == (18, 64, 9, 2, 2)  # V4-Pro: runs of 9 into partials
    # forced: groups alone through the combine kernel; with a cluster; one split ignores the cluster
    assert plan(1, 640, splits=10, groups=4) == (10, 64, 0, 4, 10)
    assert plan(1, 640, splits=10, groups=4, cluster=True) == (10, 64, 10, 4, 1)
    assert plan(1, 640, splits=10, groups=2, cluster=5) == (10, 64, 5, 2, 2)
    assert plan(1, 128, splits=1, groups=8, cluster=True) == (1, 128, 0, 8, 1)
    assert plan(8, 640, splits=10) == (10, 64, 5, 1, 2)  # forced splits: the one-group cluster rules
    for kw, match in ((dict(splits=10, groups=3), "value-dim groups"), (dict(splits=10, groups=2, cluster=3),
                      "clusters of"), (dict(splits=20, cluster=True), "clusters of")):
        with pytest.raises(ValueError, match=match):
            plan(1, 1280, **kw)
    monkeypatch.undo()
    assert cute_attn.cluster_capacity(0, 1) == 0 and cute_attn.cluster_capacity(0, cute_attn.MAX_CLUSTER + 1) == 0
    if not torch.cuda.is_available():  # the query fails without a GPU: 0, one warning, remembered
        monkeypatch.setattr(cute_attn, "_CAPACITY", {})
        monkeypatch.setattr(cute_attn, "_QUERY_FAILED", set())
        with pytest.warns(UserWarning, match="occupancy query failed"):
            assert cute_attn.cluster_capacity(0, 2) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cute_attn.cluster_capacity(0, 3) == 0
        assert cute_attn._CAPACITY == {(0, 2): 0, (0, 3): 0}

@pytest.mark.cuda
@pytest.mark.parametrize("splits,t,h,idx", [(None, 7, 20, torch.int32), (1, 7, 20, torch.int32),
                                            (3, 7, 20, torch.int64), (None, 1, 64, torch.int32),
                                            (2, 3, 128, torch.int32), (None, 70, 8, torch.int64)])
def test_sparse_attn_wgmma_kernel_matches_reference(splits, t, h, idx):
    """The Hopper kernel: partial head blocks (20 heads), 128 heads (two CTAs per token), forced and
    default splits (merged by the combine kernels), int64 indices, the C128 page size with pages
    padded past their records, −1 holes anywhere, a row without candidates, a −inf sink."""
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=t, h=h, w=80, k=100, swa_bs=16, comp_bs=2, seed=11,
                                                   swa_blocks=8, comp_blocks=80)
    want = _dense(q, swa, si, comp, ci, sink, sbs, cbs)
    dev = [x.cuda() for x in (q, swa, si.to(idx), comp, ci.to(idx), sink)]
    assert cute_attn.supports(dev[0], dev[1], dev[3])
    got = cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits)
    _assert_close_bf16(got.cpu(), want)
    if t > 4:
        assert bool((got[4].cpu() == 0).all())  # row 4 has no candidate


def _check_merge_variant(cute_attn, dev, sbs, cbs, want, splits, **variant):
    """The Hopper kernel over ``splits`` forced splits in another form of the merge (``variant``: the
    cluster merge, value-dim groups): the reference's result ``want``, zeros for row 4 (no candidate),
    within one bf16 rounding of every split's partial merged by the combine kernel, the same bits when
    run again. Each run follows a freed NaN output of the same size (the caching allocator hands that
    block to the next output), so an element the variant leaves unwritten fails."""
    poison = lambda: torch.full(dev[0].shape, float("nan"), dtype=torch.bfloat16, device=dev[0].device)  # noqa: E731
    poison()
    got = cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits, **variant)
    _assert_close_bf16(got.cpu(), want)
    if got.shape[0] > 4:
        assert bool((got[4].cpu() == 0).all())  # row 4 has no candidate
    combined = cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits, cluster=False).float()
    _assert_one_bf16_rounding(got, combined)
    poison()
    assert torch.equal(cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits, **variant), got)


@pytest.mark.cuda
@pytest.mark.parametrize("splits,cluster,t,h,w,k", [
    (2, True, 3, 64, 80, 100), (3, True, 7, 20, 80, 100), (3, True, 70, 8, 80, 100), (2, True, 3, 80, 80, 100),
    (5, True, 2, 128, 128, 512), (5, True, 2, 200, 128, 512), (10, True, 2, 64, 128, 512), (16, True, 1, 64, 128, 896),
    (10, 5, 2, 64, 128, 512), (10, 2, 7, 80, 128, 512), (4, 2, 7, 20, 128, 128), (6, 3, 2, 200, 128, 256)])
def test_sparse_attn_wgmma_cluster_merge_matches_reference(splits, cluster, t, h, w, k):
    """Splits merged within their cluster through distributed shared memory: all of a (token, head
    block)'s splits (``cluster=True``: no partials, no combine kernel; 2 to 16 CTAs a cluster) or runs
    of ``cluster`` of them (5 or 2 of 10, 2 of 4, 3 of 6), each into one partial that the combine kernel
    merges: the reference's result and, within one bf16 rounding, the combine kernel's over every
    split; the same bits when run again; partial head blocks (20 and 8 heads; 80 and 200: a partial
    second / fourth head block), 128 heads (two clusters per token), more clusters than the GPU holds
    at once (70 tokens), a row without candidates, a −inf sink. A cluster size below 2 or not dividing
    the split count, and more than ``MAX_CLUSTER`` splits in one cluster, are ValueErrors."""
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    size = splits if cluster is True else cluster
    capacity = cute_attn.cluster_capacity(torch.cuda.current_device(), size)
    assert capacity > 0 or size > 8  # a portable cluster always fits
    if capacity == 0:
        pytest.skip(f"this GPU holds no cluster of {size} one-CTA-per-SM CTAs")
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=t, h=h, w=w, k=k, swa_bs=64, comp_bs=2, seed=23,
                                                      swa_blocks=4, comp_blocks=(k + 63) // 2 + 8)
    dev = [x.cuda() for x in (q, swa, si, comp, ci, sink)]
    _check_merge_variant(cute_attn, dev, sbs, cbs, _dense(q, swa, si, comp, ci, sink, sbs, cbs), splits,
                         cluster=cluster)
    with pytest.raises(ValueError, match="clusters of"):
        cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits, cluster=splits - 1)  # 1, or no divisor
    wide = torch.full((t, (cute_attn.MAX_CLUSTER + 1) * 64), -1, dtype=si.dtype, device="cuda")
    with pytest.raises(ValueError, match="clusters of"):
        cute_attn.sparse_attn(dev[0], dev[1], wide, None, None, dev[5], SCALE, sbs, cbs,
                              splits=cute_attn.MAX_CLUSTER + 1, cluster=True)


@pytest.mark.cuda
@pytest.mark.parametrize("groups,splits,t,h,w,k", [(2, 10, 2, 64, 128, 512), (4, 3, 7, 20, 80, 100),
                                                   (8, 2, 3, 128, 128, 0), (4, 3, 70, 80, 128, 256),
                                                   (8, 1, 3, 128, 128, 0), (2, 1, 7, 20, 80, 100),
                                                   (4, 1, 70, 80, 128, 256), (4, 6, 7, 80, 128, 256),
                                                   (8, 16, 2, 20, 128, 896), (8, 1, 7, 20, 128, 0)])
def test_sparse_attn_wgmma_value_groups_match_reference(groups, splits, t, h, w, k):
    """Each split (or the unsplit CTA: one split) as ``groups`` CTAs, one slice of the value dims
    apiece, merged by the combine kernel, within clusters of each group's splits (up to 16), or (ten /
    six splits) in clusters of five / three and two into partials: the reference's result and, within
    one bf16 rounding, the one-CTA-a-split result over the same splits; the same bits when run again;
    partial head blocks (20, 80 heads), 128 heads, the SWA-only layer, a row without candidates, a −inf
    sink, more CTAs than one wave (70 tokens). Groups outside ``GROUPS`` are ValueErrors."""
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=t, h=h, w=w, k=k, swa_bs=64, comp_bs=2, seed=41,
                                                      with_comp=k > 0, swa_blocks=4, comp_blocks=(k + 63) // 2 + 8)
    dev = [x.cuda() if x is not None else None for x in (q, swa, si, comp, ci, sink)]
    want = _dense(q, swa, si, comp, ci, sink, sbs, cbs)
    _check_merge_variant(cute_attn, dev, sbs, cbs, want, splits, groups=groups)
    if splits > 1:  # each group's splits merged within one cluster, or (ten splits) runs of five into partials
        _check_merge_variant(cute_attn, dev, sbs, cbs, want, splits, groups=groups, cluster=True)
    for run in {10: (5,), 6: (3, 2)}.get(splits, ()):
        _check_merge_variant(cute_attn, dev, sbs, cbs, want, splits, groups=groups, cluster=run)
    with pytest.raises(ValueError, match="value-dim groups"):
        cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=splits, groups=3)


def test_sparse_attn_wgmma_value_groups_rejected_at_compile():
    """No GPU needed: a variant compiles only for ``GROUPS`` value-dim groups, a cluster merge only for
    splits and a cluster's partial only with a cluster."""
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("CuTe DSL not installed")
    from cutlass import Int32

    from dsv4_compile.kernels.cute import sparse_attn as cute_attn

    for split, cluster, part, groups, match in ((False, 0, False, 5, "value-dim groups"),
                                                (True, 0, False, 3, "value-dim groups"),
                                                (True, 0, False, 16, "value-dim groups"),
                                                (False, 2, False, 2, "without splits"),
                                                (True, 0, True, 1, "without splits")):
        with pytest.raises(ValueError, match=match):
            cute_attn.SparseAttnKernel.compile(64, 64, True, split, Int32, True, "sm_90a", cluster=cluster,
                                               cluster_part=part, groups=groups)


@pytest.mark.cuda
@pytest.mark.parametrize("t,k,h200_plan", [(64, 512, (2, 2, 1)), (8, 512, (5, 5, 2)), (1, 512, (10, 10, 4)),
                                           (4, 512, (10, 5, 2)), (16, 0, (1, 0, 8)), (32, 0, (1, 0, 4)),
                                           (8, 0, (2, 2, 4)), (1, 0, (2, 0, 8))])
def test_sparse_attn_wgmma_default_merge(t, k, h200_plan):
    """The op's default plan on an H200 (132 SMs), (splits, cluster size, value-dim groups). V4-Flash
    CSA (640 candidates): at B = 64 two splits of five tiles, merged within one cluster of both; at B
    = 8 five two-tile splits as two groups each (ten one-tile splits would merge in clusters of 5: 8
    clusters of 10 do not fit at once), each group's merged in a cluster of 5; at B = 1 ten one-tile
    splits as four groups, each group's merged in a cluster of 10; at B = 4 ten as two groups, each
    group's in runs of 5 into partials (8 clusters of 10 do not fit). SWA-only (128 candidates): at B =
    16 / 32 unsplit as 8 / 4 groups, at B = 8 two splits as four groups, merged in clusters of 2, at B
    = 1 as eight groups through the combine kernel (16 CTAs). The default
    equals the forced plan bit for bit and the reference's result; split, it is within one bf16
    rounding of the combine kernel's over the same splits, each one CTA (one group, no cluster);
    unsplit, it equals the one-CTA result bit for bit (a group computes its value dims as that CTA
    does)."""
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=t, h=64, w=128, k=k, swa_bs=64, comp_bs=2, seed=29,
                                                      with_comp=k > 0, swa_blocks=4, comp_blocks=264)
    dev = [x.cuda() if x is not None else None for x in (q, swa, si, comp, ci, sink)]
    index = dev[0].device.index
    n_split, _, size, groups, _ = cute_attn.launch_plan(t, 64, 128 + k, sm_programs(dev[0].device), index)
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:
        assert (n_split, size, groups) == h200_plan
    default = cute_attn.sparse_attn(*dev, SCALE, sbs, cbs)
    forced = dict(groups=groups, cluster=size or False)
    assert torch.equal(default, cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=n_split, **forced))
    _assert_close_bf16(default.cpu(), _dense(q, swa, si, comp, ci, sink, sbs, cbs))
    one_cta = cute_attn.sparse_attn(*dev, SCALE, sbs, cbs, splits=n_split, cluster=False, groups=1)
    if n_split > 1:
        _assert_one_bf16_rounding(default, one_cta.float())
    else:
        assert torch.equal(default, one_cta)
    if t > 4:
        assert bool((default[4] == 0).all())  # row 4 has no candidate


@pytest.mark.cuda
def test_sparse_attn_wgmma_kernel_edge_inputs():
    """A query view 2 bytes into its storage (copied to aligned rows, not rejected), int32 SWA with
    int64 compressed indices one of which lies past the cache beyond 2^32 (skipped, not wrapped), a
    compressed cache without pages, and no candidates at all (zeros, also with a −inf sink)."""
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    q, swa, si, comp, ci, sink, sbs, cbs = _attn_case(t=6, h=64, w=40, k=60, swa_bs=16, comp_bs=2, seed=17,
                                                      swa_blocks=4, comp_blocks=40)
    want = _dense(q, swa, si, comp, ci, sink, sbs, cbs)
    store = torch.zeros(q.numel() + 1, dtype=torch.bfloat16, device="cuda")
    q_odd = store[1:].view(q.shape)
    q_odd.copy_(q.cuda())
    assert q_odd.data_ptr() % 16 != 0
    dev = [x.cuda() for x in (swa, si, comp)]
    got = cute_attn.sparse_attn(q_odd, *dev, ci.cuda(), sink.cuda(), SCALE, sbs, cbs)
    _assert_close_bf16(got.cpu(), want)
    far = ci.long()
    far[1, 0] = 2**32 + 3  # row 1 has no compressed candidate; past the cache, as int32 it would be slot 3
    assert int(ci[1, 0]) == -1
    a = cute_attn.sparse_attn(q.cuda(), *dev, ci.long().cuda(), sink.cuda(), SCALE, sbs, cbs)
    b = cute_attn.sparse_attn(q.cuda(), *dev, far.cuda(), sink.cuda(), SCALE, sbs, cbs)
    assert torch.equal(a, b)
    no_pages = comp[:0].cuda()
    want_swa = _dense(q, swa, si, None, None, sink, sbs, cbs)
    _assert_close_bf16(cute_attn.sparse_attn(q.cuda(), dev[0], dev[1], no_pages, ci.cuda(), sink.cuda(), SCALE, sbs,
                                             cbs).cpu(), want_swa)
    for s in (sink, torch.full_like(sink, float("-inf"))):
        empty = cute_attn.sparse_attn(q.cuda(), dev[0], si[:, :0].cuda(), None, None, s.cuda(), SCALE, sbs, cbs)
        assert bool((empty == 0).all())

@pytest.mark.cuda
def test_sparse_attn_wgmma_kernel_swa_only_skips_past_the_cache_and_is_the_op():
    cute_attn = _cute_attn()
    if cute_attn is None:
        pytest.skip("needs CuTe DSL on a Hopper GPU")
    q, swa, si, _, _, sink, sbs, _ = _attn_case(t=12, h=64, w=128, swa_bs=64, seed=13, with_comp=False)
    past = si.clone()
    past[past < 0] = swa.shape[0] * sbs + 7  # beyond the cache: skipped like −1, never read
    want = _dense(q, swa, si, None, None, sink, sbs, 64)
    dev = lambda *xs: [x.cuda() for x in xs]  # noqa: E731
    a = cute_attn.sparse_attn(*dev(q, swa, si), None, None, sink.cuda(), SCALE, sbs, 64)
    b = cute_attn.sparse_attn(*dev(q, swa, past), None, None, sink.cuda(), SCALE, sbs, 64)
    _assert_close_bf16(a.cpu(), want)
    assert torch.equal(a, b)
    assert cute_attn.preferred(q.cuda(), si.shape[1])
    assert torch.equal(dsv4.sparse_attn(*dev(q, swa, si), None, None, sink.cuda(), SCALE, sbs, 64), a)
    # a cache view 8 bytes into its storage cannot feed 16-byte cp.async: the op takes the Triton kernel
    odd = torch.zeros(swa.shape[0], swa.shape[1] + 8, dtype=torch.uint8, device="cuda")[:, 8:]
    odd.copy_(swa.cuda())
    assert not cute_attn.supports(q.cuda(), odd, None)
    _assert_close_bf16(dsv4.sparse_attn(q.cuda(), odd, si.cuda(), None, None, sink.cuda(), SCALE, sbs, 64).cpu(), want)

@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_indexer_topk_gpu_matches_torch_topk(fmt):
    case = _topk_case(fmt, h=64, bs=64, n_req=3, blocks_per_req=40, seed=2)
    q, qs, w, cache, table, req, _, bs = case
    pos = torch.tensor([10239, 5000, 4000, 3, 2047, -1, 600])
    case = (q, qs, w, cache, table, req, pos, bs)
    dev = _on("cuda", case)
    want, abs_terms = _dense_logits(*case, fmt, abs_terms=True)
    slack = [_logit_bound("cuda") * a for a in abs_terms]
    for topk in (512, 1024):
        _check_topk(dsv4.indexer_topk(*dev, fmt, topk).cpu(), want, topk, slack_rows=slack)


@pytest.mark.cuda
def test_cuda_graph_replay_of_topk_and_attention():
    case = [x.cuda() if isinstance(x, torch.Tensor) else x for x in _topk_case("fp8", h=64, bs=64, blocks_per_req=8)]
    a = [x.cuda() if isinstance(x, torch.Tensor) else x for x in _attn_case(t=7, h=64, w=128, k=64, swa_bs=64,
                                                                            comp_bs=64)]

    def step():
        sel = dsv4.indexer_topk(*case, "fp8", 64)
        return sel, dsv4.sparse_attn(*a[:6], SCALE, *a[6:])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_sel, static_out = step()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        a[0].copy_((torch.randn(a[0].shape, generator=g) * 0.5).bfloat16())
        case[2].copy_(torch.rand(case[2].shape, generator=g) + 0.1)
        graph.replay()
        sel, out = step()
        assert torch.equal(static_sel, sel)
        assert torch.equal(static_out, out)

"""The compressor: exact building blocks (exp, tree sums, RMSNorm), window pooling against an
independent float64 recomputation, chunk / step invariance of the written bytes, the fused op ==
the plain chain, Triton kernels bit-exact with the reference, opcheck and ValueErrors."""

import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile import layouts
from dsv4_compile.kernels.triton import compressor as kernels
from dsv4_compile.reference import compressor as ref
from dsv4_compile.rope import cos_sin_cache

dsv4 = torch.ops.dsv4
SENTINEL = 165
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (ratio, head dim, cache format, hadamard)
KINDS = [(4, 512, "fp8_ds_mla", False), (4, 128, "fp8", True), (4, 128, "mxfp4", False), (128, 512, "fp8_ds_mla", False),
         (128, 128, "mxfp4", True)]


def test_exp_fp32_accuracy_and_edges():
    x = torch.cat((-torch.rand(100000, generator=torch.Generator().manual_seed(0)) * 87, torch.tensor([0.0, -0.0])))
    got = ref.exp_fp32(x).double()
    want = torch.exp(x.double())
    assert float(((got - want) / want).abs().max()) < 4e-7  # ~3 fp32 ulps
    edge = ref.exp_fp32(torch.tensor([float("-inf"), -200.0, -88.0]))
    assert edge.tolist() == [0.0, 0.0, 0.0]  # below 2^-126 flushes to 0


def test_tree_sum_order_and_padding():
    x = torch.tensor([[1e8, 1.0, -1e8, 1.0, 3.0]])
    # ((1e8 + 1) + (-1e8 + 1)) + (3 + 0 + 0): adjacent pairs, zero padded to 8
    a, b = torch.tensor(1e8) + 1.0, torch.tensor(-1e8) + 1.0
    assert ref.tree_sum(x, 1).item() == ((a + b) + torch.tensor(3.0)).item()


def test_rms_norm_matches_float64_formula(kernel_device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 512, generator=g) * 5
    w = torch.randn(512, generator=g).bfloat16()
    got = dsv4.rms_norm(x, w, 1e-6)
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    for d, dtype in ((512, torch.float32), (1024, torch.bfloat16), (1536, torch.bfloat16)):  # 1536: not a power of 2
        xi = torch.randn(5, d, generator=g).to(dtype)
        wi = torch.randn(d, generator=g).bfloat16()
        assert torch.equal(kernels.rms_norm(xi.to(kernel_device), wi.to(kernel_device), 1e-6).cpu(),
                           ref.rms_norm(xi, wi, 1e-6))


class Sequence:
    """One or more requests' compressor inputs, and the metadata a runtime builds for a step."""

    def __init__(self, r, d, fmt, lengths, seed=0, bs=16, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.r, self.d, self.fmt, self.bs, self.device = r, d, fmt, bs, device
        coff = layouts.compress_overlap(r)
        self.w = coff * d
        self.sbs = 4 if r == 4 else 8
        self.kv_score = [torch.randn(n, 2 * self.w, generator=g) * 2 for n in lengths]
        self.ape = torch.randn(r, self.w, generator=g)
        self.norm_w = torch.randn(d, generator=g).bfloat16()
        self.cs = cos_sin_cache(64, 4096, 160000.0)
        pages = [-(-n // self.sbs) for n in lengths]
        self.n_state_pages = sum(pages) + 2
        perm = torch.randperm(self.n_state_pages, generator=g)
        width = max(pages)
        self.block_table = torch.full((len(lengths), width), -1, dtype=torch.int32)
        used = 0
        for i, p in enumerate(pages):
            self.block_table[i, :p] = perm[used : used + p].int()
            used += p
        entries = [n // r for n in lengths]
        self.n_pages = max(2, -(-sum(entries) // bs) + 1)
        self.entry_base = [sum(entries[:i]) for i in range(len(lengths))]
        self.entry_perm = torch.randperm(self.n_pages * bs, generator=g)

    def caches(self):
        st = torch.full((self.n_state_pages, layouts.compressor_state_page_bytes(self.r, self.d, self.sbs)), SENTINEL,
                        dtype=torch.uint8, device=self.device)
        cache = torch.full((self.n_pages, layouts.page_bytes(self.fmt, self.bs)), SENTINEL, dtype=torch.uint8,
                           device=self.device)
        return st, cache

    def step(self, spans, pad=0):
        """Args for a step covering ``spans = [(request, start, end)]`` plus ``pad`` padding tokens."""
        rows, pos, req = [], [], []
        for i, a, b in spans:
            rows.append(self.kv_score[i][a:b])
            pos.append(torch.arange(a, b))
            req.append(torch.full((b - a,), i))
        rows.append(torch.zeros(pad, 2 * self.w))
        pos.append(torch.zeros(pad, dtype=torch.int64))
        req.append(torch.full((pad,), -1))
        ks, p, rq = torch.cat(rows), torch.cat(pos), torch.cat(req)
        valid = rq >= 0
        rq0 = rq.clamp(min=0)
        page = self.block_table[rq0, torch.div(p, self.sbs, rounding_mode="floor")].long()
        sslot = torch.where(valid, page * self.sbs + p % self.sbs, -1)
        entry = torch.tensor(self.entry_base)[rq0] + torch.div(p, self.r, rounding_mode="floor")
        closes = valid & ((p + 1) % self.r == 0)
        slot = torch.where(closes, self.entry_perm[entry.clamp(max=self.entry_perm.numel() - 1)], -1)
        dev = self.device
        return dict(kv_score=ks.to(dev), positions=p.to(dev), ape=self.ape.to(dev), state_slot_mapping=sslot.to(dev),
                    state_block_table=self.block_table.to(dev), token_to_req=rq.to(dev),
                    state_block_size=self.sbs, norm_weight=self.norm_w.to(dev), eps=1e-6,
                    cos_sin_cache=self.cs.to(dev), slot_mapping=slot.to(dev), block_size=self.bs, fmt=self.fmt)


def _run(seq, steps, impl, hadamard=False):
    st, cache = seq.caches()
    for spans, pad in steps:
        a = seq.step(spans, pad)
        impl(a["kv_score"], a["positions"], a["ape"], st, a["state_slot_mapping"], a["state_block_table"],
             a["token_to_req"], a["state_block_size"], a["norm_weight"], a["eps"], a["cos_sin_cache"], cache,
             a["slot_mapping"], a["block_size"], a["fmt"], hadamard)
    return st, cache


def _pool_float64(seq, request, p):
    """Independent recomputation: the entry closed at position p, in float64, from the raw inputs."""
    r, d, w = seq.r, seq.d, seq.w
    rows = (2 if r == 4 else 1) * r
    ks = seq.kv_score[request].double()
    ape = seq.ape.double()
    kv_rows, sc_rows = [], []
    for j in range(rows):
        q = p - rows + 1 + j
        if q < 0:
            continue
        half = d if (r == 4 and j >= rows - r) else 0
        kv_rows.append(ks[q, half : half + d])
        sc_rows.append(ks[q, w + half : w + half + d] + ape[q % r, half : half + d])
    kv, sc = torch.stack(kv_rows), torch.stack(sc_rows)
    return (torch.softmax(sc, 0) * kv).sum(0)


@pytest.mark.parametrize("r,d", [(4, 512), (4, 128), (128, 128)])
def test_pool_matches_float64_recomputation(r, d):
    seq = Sequence(r, d, "fp8_ds_mla" if d == 512 else "fp8", [2 * r + 3, r + 1], seed=r + d)
    st, _ = seq.caches()
    a = seq.step([(0, 0, 2 * r + 3), (1, 0, r + 1)])
    dsv4.compressor_state_save(a["kv_score"], a["positions"], a["ape"], st, a["state_slot_mapping"], seq.sbs)
    pooled = dsv4.compressor_pool(st, a["positions"], a["state_block_table"], a["token_to_req"], seq.sbs, r, d)
    checked = 0
    for t in range(pooled.shape[0]):
        p, req = int(a["positions"][t]), int(a["token_to_req"][t])
        if (p + 1) % r:
            assert bool((pooled[t] == 0).all())
            continue
        want = _pool_float64(seq, req, p)
        assert torch.allclose(pooled[t].double(), want, rtol=1e-5, atol=1e-6), (t, p)
        checked += 1
    assert checked == 3  # entries 0 and 1 of request 0, entry 0 of request 1
    # the state rows hold [kv | score + ape[p % r]]
    t = 5
    row = st.view(torch.float32)[int(a["state_slot_mapping"][t]) // seq.sbs]
    k = int(a["state_slot_mapping"][t]) % seq.sbs
    got = row[k * 2 * seq.w : (k + 1) * 2 * seq.w]
    want = torch.cat((seq.kv_score[0][5, : seq.w], seq.kv_score[0][5, seq.w :] + seq.ape[5 % r]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", range(len(KINDS)))
def test_bytes_identical_in_one_prefill_in_chunks_and_token_by_token(kind):
    r, d, fmt, had = KINDS[kind]
    n = 2 * r + r // 2 + 1 if r == 128 else 23
    seq = Sequence(r, d, fmt, [n], seed=kind)
    impl = dsv4.compressor_insert
    one = _run(seq, [([(0, 0, n)], 0)], impl, had)
    g = torch.Generator().manual_seed(kind)
    cuts = sorted(torch.randperm(n - 1, generator=g)[:4].add(1).tolist())
    bounds = [0] + cuts + [n]
    chunks = _run(seq, [([(0, a, b)], 0) for a, b in zip(bounds, bounds[1:])], impl, had)
    tokens = _run(seq, [([(0, p, p + 1)], 1) for p in range(n)] if r == 4 else
                  [([(0, 0, n - 9)], 0)] + [([(0, p, p + 1)], 2) for p in range(n - 9, n)], impl, had)
    for a, b in ((one, chunks), (one, tokens)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int((one[1] != SENTINEL).sum()) > 0


@pytest.mark.parametrize("kind", [0, 1, 3])
def test_fused_equals_plain_chain(kind):
    r, d, fmt, had = KINDS[kind]
    seq = Sequence(r, d, fmt, [2 * r + 5, r + 2], seed=10 + kind)
    steps = [([(0, 0, r + 3), (1, 0, r)], 3), ([(0, r + 3, 2 * r + 5), (1, r, r + 2)], 0)]

    def chain(kv_score, positions, ape, st, sslot, bt, req, sbs, w, eps, cs, cache, slot, bs, fmt, hadamard):
        dsv4.compressor_state_save(kv_score, positions, ape, st, sslot, sbs)
        pooled = dsv4.compressor_pool(st, positions, bt, req, sbs, r, d)
        y = dsv4.rope(dsv4.rms_norm(pooled, w, eps), positions // r * r, cs).to(torch.bfloat16)
        if hadamard:
            y = dsv4.hadamard(y, d**-0.5)
        if fmt == "fp8_ds_mla":
            dsv4.kv_insert(y, cache, slot, bs)
        else:
            dsv4.indexer_k_insert(y, cache, slot, bs, fmt)

    fused = _run(seq, steps, dsv4.compressor_insert, had)
    plain = _run(seq, steps, chain, had)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])


def test_padding_tokens_and_untouched_bytes():
    seq = Sequence(4, 512, "fp8_ds_mla", [8], seed=3)
    st0, c0 = seq.caches()
    st, cache = _run(seq, [([(0, 0, 8)], 5)], dsv4.compressor_insert)
    a = seq.step([(0, 0, 8)], 5)
    # only the 8 state rows and the 2 entries were written
    row = 4 * 2 * seq.w
    state_written = torch.zeros_like(st, dtype=torch.bool)
    for s in a["state_slot_mapping"][:8].tolist():
        state_written[s // seq.sbs, (s % seq.sbs) * row : (s % seq.sbs + 1) * row] = True
    assert torch.equal(st[~state_written], st0[~state_written])
    assert int((cache != c0).sum()) <= 2 * 584 and int((cache != c0).sum()) > 1000


def _kernel_case(kind, device, lengths, steps, seed, bs=16):
    r, d, fmt, had = KINDS[kind]
    seq_ref = Sequence(r, d, fmt, lengths, seed=seed, bs=bs)
    seq_dev = Sequence(r, d, fmt, lengths, seed=seed, device=device, bs=bs)
    want = _run(seq_ref, steps, ref.compressor_insert, had)
    got = _run(seq_dev, steps, kernels.compressor_insert, had)
    assert torch.equal(got[0].cpu(), want[0]), "state cache"
    assert torch.equal(got[1].cpu(), want[1]), "compressed cache"
    # the primitive kernels on the final state: pool of every token
    a = seq_ref.step([(i, 0, n) for i, n in enumerate(lengths)], 2)
    pooled_want = ref.pool(want[0], a["positions"], a["state_block_table"], a["token_to_req"], seq_ref.sbs, r, d)
    pooled_got = kernels.pool(got[0], a["positions"].to(device), a["state_block_table"].to(device),
                              a["token_to_req"].to(device), seq_ref.sbs, r, d)
    assert torch.equal(pooled_got.cpu(), pooled_want)


@pytest.mark.parametrize("kind", range(len(KINDS)))
def test_kernels_match_reference(kernel_device, kind):
    r = KINDS[kind][0]
    n = 11 if r == 4 else 130
    _kernel_case(kind, kernel_device, [n, 5], [([(0, 0, n - 3), (1, 0, 3)], 1), ([(0, n - 3, n), (1, 3, 5)], 0)], kind)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", range(len(KINDS)))
@pytest.mark.parametrize("t", [1, 7, 64, 1000])
@pytest.mark.parametrize("bs", [16, 64])
def test_kernels_match_reference_gpu(kind, t, bs):
    # a t-token prefill, then a decode step of one token per request
    steps = [([(0, 0, t)], 3), ([(0, t, t + 1), (1, 0, 1)], 1)]
    _kernel_case(kind, "cuda", [t + 1, 1], steps, seed=t + kind, bs=bs)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", [0, 1, 3])
def test_cuda_graph_replay_of_compressor_matches_eager(kind):
    """A decode step (4 requests + 1 padding token) captured once and replayed over 8 steps that
    cross window boundaries writes the same state and cache bytes as eager calls."""
    r, d, fmt, had = KINDS[kind]
    n_req, prefill, n_steps = 4, (9 if r == 4 else 250), 8
    seq = Sequence(r, d, fmt, [prefill + n_steps] * n_req, seed=kind, device="cuda", bs=64)
    graph_caches, eager_caches = seq.caches(), seq.caches()
    first = seq.step([(i, 0, prefill) for i in range(n_req)])
    order = ("kv_score", "positions", "ape", "state_cache", "state_slot_mapping", "state_block_table", "token_to_req",
             "state_block_size", "norm_weight", "eps", "cos_sin_cache", "cache", "slot_mapping", "block_size", "fmt")

    def call(a, caches):
        kw = dict(a, state_cache=caches[0], cache=caches[1])
        dsv4.compressor_insert(*(kw[k] for k in order), had)

    for caches in (graph_caches, eager_caches):
        call(first, caches)
    decode = [seq.step([(i, prefill + k, prefill + k + 1) for i in range(n_req)], pad=1) for k in range(n_steps)]
    static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in decode[0].items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(static, graph_caches)  # warm-up (step 0's writes; the replay of step 0 rewrites the same bytes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(static, graph_caches)
    for a in decode:
        for k in ("kv_score", "positions", "state_slot_mapping", "token_to_req", "slot_mapping"):
            static[k].copy_(a[k])
        graph.replay()
        call(a, eager_caches)
    torch.cuda.synchronize()
    assert torch.equal(graph_caches[0], eager_caches[0]) and torch.equal(graph_caches[1], eager_caches[1])
    assert int((graph_caches[1] != SENTINEL).sum()) > 0


# --- op contract --------------------------------------------------------------------------------
def _op_cases(device):
    seq = Sequence(4, 128, "fp8", [9], seed=5, device=device)
    st, cache = seq.caches()
    a = seq.step([(0, 0, 9)], 1)
    save = (a["kv_score"], a["positions"], a["ape"], st, a["state_slot_mapping"], seq.sbs)
    dsv4.compressor_state_save(*save)
    x = torch.randn(4, 512, device=device)
    return [
        (dsv4.rms_norm.default, (x, torch.randn(512, device=device).bfloat16(), 1e-6)),
        (dsv4.rms_norm.default, (x.bfloat16(), torch.randn(512, device=device), 1e-5)),
        (dsv4.compressor_state_save.default, save),
        (dsv4.compressor_pool.default, (st, a["positions"], a["state_block_table"], a["token_to_req"], seq.sbs, 4, 128)),
        (dsv4.compressor_insert.default, tuple(a[k] for k in ("kv_score", "positions", "ape")) + (
            st, a["state_slot_mapping"], a["state_block_table"], a["token_to_req"], seq.sbs, a["norm_weight"], 1e-6,
            a["cos_sin_cache"], cache, a["slot_mapping"], seq.bs, "fp8", True)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(5))
def test_opcheck(device, case):
    op, args = _op_cases(device)[case]
    torch.library.opcheck(op, args)


def test_bad_inputs_raise_value_error():
    seq = Sequence(4, 128, "fp8", [9], seed=5)
    st, cache = seq.caches()
    a = seq.step([(0, 0, 9)])

    def insert(**over):
        kw = dict(a, state_cache=st, cache=cache, hadamard=False)
        kw.update(over)
        dsv4.compressor_insert(**kw)

    cases = [
        lambda: insert(ape=seq.ape[:3]),  # ratio 3
        lambda: insert(kv_score=a["kv_score"][:, :100]),
        lambda: insert(state_cache=st[:, :100]),  # state pages too small
        lambda: insert(state_cache=st[:, 1:]),  # not fp32-addressable
        lambda: insert(state_block_table=a["state_block_table"].long()),
        lambda: insert(token_to_req=a["token_to_req"][:3]),
        lambda: insert(norm_weight=seq.norm_w[:64]),
        lambda: insert(eps=0.0),
        lambda: insert(fmt="fp8_ds_mla"),  # head 128 needs an indexer format
        lambda: insert(slot_mapping=a["slot_mapping"] + 10**6),
        lambda: insert(cos_sin_cache=cos_sin_cache(32, 4096, 1e4)),
        lambda: dsv4.rms_norm(torch.ones(3, 8), torch.ones(4), 1e-6),
        lambda: dsv4.compressor_pool(st, a["positions"], a["state_block_table"], a["token_to_req"], 4, 4, 256),
    ]
    for i, bad in enumerate(cases):
        with pytest.raises(ValueError):
            bad()
            pytest.fail(f"case {i} did not raise")

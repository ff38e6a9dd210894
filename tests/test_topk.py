"""The GPU top-k of ``indexer_topk`` (``kernels/triton/topk.py``): the radix select against
``reference.select_topk`` (a stable descending ``torch.sort``) bit for bit on the same logits, with
ties, NaN, ±0, −inf, rows shorter than k, padding rows, rows split over several programs and several
rounds, and garbage past each row's visible count (never read). Small shapes under the interpreter;
the long-row shapes (a 1M-token context) on the GPU."""

import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile.kernels.triton import topk as topk_kernels
from dsv4_compile.reference import attention as ref


def _case(T, L, seed, levels=None, device="cpu"):
    """fp32 logits ``[T, L]`` (``levels`` distinct values when given: many ties), positions and rows
    with every kind of row: all of ``L`` visible, random lengths, n == 0, padding."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        logits = torch.randint(0, levels, (T, L), generator=g).float() - levels // 2
    else:
        logits = torch.randn(T, L, generator=g)
    pos = torch.randint(0, 4 * L + 8, (T,), generator=g)
    pos[0] = 4 * L + 3          # more than L visible: capped at L
    req = torch.zeros(T, dtype=torch.int64)
    if T > 3:
        pos[1] = 2              # n = 0
        req[2] = -1             # padding token
        pos[3] = -1             # padding position
    return logits.to(device), pos.to(device), req.to(device)


def _specials(logits, g):
    """NaN, −0.0, +0.0 and −inf at random places."""
    x = logits.clone()
    for v in (float("nan"), -0.0, 0.0, float("-inf")):
        m = torch.rand(x.shape, generator=g) < 0.03
        x[m.to(x.device)] = v
    return x


def _run(logits, pos, req, k, chunk=None, max_chunk=topk_kernels.MAX_CHUNK, sms=8):
    """Every selection variant of the device (the looped one with 16-entry sub-blocks on the CPU:
    several per chunk; the CuTe one on a GPU where CuTe DSL runs)."""
    got = _run_variant(logits, pos, req, k, chunk, max_chunk, sms, "registers", 1024)
    looped = _run_variant(logits, pos, req, k, chunk, max_chunk, sms, "looped", 1024 if logits.is_cuda else 16)
    assert torch.equal(got, looped)
    if _cute_runs(logits.device):  # the default (a cluster where the plan splits a row), and the rounds
        for cluster in (None, 0):
            assert torch.equal(_run_variant(logits, pos, req, k, chunk, max_chunk, sms, "cute", 0, cluster), got)
    return got


def _cute_runs(device):
    from dsv4_compile.kernels.cute._common import backend

    return device.type == "cuda" and backend(device) == "cute"


def _run_variant(logits, pos, req, k, chunk, max_chunk, sms, variant, sub, cluster=None):
    n = ref.visible_entries(pos, req, 1, 4, logits.shape[1])
    want = ref.select_topk(logits, n, k)
    # what lies past each row's visible count must never be read: NaN there would win every row
    poisoned = torch.where(torch.arange(logits.shape[1], device=logits.device)[None, :] < n[:, None], logits,
                           float("nan"))
    got = topk_kernels.select_topk(poisoned, pos, req, 1, 4, k, sms, chunk=chunk, max_chunk=max_chunk,
                                   variant=variant, sub=sub, **({} if cluster is None else {"cluster": cluster}))
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), (got, want)
    return got


@pytest.mark.parametrize("levels", [None, 3, 40])
@pytest.mark.parametrize("k", [1, 8, 37])
def test_one_round_matches_the_reference(kernel_device, levels, k):
    logits, pos, req = _case(9, 150, seed=k + (levels or 0), levels=levels, device=kernel_device)
    _run(logits, pos, req, k)


def test_specials_ties_nan_signed_zero_and_inf(kernel_device):
    g = torch.Generator().manual_seed(3)
    logits, pos, req = _case(8, 120, seed=3, levels=5)
    logits = _specials(logits, g).to(kernel_device)
    for k in (4, 16, 119):
        _run(logits, pos.to(kernel_device), req.to(kernel_device), k)


@pytest.mark.parametrize("chunk", [16, 32])
def test_rows_split_over_programs_and_rounds(kernel_device, chunk):
    """``chunk`` splits every row into chunks of that many entries; ``max_chunk = 32`` forces more
    rounds over the candidates (plans checked below)."""
    g = torch.Generator().manual_seed(5)
    logits, pos, req = _case(6, 300, seed=5, levels=7)
    logits = _specials(logits, g).to(kernel_device)
    pos, req = pos.to(kernel_device), req.to(kernel_device)
    for k in (3, 8):
        _run(logits, pos, req, k, chunk=chunk)
        _run(logits, pos, req, k, chunk=chunk, max_chunk=32)
    assert topk_kernels.plan(6, 300, 8, 8, chunk=16) == [(16, 19), (256, 1)]
    assert topk_kernels.plan(6, 300, 8, 8, chunk=16, max_chunk=32) == [(16, 19), (32, 5), (32, 2), (16, 1)]


def test_all_equal_logits_keep_the_first_entries(kernel_device):
    logits = torch.zeros(3, 256, device=kernel_device)
    pos = torch.tensor([1023, 500, 40], device=kernel_device)
    req = torch.zeros(3, dtype=torch.int64, device=kernel_device)
    got = _run(logits, pos, req, 16, chunk=32)
    assert got[0].tolist() == list(range(16)) and got[2].tolist() == list(range(10)) + [-1] * 6
    logits[:, ::2] = -0.0  # −0.0 equals +0.0: still the first entries, not the +0.0 ones
    got = _run(logits, pos, req, 16, chunk=32)
    assert got[0].tolist() == list(range(16))


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_found_before_the_last_pass(kernel_device, ties):
    """The radix passes stop once the threshold's bin holds exactly the entries still needed: a few
    huge logits (one pass: their bin holds exactly k) or k − 2 huge ones plus two equal ones just
    below (a later pass), with distinct logits, ties and −0.0 around them; random positions of the
    big ones, against the reference."""
    g = torch.Generator().manual_seed(11)
    T, L, k = 5, 200, 6
    logits = torch.randn(T, L, generator=g)
    if ties:
        logits = logits.round()
        logits[:, ::7] = -0.0
    for t in range(T):
        where = torch.randperm(L, generator=g)[:k]
        logits[t, where[: k - 2]] = 1e30 * (1 + torch.arange(k - 2).float())
        logits[t, where[k - 2:]] = 1e30 if t % 2 else 3e29  # tie with a big one, or the next bin down
    pos = torch.full((T,), 4 * L + 3)
    req = torch.zeros(T, dtype=torch.int64)
    _run(logits.to(kernel_device), pos.to(kernel_device), req.to(kernel_device), k)
    _run(logits.to(kernel_device), pos.to(kernel_device), req.to(kernel_device), k, chunk=32)


def test_rows_in_every_block_class_of_a_long_chunk(kernel_device):
    """A 4,096-entry chunk selects a row of ``n`` live entries in a block of 256, 1,024, 2,048 or 4,096
    (the smallest class holding ``n``): one row per class and rows at the class edges, with ties."""
    L, k = 4096, 100
    lengths = [4096, 2049, 2048, 1900, 1025, 1000, 256, 200]
    g = torch.Generator().manual_seed(13)
    logits = (torch.randint(0, 60, (len(lengths), L), generator=g).float() - 30).to(kernel_device)
    pos = torch.tensor([4 * n - 1 for n in lengths], device=kernel_device)
    req = torch.zeros(len(lengths), dtype=torch.int64, device=kernel_device)
    assert topk_kernels.plan(len(lengths), L, k, 8) == [(4096, 1)]
    got = _run_variant(logits, pos, req, k, None, topk_kernels.MAX_CHUNK, 8, "registers", 1024)
    if _cute_runs(logits.device):  # rows that fill part of a thread's slots
        assert torch.equal(_run_variant(logits, pos, req, k, None, topk_kernels.MAX_CHUNK, 8, "cute", 0), got)


def test_plan_depends_on_shapes_only():
    assert topk_kernels.plan(1, 16384, 512, 132) == [(4096, 4), (2048, 1)]
    assert topk_kernels.plan(1, 262144, 512, 132) == [(16384, 16), (8192, 1)]
    assert topk_kernels.plan(4096, 16384, 512, 132) == [(16384, 1)]
    with pytest.raises(ValueError, match="at most"):
        topk_kernels.plan(1, 100000, 10000, 132)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        topk_kernels.plan(1, 1000, 8, 132, chunk=24)


@pytest.mark.cuda
@pytest.mark.parametrize("n_entries", [4096, 16384, 262144])
def test_gpu_long_rows(n_entries):
    """B = 1..8 rows up to a 1M-token context (262,144 entries), split over CTAs by the default
    plan (132 SMs), with ties and specials, against the reference on the same GPU logits."""
    g = torch.Generator().manual_seed(n_entries)
    for T, levels in ((1, None), (8, 50), (3, 2)):
        logits, pos, req = _case(T, n_entries, seed=T, levels=levels)
        logits = _specials(logits, g)
        pos[0] = 4 * n_entries - 1
        for k in (512, 1024):
            _run(logits.cuda(), pos.cuda(), req.cuda(), k, sms=torch.cuda.get_device_properties(0).multi_processor_count)


@pytest.mark.cuda
def test_gpu_key_ranges_narrow_and_wide():
    """The CuTe selection's first digit sits just below the chunk's common key prefix: rows whose
    keys differ only in their last bits (one pass), in the last bit alone, not at all, on one valid
    key, across the sign with ±inf and NaN (no common prefix), and around ±0; one row split over CTAs
    and rounds (16,384 entries) and 8 rows of 2,000 visible entries, against the reference."""
    L = 16384
    g = torch.Generator().manual_seed(7)
    one = torch.tensor(1.0)
    rows = {
        "last bits": one + torch.randint(0, 300, (L,), generator=g).float() * 2.0 ** -23,  # 1 + k·ulp
        "last bit": one + torch.randint(0, 2, (L,), generator=g).float() * 2.0 ** -23,
        "equal": torch.full((L,), 3.5),
        "one valid": torch.full((L,), float("-inf")).index_fill_(0, torch.tensor([4321]), 2.0),
        "signs": _specials(torch.randn(L, generator=g) * 1e3, g),
        "around zero": torch.randn(L, generator=g) * 1e-38,
        "magnitude": 100.0 + 50.0 * torch.rand(L, generator=g),  # logits of one magnitude
    }
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, row in rows.items():
        for T, n in ((1, L), (8, 2000)):
            logits = row[None, :].repeat(T, 1)
            pos = torch.full((T,), 4 * n - 1)
            req = torch.zeros(T, dtype=torch.int64)
            for k in (1, 512):
                _run(logits.cuda(), pos.cuda(), req.cuda(), k, sms=sms)


def test_cute_plan_cuts_wide_rows_into_small_chunks():
    """The CuTe selection's plan: rows of a 1M-token table split for want of rows go through
    first-round chunks of 4,096 entries (later ones of at most 8,192) while that makes at most two
    first-round CTAs per SM, else of 8,192 entries; other shapes keep the Triton plan."""
    pytest.importorskip("cutlass")
    from dsv4_compile.kernels.cute import topk as cute_topk

    assert cute_topk.plan(1, 262144, 512, 132) == [(4096, 64), (4096, 8), (4096, 1)]
    assert cute_topk.plan(4, 262144, 512, 132) == [(4096, 64), (4096, 8), (4096, 1)]  # 256 CTAs
    assert cute_topk.plan(4, 262144, 1024, 132) == [(4096, 64), (8192, 8), (8192, 1)]
    assert cute_topk.plan(5, 262144, 512, 132) == topk_kernels.plan(5, 262144, 512, 33, 8192)  # not 320 CTAs
    assert cute_topk.plan(16, 262144, 512, 132) == [(8192, 32), (16384, 1)]
    for T, L, k in ((17, 262144, 512), (4096, 262144, 512), (1, 65536, 512), (1, 16384, 512), (64, 16384, 512),
                    (1, 262144, 8192)):
        assert cute_topk.plan(T, L, k, 132) == topk_kernels.plan(T, L, k, 33), (T, L, k)


@pytest.mark.cuda
def test_gpu_short_rows_of_a_wide_table():
    """Rows of a 1M-token table (262,144 entries, split into rounds) whose visible entries fit in the
    first chunk are finished by that chunk's CTA and skipped by the later rounds, beside rows that
    span chunks and rounds: lengths around k, the chunk sizes and the whole row, the default plan and
    smaller first-round chunks (three rounds), with ties, against the reference."""
    L = 262144
    lengths = [0, 100, 512, 513, 2048, 4096, 4097, 16384, 16385, 100000, L]
    g = torch.Generator().manual_seed(17)
    logits = torch.randint(0, 1000, (len(lengths), L), generator=g).float()
    pos = torch.tensor([4 * n - 1 if n else 2 for n in lengths])
    req = torch.zeros(len(lengths), dtype=torch.int64)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for chunk in (None, 2048, 4096):
        for rows in (slice(None), slice(0, 3), slice(4, 5)):  # 11, 3 and 1 rows (each split into rounds)
            _run(logits[rows].cuda(), pos[rows].cuda(), req[rows].cuda(), 512, chunk=chunk, sms=sms)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 64])
def test_gpu_rows_at_any_alignment(T):
    """The CuTe rounds load a thread's consecutive keys 8 or 16 bytes at a time where the row is so
    aligned and one at a time where it is not: logits rows starting 0, 4, 8 and 12 bytes past a
    16-byte boundary (views at a storage offset, rows L + 1 apart), 4,096- and 16,384-entry chunks,
    and candidate rows of odd widths (k = 3, 5), with ties, against the reference; the rounds and
    the op's default (a cluster a row where it splits rows)."""
    L = 16384
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator().manual_seed(T)
    for off in range(4):
        store = (torch.randint(0, 4000, (T * (L + 1) + 4,), generator=g).float() / 7).cuda()
        logits = store[off:off + T * (L + 1)].view(T, L + 1)[:, :L]
        lengths = torch.randint(L // 2, L + 1, (T,), generator=g)
        lengths[0] = L
        for i, n in enumerate(lengths.tolist()):
            logits[i, n:] = float("nan")  # past the visible count: never read
        pos = (4 * lengths - 1).cuda()
        req = torch.zeros(T, dtype=torch.int64, device="cuda")
        for k in (3, 5, 512):
            want = ref.select_topk(logits.contiguous(), lengths.cuda(), k)
            for cluster in (None, 0):  # the default (one cluster a row at T = 1 / 8 on the H200), the rounds
                got = topk_kernels.select_topk(logits, pos, req, 1, 4, k, sms, variant="cute", cluster=cluster)
                assert torch.equal(got, want), (off, k, cluster)


@pytest.mark.cuda
def test_gpu_fused_rounds_match_separate_rounds_and_reset_their_counters():
    """The one-kernel selection (``TopkFusedKernel``: the last CTA of each group merges) against the
    rounds as separate kernels and the reference, rows ending at every level of a 1M-token table's
    plans (9 rows: two rounds; first-round chunks of 4,096 forced: three) and of a 64k table's
    two-round one, with the grid's CTAs each taking several of a row's chunks (the default at 9 rows,
    and 1 or 3 CTAs a row forced), twice in a row (the ticket counters are zero again after each selection), then
    replayed from a CUDA graph over new logits, captured with the device's counters and with fresh
    ones (a capture before any exist: a memset in the graph)."""
    from dsv4_compile.kernels import _device
    from dsv4_compile.kernels.cute import topk as cute_topk

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator().manual_seed(23)
    for L, lengths, chunk in ((262144, [0, 100, 4096, 4097, 20000, 32768, 32769, 100000, 262144], None),
                              (262144, [0, 100, 4096, 4097, 20000, 32768, 32769, 100000, 262144], 4096),
                              (16384, [0, 513, 4096, 4097, 9000, 16384], None)):
        T = len(lengths)
        pos = torch.tensor([4 * n - 1 if n else 2 for n in lengths], device="cuda")
        req = torch.zeros(T, dtype=torch.int64, device="cuda")
        n = torch.tensor(lengths, device="cuda")
        for k in (512, 1024):
            assert cute_topk.fused_plan(cute_topk.plan(T, L, k, sms, chunk), k) is not None  # one kernel
            for _ in range(2):
                logits = (torch.randint(0, 3000, (T, L), generator=g).float() / 3).cuda()
                want = ref.select_topk(logits, n, k)
                for fused, ctas in ((True, None), (True, 1), (True, 3), (False, None)):
                    got = torch.full((T, k), -7, dtype=torch.int32, device="cuda")  # every slot written
                    cute_topk.select_into(got, logits, pos, req, 1, 4, k, sms, chunk, pdl=False, fused=fused,
                                          ctas=ctas)
                    assert torch.equal(got, want), (L, chunk, k, fused, ctas)
                assert not _device.zeroed_counters(torch.device("cuda", 0), "topk", 1).any()
    # graph replay over new logits, with the counters already there and without any
    L, T, k = 65536, 4, 512
    pos = torch.full((T,), 4 * L - 1, device="cuda")
    req = torch.arange(T, device="cuda")
    logits = torch.empty(T, L, device="cuda")
    for counters in (_device._counters, {}):
        saved = _device._counters
        _device._counters = counters
        try:
            out = torch.empty(T, k, dtype=torch.int32, device="cuda")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                cute_topk.select_into(out, logits, pos, req, T, 4, k, sms, pdl=False, fused=True)
        finally:
            _device._counters = saved
        for _ in range(3):
            logits.copy_(torch.randn(T, L, generator=g))
            graph.replay()
            assert torch.equal(out, ref.select_topk(logits, torch.full((T,), L, device="cuda"), k))


@pytest.mark.cuda
@pytest.mark.parametrize("L", [16384, 9000, 65536, 1500])
def test_gpu_cluster_selection_matches_the_reference(L):
    """One round by a cluster (``TopkClusterKernel``) against the reference bit for bit: rows ending
    on either side of every CTA boundary and of ``k``, padding rows, n = 0, many ties at the
    threshold (3 / 40 distinct values), NaN / ±0 / −inf, NaN past each row's end (never read), for
    every cluster size whose CTAs hold 256..16,384 entries, the default rule's choice, and a CUDA
    graph replayed over new logits."""
    from dsv4_compile.kernels.cute import topk as cute_topk

    g = torch.Generator().manual_seed(L)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sizes = [n for n in (2, 3, 4, 8, 16) if 256 <= 1 << (-(-L // n) - 1).bit_length() <= cute_topk.MAX_CHUNK]
    for k in (512, 37, 1024):
        cuts = sorted({c * (1 << (-(-L // n) - 1).bit_length()) + d for n in sizes for c in range(1, n)
                       for d in (-1, 0, 1)} | {k - 1, k, k + 1, L - 1, L})
        cuts = [n for n in cuts if 0 < n < L - 1]
        lengths = cuts[::max(1, len(cuts) // 36)] + [L - 1, L, 0]
        T = len(lengths) + 1
        n = torch.tensor(lengths + [0])
        pos = torch.tensor([4 * m - 1 if m else 2 for m in lengths] + [4 * L - 1]).cuda()
        req = torch.zeros(T, dtype=torch.int64)
        req[-1] = -1  # padding
        req = req.cuda()
        for levels in (None, 3, 40):
            if levels:
                logits = torch.randint(0, levels, (T, L), generator=g).float()
            else:
                logits = _specials(torch.randn(T, L, generator=g), g)
            logits = torch.where(torch.arange(L)[None, :] < n[:, None], logits, float("nan")).cuda()
            want = ref.select_topk(logits, n.cuda(), k)
            for cluster in sizes + [None]:
                for pdl in (False, True):
                    got = torch.full((T, k), -7, dtype=torch.int32, device="cuda")  # every slot written
                    cute_topk.select_into(got, logits, pos, req, 1, 4, k, sms, pdl=pdl, cluster=cluster)
                    assert torch.equal(got, want), (L, k, levels, cluster, pdl)
            # rows starting at any 4-byte offset (the 8 / 16-byte loads fall back to element loads)
            wide = torch.full((T, L + 3), float("nan"), device="cuda")
            for off in (1, 3):
                wide[:, off:off + L] = logits
                got = torch.full((T, k), -7, dtype=torch.int32, device="cuda")
                cute_topk.select_into(got, wide[:, off:off + L], pos, req, 1, 4, k, sms, cluster=sizes[0])
                assert torch.equal(got, want), (L, k, levels, off)
    assert cute_topk.cluster_plan(1, 16384, cute_topk.plan(1, 16384, 512, sms), 0) is not None  # the default
    # graph replay over new logits
    T, k = 2, 512
    pos = torch.full((T,), 4 * L - 1, device="cuda")
    req = torch.zeros(T, dtype=torch.int64, device="cuda")
    logits = torch.empty(T, L, device="cuda")
    out = torch.empty(T, k, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cute_topk.select_into(out, logits, pos, req, 1, 4, k, sms, pdl=False, cluster=sizes[-1])
    for _ in range(2):
        logits.copy_(torch.randn(T, L, generator=g))
        graph.replay()
        assert torch.equal(out, ref.select_topk(logits, torch.full((T,), L, device="cuda"), k))


def test_cluster_plan_rule_and_errors(monkeypatch):
    """Where the selection takes one cluster a row (``cluster_plan``): rows the plan splits, at most
    ``CLUSTER_ROWS`` of them, ``ceil(L / CLUSTER_CHUNK)`` of 2 .. ``CLUSTER_CTAS`` CTAs a row whose
    clusters are resident at once; forced sizes and their errors."""
    pytest.importorskip("cutlass")
    from dsv4_compile.kernels.cute import sparse_attn as cute_attn
    from dsv4_compile.kernels.cute import topk as cute_topk

    monkeypatch.setattr(cute_attn, "cluster_capacity", lambda dev, n: 3 if n == 3 else 16)
    cp = cute_topk.cluster_plan
    c, most, rows = cute_topk.CLUSTER_CHUNK, cute_topk.CLUSTER_CTAS, cute_topk.CLUSTER_ROWS
    assert (c, most, rows) == (4096, 4, 4)  # a 64k-token context's 16,384-entry rows: four CTAs
    split, one = [(4096, 4), (2048, 1)], [(16384, 1)]
    assert cp(1, most * c, split, 0) == (c, most)
    assert cp(1, most * c - 5, split, 0) == (c, most)
    assert cp(rows, most * c, split, 0) == (c, most) and cp(rows + 1, most * c, split, 0) is None
    assert cp(3, 3 * c, split, 0) == (c, 3) and cp(4, 3 * c, split, 0) is None  # one wave of clusters
    assert cp(1, 2 * c, split, 0) == (c, 2)
    assert cp(1, most * c + 1, split, 0) is None  # more CTAs: the rounds
    assert cp(1, most * c, one, 0) is None  # an unsplit row: the one round
    assert cp(1, c, split, 0) is None  # one CTA's worth
    assert cp(1, most * c, split, 0, 0) is None
    assert cp(1, 16384, split, 0, 8) == (2048, 8) and cp(1, 9000, split, 0, 3) == (4096, 3)
    for T, L, n in ((1, 16384, 1), (1, 16384, 17), (1, 300000, 16), (1, 1000, 8), (65536, 16384, 4)):
        with pytest.raises(ValueError, match="clusters of"):
            cp(T, L, split, 0, n)


@pytest.mark.cuda
def test_gpu_many_rows_short_and_long():
    """Prefill-like: 300 rows of causal lengths (most shorter than k, some long), one round."""
    T, L = 300, 16384
    logits = torch.randn(T, L, device="cuda")
    pos = torch.linspace(0, 4 * L - 1, T, device="cuda").long()
    req = torch.zeros(T, dtype=torch.int64, device="cuda")
    _run(logits, pos, req, 512, sms=132)


def test_select_variant_defaults_and_errors(monkeypatch):
    """The default follows the kernel backend (``registers`` off CUDA / without CuTe DSL); the
    environment variable forces a variant; ``cute`` off CUDA and unknown names are ValueErrors."""
    from dsv4_compile.kernels.cute import _common

    cpu = torch.device("cpu")
    monkeypatch.delenv(topk_kernels.VARIANT_ENV, raising=False)
    assert topk_kernels.select_variant(cpu) == "registers"
    monkeypatch.setattr(_common, "HAVE_CUTE", True)
    monkeypatch.setattr(_common, "device_capability", lambda index: (9, 0))
    assert topk_kernels.select_variant(torch.device("cuda", 0)) == "cute"
    monkeypatch.setenv(_common.BACKEND_ENV, "triton")
    assert topk_kernels.select_variant(torch.device("cuda", 0)) == "registers"
    monkeypatch.setenv(topk_kernels.VARIANT_ENV, "looped")
    assert topk_kernels.select_variant(torch.device("cuda", 0)) == "looped"
    with pytest.raises(ValueError, match="CUDA devices only"):
        topk_kernels.select_variant(cpu, "cute")
    with pytest.raises(ValueError, match="variant must be"):
        topk_kernels.select_variant(cpu, "bitonic")


def test_op_variant_switch(kernel_device, monkeypatch):
    """``DSV4_TOPK_SELECT=looped`` switches the op's selection; same bits; a bad name is a ValueError."""
    from dsv4_compile.kernels.triton import attention as attn_kernels

    logits, pos, req = _case(5, 200, seed=11, levels=9)
    logits, pos, req = logits.to(kernel_device), pos.to(kernel_device), req.to(kernel_device)
    a = topk_kernels.select_topk(logits, pos, req, 1, 4, 8, 8, chunk=32)
    monkeypatch.setenv(topk_kernels.VARIANT_ENV, "looped")
    assert torch.equal(topk_kernels.select_topk(logits, pos, req, 1, 4, 8, 8, chunk=32, sub=16), a)
    from test_attention import _topk_case

    case = [x.to(kernel_device) if isinstance(x, torch.Tensor) else x for x in _topk_case("fp8", seed=3)]
    looped = attn_kernels.indexer_topk(*case, "fp8", 8, 4, chunk=16)
    monkeypatch.delenv(topk_kernels.VARIANT_ENV)
    assert torch.equal(attn_kernels.indexer_topk(*case, "fp8", 8, 4, chunk=16), looped)
    monkeypatch.setenv(topk_kernels.VARIANT_ENV, "bitonic")
    with pytest.raises(ValueError, match="variant must be"):
        topk_kernels.select_topk(logits, pos, req, 1, 4, 8, 8)

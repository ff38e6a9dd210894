"""Sparse-attention index ops (docs/numerics.md §8.1): reference vs a per-token Python oracle, Triton kernels vs the
reference bit for bit (interpreter at small T on a CPU, serving shapes on the GPU), opcheck, fakes,
validation."""

import pytest
import torch

import dsv4_compile.ops.indices  # noqa: F401  (registers torch.ops.dsv4.{swa,global_topk,compressed}_indices)
from dsv4_compile.kernels.triton import indices as kernels
from dsv4_compile.reference import indices as ref

dsv4 = torch.ops.dsv4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WINDOW = 128


# ---------------------------------------------------------------------------------------------
# the oracle: one token at a time, plain Python ints
# ---------------------------------------------------------------------------------------------
def _slot(table, r, i, bs):
    if r < 0 or r >= len(table) or i < 0 or i // bs >= len(table[r]):
        return -1
    e = table[r][i // bs]
    return -1 if e < 0 else e * bs + i % bs


def _rows(out, lens):
    return torch.tensor(out, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


def slow_swa(positions, block_table, token_to_req, bs, window):
    table = block_table.tolist()
    out, lens = [], []
    for p, r in zip(positions.tolist(), token_to_req.tolist()):
        row, n = [-1] * window, 0
        if p >= 0 and 0 <= r < len(table):
            n = min(p + 1, window)
            start = max(0, p - window + 1)
            for j in range(n):
                row[j] = _slot(table, r, start + j, bs)
        out.append(row)
        lens.append(n)
    return _rows(out, lens) if out else _rows(torch.empty(0, window), [])


def slow_topk(topk, block_table, token_to_req, bs):
    table = block_table.tolist()
    out, lens = [], []
    for idx, r in zip(topk.tolist(), token_to_req.tolist()):
        row = [_slot(table, r, i, bs) if 0 <= r < len(table) else -1 for i in idx]
        out.append(row)
        lens.append(sum(s >= 0 for s in row))
    return _rows(out, lens)


def slow_compressed(positions, block_table, token_to_req, bs, ratio, width):
    table = block_table.tolist()
    out, lens = [], []
    for p, r in zip(positions.tolist(), token_to_req.tolist()):
        row, n = [-1] * width, 0
        if p >= 0 and 0 <= r < len(table):
            n = min((p + 1) // ratio, width)
            for i in range(n):
                row[i] = _slot(table, r, i, bs)
        out.append(row)
        lens.append(n)
    return _rows(out, lens)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _table(n_req, n_blk, seed, holes=True):
    """Permuted physical pages (sparse in a pool twice the size), some unallocated (−1) entries."""
    g = torch.Generator().manual_seed(seed)
    bt = torch.randperm(2 * n_req * n_blk, generator=g)[: n_req * n_blk].reshape(n_req, n_blk).int()
    if holes:
        bt[torch.rand(n_req, n_blk, generator=g) < 0.1] = -1
    return bt


def _positions(t, bs, n_blk, seed, dtype=torch.int64, window=WINDOW, n_req=4, big=True):
    """Random positions (some beyond the table) with the edge cases first, and requests with padding."""
    g = torch.Generator().manual_seed(seed)
    cap = n_blk * bs
    special = [0, window - 1, window, window + 1, cap - 1, cap, 5 * cap, 10**6]
    if big and dtype == torch.int64:
        special.append(2**40)
    pos = torch.randint(0, cap + 2 * bs, (t,), generator=g)
    pos[: min(t, len(special))] = torch.tensor(special[:t])
    req = torch.randint(0, n_req, (t,), generator=g)
    if t > 3:
        req[torch.rand(t, generator=g) < 0.15] = -1  # padding tokens
        req[2] = -1
        pos[3] = -5  # a negative position with a valid request is padding too
        req[3] = 0
    if t > 9:
        pos[9], req[9] = -1, 1
    return pos.to(dtype), req.to(dtype)


def _topk(t, k, n_entries, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_entries + 8, (t, k), generator=g)  # some beyond the table
    idx[torch.rand(t, k, generator=g) < 0.3] = -1
    if t > 1:
        idx[1] = -1  # an all −1 row of a (probably) valid token
    return idx.int()


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _pair_same(got, want):
    return len(got) == len(want) == 2 and all(_same(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------
# reference vs the per-token oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [16, 48, 64])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_reference_matches_per_token_oracle(bs, dtype):
    n_req, n_blk = 5, 6
    bt = _table(n_req, n_blk, seed=bs)
    pos, req = _positions(97, bs, n_blk, seed=bs + 1, dtype=dtype, n_req=n_req)
    req[-1] = n_req  # out of the table: the reference treats it as padding (the ops reject it on CPU)
    assert _pair_same(ref.swa_indices(pos, bt, req, bs, WINDOW), slow_swa(pos, bt, req, bs, WINDOW))
    assert _pair_same(ref.swa_indices(pos, bt, req, bs, 5), slow_swa(pos, bt, req, bs, 5))
    tk = _topk(97, 37, n_blk * bs, seed=bs + 2)
    assert _pair_same(ref.global_topk_indices(tk, bt, req, bs), slow_topk(tk, bt, req, bs))
    for ratio, width in [(4, 300), (128, 8), (1, 33)]:
        want = slow_compressed(pos, bt, req, bs, ratio, width)
        assert _pair_same(ref.compressed_indices(pos, bt, req, bs, ratio, width), want)


def test_reference_rows_by_hand():
    bt = torch.tensor([[7, 3, -1], [2, 0, 5]], dtype=torch.int32)
    pos = torch.tensor([0, 5, 9, 4, 3])
    req = torch.tensor([1, 0, 0, -1, 1])
    idx, lens = ref.swa_indices(pos, bt, req, 4, 4)
    # row 1: positions 2..5 on pages 0 (=7) and 1 (=3); row 2: positions 6..9 on pages 1 (=3) and 2 (=-1),
    # the unallocated page gives -1 but the entries still count in lens
    assert idx.tolist() == [[8, -1, -1, -1], [30, 31, 12, 13], [14, 15, -1, -1], [-1] * 4, [8, 9, 10, 11]]
    assert lens.tolist() == [1, 4, 4, 0, 4]
    slots, lens = ref.global_topk_indices(torch.tensor([[5, -1, 0, 8, 12]], dtype=torch.int32), bt, req[:1], 4)
    assert slots.tolist() == [[1, -1, 8, 20, -1]] and lens.tolist() == [3]
    slots, lens = ref.compressed_indices(torch.tensor([7, 2, 15]), bt, torch.tensor([1, 1, 0]), 1, 4, 3)
    assert slots.tolist() == [[2, 0, -1], [-1, -1, -1], [7, 3, -1]] and lens.tolist() == [2, 0, 3]


# ---------------------------------------------------------------------------------------------
# Triton kernels vs the reference
# ---------------------------------------------------------------------------------------------
def _check_kernels(device, t, bs, dtype, n_req=4, n_blk=5, widths=(300,), ks=(37, 300), ratios=(4,), strided=False):
    bt = _table(n_req, n_blk, seed=t + bs)
    pos, req = _positions(t, bs, n_blk, seed=t, dtype=dtype, n_req=n_req)
    d = lambda x: x.to(device)  # noqa: E731
    if strided:  # a column slice of a wider table, every other element of longer vectors
        btd = d(torch.cat([bt, torch.full_like(bt, 999)], dim=1))[:, :n_blk]
        posd = d(torch.stack([pos, pos * 0 + 12345], dim=1))[:, 0]
        reqd = d(torch.stack([req, req * 0 + 1], dim=1))[:, 0]
    else:
        btd, posd, reqd = d(bt), d(pos), d(req)
    assert _pair_same(kernels.swa_indices(posd, btd, reqd, bs, WINDOW), ref.swa_indices(pos, bt, req, bs, WINDOW))
    for k in ks:
        tk = _topk(t, k, n_blk * bs, seed=k)
        tkd = d(tk.t().contiguous()).t() if strided else d(tk)
        assert _pair_same(kernels.global_topk_indices(tkd, btd, reqd, bs), ref.global_topk_indices(tk, bt, req, bs))
    for ratio in ratios:
        for width in widths:
            got = kernels.compressed_indices(posd, btd, reqd, bs, ratio, width)
            assert _pair_same(got, ref.compressed_indices(pos, bt, req, bs, ratio, width))


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("bs", [16, 48, 64])  # 48: the general (non power of two) block-size path
def test_kernels_match_reference(kernel_device, t, bs):
    _check_kernels(kernel_device, t, bs, torch.int64 if t % 2 else torch.int32)


def test_kernels_strided_inputs_and_out_of_table_requests(kernel_device):
    _check_kernels(kernel_device, 9, 16, torch.int64, strided=True, ks=(20,), widths=(24,))
    # requests >= R (not checked off the CPU) read nothing and come out as padding
    bt = _table(2, 3, seed=0)
    pos = torch.tensor([5, 200, 40], dtype=torch.int32)
    req = torch.tensor([2, 1, 7], dtype=torch.int32)
    d = lambda x: x.to(kernel_device)  # noqa: E731
    want = ref.swa_indices(pos, bt, req, 16, 8)
    assert want[1].tolist() == [0, 8, 0]
    assert _pair_same(kernels.swa_indices(d(pos), d(bt), d(req), 16, 8), want)
    assert _pair_same(kernels.compressed_indices(d(pos), d(bt), d(req), 16, 4, 8),
                      ref.compressed_indices(pos, bt, req, 16, 4, 8))
    tk = _topk(3, 5, 48, seed=1)
    assert _pair_same(kernels.global_topk_indices(d(tk), d(bt), d(req), 16), ref.global_topk_indices(tk, bt, req, 16))


def test_kernels_empty_inputs(kernel_device):
    d = lambda x: x.to(kernel_device)  # noqa: E731
    e = d(torch.empty(0, dtype=torch.int64))
    bt = d(_table(2, 3, seed=0))
    idx, lens = kernels.swa_indices(e, bt, e, 16, WINDOW)
    assert idx.shape == (0, WINDOW) and lens.shape == (0,) and idx.dtype == lens.dtype == torch.int32
    idx, lens = kernels.compressed_indices(e, bt, e, 16, 4, 24)
    assert idx.shape == (0, 24) and lens.shape == (0,)
    idx, lens = kernels.global_topk_indices(d(torch.empty(0, 512, dtype=torch.int32)), bt, e, 16)
    assert idx.shape == (0, 512) and lens.shape == (0,)
    # an empty table: every lookup is −1, lengths are still the visible counts
    pos = torch.tensor([0, 300])
    req = torch.tensor([0, 0])
    empty_bt = torch.empty(1, 0, dtype=torch.int32)
    got = kernels.swa_indices(d(pos), d(empty_bt), d(req), 16, 4)
    assert _pair_same(got, ref.swa_indices(pos, empty_bt, req, 16, 4))
    assert got[0].eq(-1).all() and got[1].tolist() == [1, 4]


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 7, 64, 1000])
@pytest.mark.parametrize("bs", [16, 64])
def test_gpu_ops_bit_exact_at_serving_shapes(t, bs):
    n_req, n_blk = 16, 8192 // bs
    bt = _table(n_req, n_blk, seed=t)
    pos, req = _positions(t, bs, n_blk, seed=t + 1, n_req=n_req)
    dev = [x.cuda() for x in (pos, bt, req)]
    got = dsv4.swa_indices(*dev, bs, WINDOW)
    assert got[0].device.type == "cuda"
    assert _pair_same(got, ref.swa_indices(pos, bt, req, bs, WINDOW))
    for k in (512, 1024):
        tk = _topk(t, k, n_blk * bs, seed=k + t)
        got = dsv4.global_topk_indices(tk.cuda(), dev[1], dev[2], bs)
        assert _pair_same(got, ref.global_topk_indices(tk, bt, req, bs))
    for ratio, width in [(128, 1024), (4, 2048)]:
        got = dsv4.compressed_indices(*dev, bs, ratio, width)
        assert _pair_same(got, ref.compressed_indices(pos, bt, req, bs, ratio, width))
    _check_kernels("cuda", t, bs, torch.int32, strided=True, ks=(512,), widths=(1024,), ratios=(128,))
    _check_kernels("cuda", t, bs - 1, torch.int64, ks=(512,), widths=(1024,), ratios=(128,))  # general block size


@pytest.mark.cuda
def test_gpu_ops_capture_in_a_cuda_graph():
    bt = _table(4, 8, seed=0).cuda()
    pos, req = (x.cuda() for x in _positions(64, 64, 8, seed=0))
    tk = _topk(64, 512, 512, seed=0).cuda()
    run = lambda: (dsv4.swa_indices(pos, bt, req, 64, WINDOW), dsv4.global_topk_indices(tk, bt, req, 64),  # noqa: E731
                   dsv4.compressed_indices(pos, bt, req, 64, 128, 128))
    eager = run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    pos.add_(3)
    graph.replay()
    torch.cuda.synchronize()
    assert all(_pair_same(a, b) for a, b in zip(captured, run()))
    assert not _pair_same(captured[0], eager[0])


# ---------------------------------------------------------------------------------------------
# op contract: opcheck, fakes, validation, empty inputs
# ---------------------------------------------------------------------------------------------
def _op_cases(device):
    bt = _table(4, 6, seed=3).to(device)
    pos, req = (x.to(device) for x in _positions(9, 16, 6, seed=3))
    tk = _topk(9, 40, 96, seed=3).to(device)
    return [
        (dsv4.swa_indices.default, (pos, bt, req, 16, WINDOW)),
        (dsv4.swa_indices.default, (pos.int(), bt, req.int(), 64, 7)),
        (dsv4.global_topk_indices.default, (tk, bt, req, 16)),
        (dsv4.global_topk_indices.default, (tk, bt, req.int(), 4)),
        (dsv4.compressed_indices.default, (pos, bt, req, 16, 4, 40)),
        (dsv4.compressed_indices.default, (pos.int(), bt, req, 1, 128, 128)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(6))
def test_opcheck(device, case):
    op, args = _op_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(6))
def test_fake_matches_real_and_outputs_are_fresh(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _op_cases("cpu")[case]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
        assert r.is_contiguous()
        for a in args:
            if isinstance(a, torch.Tensor):
                assert r.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_ops_under_torch_compile_dynamic():
    fn = torch.compile(
        lambda p, bt, r, tk: (dsv4.swa_indices(p, bt, r, 16, WINDOW), dsv4.global_topk_indices(tk, bt, r, 16),
                              dsv4.compressed_indices(p, bt, r, 16, 4, 40)),
        backend="aot_eager", fullgraph=True, dynamic=True,
    )
    bt = _table(4, 6, seed=5)
    for t in (5, 11):
        pos, req = _positions(t, 16, 6, seed=t)
        tk = _topk(t, 33, 96, seed=t)
        got = fn(pos, bt, req, tk)
        assert _pair_same(got[0], ref.swa_indices(pos, bt, req, 16, WINDOW))
        assert _pair_same(got[1], ref.global_topk_indices(tk, bt, req, 16))
        assert _pair_same(got[2], ref.compressed_indices(pos, bt, req, 16, 4, 40))


def test_ops_empty_tokens():
    e = torch.empty(0, dtype=torch.int64)
    bt = _table(2, 3, seed=0)
    for got, width in [
        (dsv4.swa_indices(e, bt, e, 16, WINDOW), WINDOW),
        (dsv4.global_topk_indices(torch.empty(0, 64, dtype=torch.int32), bt, e, 16), 64),
        (dsv4.compressed_indices(e, bt, e, 16, 128, 256), 256),
    ]:
        assert got[0].shape == (0, width) and got[1].shape == (0,)
        assert got[0].dtype == got[1].dtype == torch.int32


def test_bad_inputs_raise_value_error_naming_the_argument():
    bt = _table(4, 6, seed=0)
    pos, req = _positions(5, 16, 6, seed=0)
    tk = _topk(5, 8, 96, seed=0)
    cases = [
        (lambda: dsv4.swa_indices(pos.float(), bt, req, 16, 128), "positions must be one of"),
        (lambda: dsv4.swa_indices(pos.short(), bt, req, 16, 128), "positions must be one of"),
        (lambda: dsv4.swa_indices(pos[None], bt, req, 16, 128), "positions must have 1 dims"),
        (lambda: dsv4.swa_indices(pos, bt.long(), req, 16, 128), "block_table must be one of"),
        (lambda: dsv4.swa_indices(pos, bt[0], req, 16, 128), "block_table must have 2 dims"),
        (lambda: dsv4.swa_indices(pos, bt, req.float(), 16, 128), "token_to_req must be one of"),
        (lambda: dsv4.swa_indices(pos, bt, req[None], 16, 128), "token_to_req must have 1 dims"),
        (lambda: dsv4.swa_indices(pos, bt, req[:3], 16, 128), "token_to_req has 3 entries but positions has 5"),
        (lambda: dsv4.swa_indices(pos, bt, req, 0, 128), "block_size must be a positive int"),
        (lambda: dsv4.swa_indices(pos, bt, req, 16, -1), "window must be a positive int"),
        (lambda: dsv4.swa_indices(pos, bt, req * 0 + 4, 16, 128), r"token_to_req must be < 4"),
        (lambda: dsv4.global_topk_indices(tk.long(), bt, req, 16), "topk must be one of"),
        (lambda: dsv4.global_topk_indices(tk[0], bt, req, 16), "topk must have 2 dims"),
        (lambda: dsv4.global_topk_indices(tk, bt.long(), req, 16), "block_table must be one of"),
        (lambda: dsv4.global_topk_indices(tk[:4], bt, req, 16), "token_to_req has 5 entries but topk has 4"),
        (lambda: dsv4.global_topk_indices(tk, bt, req, -16), "block_size must be a positive int"),
        (lambda: dsv4.global_topk_indices(tk, bt, req + 10, 16), "token_to_req must be < 4"),
        (lambda: dsv4.compressed_indices(pos, bt, req, 16, 0, 128), "compress_ratio must be a positive int"),
        (lambda: dsv4.compressed_indices(pos, bt, req, 16, 4, 0), "width must be a positive int"),
        (lambda: dsv4.compressed_indices(pos, bt, req, 0, 4, 8), "block_size must be a positive int"),
        (lambda: dsv4.compressed_indices(pos.half(), bt, req, 16, 4, 8), "positions must be one of"),
        (lambda: dsv4.compressed_indices(pos, bt, req[1:], 16, 4, 8), "token_to_req has 4 entries"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    # padding tokens (negative requests) pass the range check
    dsv4.swa_indices(pos, bt, req * 0 - 1, 16, 128)


@pytest.mark.cuda
def test_device_mismatch_is_a_value_error():
    bt = _table(4, 6, seed=0)
    pos, req = _positions(5, 16, 6, seed=0)
    tk = _topk(5, 8, 96, seed=0)
    with pytest.raises(ValueError, match="block_table is on cpu"):
        dsv4.swa_indices(pos.cuda(), bt, req.cuda(), 16, 128)
    with pytest.raises(ValueError, match="token_to_req is on cpu"):
        dsv4.global_topk_indices(tk.cuda(), bt.cuda(), req, 16)
    with pytest.raises(ValueError, match="block_table is on cpu"):
        dsv4.compressed_indices(pos.cuda(), bt, req.cuda(), 16, 4, 8)


def test_compile_cases_cover_every_kernel_parameter():
    seen = set()
    for arch in (90, 100):
        for fn, sig, constexprs in kernels.compile_cases(arch):
            assert set(sig) | set(constexprs) == set(fn.arg_names) and not set(sig) & set(constexprs)
            seen.add((fn.__name__, tuple(sorted(constexprs.items()))))
    names = {name for name, _ in seen}
    assert names == {"_window_kernel", "_topk_kernel"}
    window = {(dict(c)["COMPRESSED"], dict(c)["BS_LOG2"] >= 0) for n, c in seen if n == "_window_kernel"}
    assert window == {(False, False), (False, True), (True, False), (True, True)}
    assert {dict(c)["BS_LOG2"] >= 0 for n, c in seen if n == "_topk_kernel"} == {False, True}

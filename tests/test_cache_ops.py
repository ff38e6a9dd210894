"""Paged cache ops: the byte layout (decoded by hand, slot by slot), sentinel bytes that must survive,
round trips, Triton kernels bit-exact with the reference, opcheck, fakes, ValueErrors, and a
captured-and-replayed CUDA graph of the inserts."""

import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile import layouts, reference
from dsv4_compile.kernels.triton import cache as kernels
from dsv4_compile.reference import cache as ref
from dsv4_compile.rope import cos_sin_cache

dsv4 = torch.ops.dsv4
SENTINEL = 165
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kv(t, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(t, 512, generator=g) * scale).bfloat16()
    if t > 2:
        kv[1, :64] = 0.0  # an all-zero block: amax floor
        kv[2, 64:128] = 1e-30  # below the floor
        kv[0, 3] = 448.0 * 4
    return kv


def _slots(t, capacity, seed=0, pad_every=3):
    g = torch.Generator().manual_seed(seed + 7)
    s = torch.randperm(capacity, generator=g)[:t]
    s[::pad_every] = -1  # padding rows
    return s


def _cache(fmt, bs, n_blocks, device="cpu", extra=0):
    """A sentinel-filled cache; ``extra`` bytes of slack per page make stride(0) exceed the page."""
    pb = layouts.page_bytes(fmt, bs)
    full = torch.full((n_blocks, pb + extra), SENTINEL, dtype=torch.uint8, device=device)
    return full[:, :pb] if extra else full


def _hand_decode_kv(cache, slot, bs):
    """One fp8_ds_mla slot decoded from the byte offsets of docs/numerics.md §5.2 (independent of reference.cache)."""
    page = cache[slot // bs]
    k = slot % bs
    tok = page[k * 576 : (k + 1) * 576]
    sc = page[bs * 576 + k * 8 : bs * 576 + (k + 1) * 8]
    return tok[:448].clone(), tok[448:].clone(), sc.clone()


@pytest.mark.parametrize("bs", [16, 64])
def test_kv_insert_layout_and_sentinels(bs):
    t, nb = 9, 3
    kv = _kv(t)
    slots = _slots(t, nb * bs)
    cache = _cache("fp8_ds_mla", bs, nb)
    before = cache.clone()
    dsv4.kv_insert(kv, cache, slots, bs)
    q, scale = reference.fp8_block_quant(kv[:, :448], 64, 1e-4)
    touched = torch.zeros_like(cache, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        nope, rope, sc = _hand_decode_kv(cache, s, bs)
        assert torch.equal(nope, q[i].view(torch.uint8))
        assert torch.equal(rope, kv[i, 448:].contiguous().view(torch.uint8))
        e = torch.log2(scale[i]).to(torch.int64) + 127
        assert sc[:7].tolist() == e.tolist() and sc[7].item() == 0
        page, k = s // bs, s % bs
        touched[page, k * 576 : (k + 1) * 576] = True
        touched[page, bs * 576 + k * 8 : bs * 576 + (k + 1) * 8] = True
    assert torch.equal(cache[~touched], before[~touched])  # other slots and the page padding survive


def test_kv_roundtrip_error_bound_and_exact_rope():
    t, bs = 17, 16
    kv = _kv(t)
    slots = torch.arange(t)
    cache = _cache("fp8_ds_mla", bs, 2)
    dsv4.kv_insert(kv, cache, slots, bs)
    out = dsv4.kv_gather(cache, slots, bs)
    assert torch.equal(out[:, 448:], kv[:, 448:])
    _, scale = reference.fp8_block_quant(kv[:, :448], 64, 1e-4)
    err = (out[:, :448].float() - kv[:, :448].float()).abs().view(t, 7, 64).amax(-1)
    assert bool((err <= 16 * scale).all())


def test_kv_rope_insert_is_rope_then_insert():
    t, bs = 7, 16
    kv = _kv(t)
    pos = torch.tensor([0, 5, 63, 1, 200, 17, 4095])
    cs = cos_sin_cache(64, 4096, 160000.0)
    slots = torch.tensor([3, -1, 17, 30, 2, 0, 5])
    a, b = _cache("fp8_ds_mla", bs, 2), _cache("fp8_ds_mla", bs, 2)
    dsv4.kv_rope_insert(kv, pos, cs, a, slots, bs)
    dsv4.kv_insert(dsv4.rope(kv, pos, cs), b, slots, bs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_indexer_k_layout_and_roundtrip(fmt):
    t, bs, nb = 11, 16, 2
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(t, 128, generator=g) * 2).bfloat16()
    slots = _slots(t, nb * bs, pad_every=4)
    cache = _cache(fmt, bs, nb)
    before = cache.clone()
    dsv4.indexer_k_insert(k, cache, slots, bs, fmt)
    v, s = layouts.record_bytes(fmt)
    if fmt == "fp8":
        want_v, want_s = reference.fp8_block_quant(k, 128, 1e-4)
        want_v, want_s = want_v.view(torch.uint8), want_s.view(torch.uint8)
    else:
        want_v, want_s = reference.mxfp4_quant(k)
    touched = torch.zeros_like(cache, dtype=torch.bool)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        page, j = slot // bs, slot % bs
        assert torch.equal(cache[page, j * v : (j + 1) * v], want_v[i])
        assert torch.equal(cache[page, bs * v + j * s : bs * v + (j + 1) * s], want_s[i].reshape(-1))
        touched[page, j * v : (j + 1) * v] = True
        touched[page, bs * v + j * s : bs * v + (j + 1) * s] = True
    assert torch.equal(cache[~touched], before[~touched])
    out = dsv4.indexer_k_gather(cache, slots, bs, fmt)
    assert out.dtype == torch.float32 and out.shape == (t, 128)
    assert bool((out[slots < 0] == 0).all())
    kept = slots >= 0
    if fmt == "fp8":
        _, sc = reference.fp8_block_quant(k, 128, 1e-4)
        assert bool(((out[kept] - k[kept].float()).abs() <= 16 * sc[kept]).all())
    else:
        assert torch.equal(out[kept], reference.mxfp4_dequant(want_v[kept], want_s[kept]))


@pytest.mark.parametrize("fmt", ["fp8_ds_mla", "fp8", "mxfp4"])
def test_gather_is_safe_on_empty_cache_and_all_padding(fmt):
    bs = 16
    gather = (lambda c, s: dsv4.kv_gather(c, s, bs)) if fmt == "fp8_ds_mla" else (
        lambda c, s: dsv4.indexer_k_gather(c, s, bs, fmt))
    empty = torch.empty((0, layouts.page_bytes(fmt, bs)), dtype=torch.uint8)
    pad = torch.full((5,), -1)
    assert bool((gather(empty, pad) == 0).all()) and gather(empty, pad).shape[0] == 5
    cache = _cache(fmt, bs, 2)
    assert bool((gather(cache, pad) == 0).all())
    assert gather(cache, pad[:0]).shape[0] == 0
    before = cache.clone()
    if fmt == "fp8_ds_mla":
        dsv4.kv_insert(_kv(5), cache, pad, bs)
    else:
        dsv4.indexer_k_insert(torch.ones(5, 128), cache, pad, bs, fmt)
    assert torch.equal(cache, before)  # an all-padding batch writes nothing


# --- Triton kernels vs the reference ------------------------------------------------------------
def _kernel_cases(t, bs, seed):
    g = torch.Generator().manual_seed(seed)
    nb = max(2, -(-2 * t // bs))
    kv = _kv(t, seed)
    k = (torch.randn(t, 128, generator=g) * 2).bfloat16()
    k[0, :4] = torch.tensor([0.0, -0.0, 0.25, 5.0])
    pos = torch.randint(0, 4096, (t,), generator=g)
    cs = torch.randn(4096, 64, generator=g)  # any table values must round the same
    slots = _slots(t, nb * bs, seed)
    return nb, kv, k, pos, cs, slots


def _check_kernels(device, t, bs, extra, seed=0):
    nb, kv, k, pos, cs, slots = _kernel_cases(t, bs, seed)
    dev = lambda *xs: [x.to(device) for x in xs]  # noqa: E731
    for rope in (False, True):
        want = _cache("fp8_ds_mla", bs, nb, extra=extra)
        got = _cache("fp8_ds_mla", bs, nb, device, extra=extra)
        if rope:
            ref.kv_rope_insert(kv, pos, cs, want, slots, bs)
            kernels.kv_insert(*dev(kv, pos, cs), got, slots.to(device), bs)
        else:
            ref.kv_insert(kv, want, slots, bs)
            kernels.kv_insert(kv.to(device), None, None, got, slots.to(device), bs)
        assert torch.equal(got.cpu(), want)
        gather_slots = torch.cat((slots, torch.tensor([nb * bs + 5])))  # one past the end: zeros on GPU
        assert torch.equal(kernels.gather(got, gather_slots.to(device), bs, "fp8_ds_mla").cpu(),
                           ref.gather(want, torch.cat((slots, torch.tensor([-1]))), bs, "fp8_ds_mla"))
    for fmt in ("fp8", "mxfp4"):
        want = _cache(fmt, bs, nb, extra=extra)
        got = _cache(fmt, bs, nb, device, extra=extra)
        ref.indexer_k_insert(k, want, slots, bs, fmt)
        kernels.indexer_k_insert(k.to(device), got, slots.to(device), bs, fmt)
        assert torch.equal(got.cpu(), want), fmt
        assert torch.equal(kernels.gather(got, slots.to(device), bs, fmt).cpu(), ref.gather(want, slots, bs, fmt))


@pytest.mark.parametrize("t,bs,extra", [(1, 16, 0), (7, 64, 0), (9, 16, 40)])
def test_kernels_match_reference(kernel_device, t, bs, extra):
    _check_kernels(kernel_device, t, bs, extra)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 7, 64, 1000])
@pytest.mark.parametrize("bs", [16, 64])
def test_kernels_match_reference_gpu(t, bs):
    _check_kernels("cuda", t, bs, extra=0, seed=t)
    _check_kernels("cuda", t, bs, extra=64, seed=t + 1)


# --- op contract --------------------------------------------------------------------------------
def _op_cases(device):
    bs = 16
    kv = _kv(5).to(device)
    pos = torch.tensor([0, 3, 9, 1, 2], device=device)
    cs = cos_sin_cache(64, 64, 160000.0, device=device)
    slots = torch.tensor([4, -1, 0, 31, 7], device=device)
    k = torch.randn(5, 128, device=device).bfloat16()
    caches = {f: _cache(f, bs, 2, device) for f in ("fp8_ds_mla", "fp8", "mxfp4")}
    return [
        (dsv4.kv_insert.default, (kv, caches["fp8_ds_mla"], slots, bs)),
        (dsv4.kv_rope_insert.default, (kv, pos, cs, caches["fp8_ds_mla"].clone(), slots.int(), bs)),
        (dsv4.kv_gather.default, (caches["fp8_ds_mla"], slots, bs)),
        (dsv4.indexer_k_insert.default, (k, caches["fp8"], slots, bs, "fp8")),
        (dsv4.indexer_k_insert.default, (k.float(), caches["mxfp4"], slots, bs, "mxfp4")),
        (dsv4.indexer_k_gather.default, (caches["fp8"], slots, bs, "fp8")),
        (dsv4.indexer_k_gather.default, (caches["mxfp4"], slots.int(), bs, "mxfp4")),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(7))
def test_opcheck(device, case):
    op, args = _op_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", [2, 5, 6])
def test_gather_fakes_match_real(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _op_cases("cpu")[case]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)
    assert real.data_ptr() not in {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}


def test_bad_inputs_raise_value_error():
    bs = 16
    kv, cache, slots = _kv(3), _cache("fp8_ds_mla", bs, 2), torch.tensor([0, 1, 2])
    cases = [
        lambda: dsv4.kv_insert(kv.float(), cache, slots, bs),  # kv must be bf16
        lambda: dsv4.kv_insert(kv[:, :256], cache, slots, bs),  # head dim
        lambda: dsv4.kv_insert(kv, cache[:, :1000], slots, bs),  # pages too small
        lambda: dsv4.kv_insert(kv, cache.view(torch.int8), slots, bs),  # not uint8
        lambda: dsv4.kv_insert(kv, cache, torch.tensor([0, 1, 32]), bs),  # slot past the cache
        lambda: dsv4.kv_insert(kv, cache, torch.tensor([0, -2, 1]), bs),  # below -1
        lambda: dsv4.kv_insert(kv, cache, slots[:2], bs),  # length
        lambda: dsv4.kv_insert(kv, cache, slots, 0),  # block size
        lambda: dsv4.kv_rope_insert(kv, slots, cos_sin_cache(128, 16, 1e4), cache, slots, bs),  # rope dim
        lambda: dsv4.kv_rope_insert(kv, torch.tensor([0, 1, 99]), cos_sin_cache(64, 16, 1e4), cache, slots, bs),
        lambda: dsv4.indexer_k_insert(torch.ones(3, 128), _cache("fp8", bs, 1), slots, bs, "int4"),
        lambda: dsv4.indexer_k_insert(torch.ones(3, 64), _cache("fp8", bs, 1), slots, bs, "fp8"),
        lambda: dsv4.indexer_k_gather(_cache("fp8", bs, 1), slots.float(), bs, "fp8"),
        lambda: dsv4.kv_gather(cache, slots.view(1, 3), bs),
    ]
    for i, bad in enumerate(cases):
        with pytest.raises(ValueError):
            bad()
            pytest.fail(f"case {i} did not raise")


# --- CUDA graph capture -------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_graph_replay_of_inserts_matches_eager():
    bs, t, nb = 64, 48, 4
    cs = cos_sin_cache(64, 4096, 160000.0, device="cuda")
    static = dict(kv=torch.zeros(t, 512, device="cuda", dtype=torch.bfloat16),
                  k=torch.zeros(t, 128, device="cuda", dtype=torch.bfloat16),
                  pos=torch.zeros(t, dtype=torch.int64, device="cuda"),
                  slots=torch.full((t,), -1, dtype=torch.int64, device="cuda"))
    caches = {f: _cache(f, bs, nb, "cuda") for f in ("fp8_ds_mla", "fp8", "mxfp4")}

    def step():
        dsv4.kv_rope_insert(static["kv"], static["pos"], cs, caches["fp8_ds_mla"], static["slots"], bs)
        dsv4.indexer_k_insert(static["k"], caches["fp8"], static["slots"], bs, "fp8")
        dsv4.indexer_k_insert(static["k"], caches["mxfp4"], static["slots"], bs, "mxfp4")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager = {f: _cache(f, bs, nb, "cuda") for f in caches}
    for f in caches:
        caches[f].fill_(SENTINEL)
    for seed in range(3):  # new data copied into the same buffers, then replayed
        _, kv, k, pos, _, slots = _kernel_cases(t, bs, seed)
        for name, x in (("kv", kv), ("k", k), ("pos", pos), ("slots", slots)):
            static[name].copy_(x)
        graph.replay()
        dsv4.kv_rope_insert(kv.cuda(), pos.cuda(), cs, eager["fp8_ds_mla"], slots.cuda(), bs)
        dsv4.indexer_k_insert(k.cuda(), eager["fp8"], slots.cuda(), bs, "fp8")
        dsv4.indexer_k_insert(k.cuda(), eager["mxfp4"], slots.cuda(), bs, "mxfp4")
    torch.cuda.synchronize()
    for f in caches:
        assert torch.equal(caches[f], eager[f]), f


@pytest.mark.parametrize("fmt", ["fp8_ds_mla", "fp8", "mxfp4"])
def test_block_size_that_does_not_match_the_pages_is_refused(fmt):
    """The reported input: block_size 32 on pages sized for 64 (records would land in the wrong layout)."""
    cache = torch.zeros(2, layouts.page_bytes(fmt, 64), dtype=torch.uint8)
    slots = torch.tensor([0, 1])
    if fmt == "fp8_ds_mla":
        bad = lambda: dsv4.kv_insert(_kv(2), cache, slots, 32)  # noqa: E731
        good = lambda: dsv4.kv_insert(_kv(2), cache, slots, 64)  # noqa: E731
    else:
        k = torch.randn(2, 128).bfloat16()
        bad = lambda: dsv4.indexer_k_insert(k, cache, slots, 32, fmt)  # noqa: E731
        good = lambda: dsv4.indexer_k_insert(k, cache, slots, 64, fmt)  # noqa: E731
    with pytest.raises(ValueError, match="block_size does not match the pages"):
        bad()
    with pytest.raises(ValueError, match="block_size does not match the pages"):
        dsv4.kv_gather(cache, slots, 32) if fmt == "fp8_ds_mla" else dsv4.indexer_k_gather(cache, slots, 32, fmt)
    good()

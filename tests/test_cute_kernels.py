"""CuTe-DSL kernels: backend selection and the no-cutlass fallback (CPU), and bit-exactness with the
reference at the serving shapes (GPU: sm_90 / sm_100 with nvidia-cutlass-dsl installed)."""

import os
import subprocess
import sys

import pytest
import torch

from dsv4_compile import layouts, reference
from dsv4_compile.kernels.cute import _common
from test_triton_kernels import _data, _same

dsv4 = torch.ops.dsv4
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend device 0 has the given compute capability, with or without CuTe DSL installed."""

    def set_gpu(capability, have_cute=True):
        monkeypatch.setattr(_common, "device_capability", lambda index: capability)
        monkeypatch.setattr(_common, "HAVE_CUTE", have_cute)

    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    return set_gpu


@pytest.mark.parametrize("capability,expected", [((9, 0), "cute"), ((10, 0), "cute"), ((8, 0), "triton"),
                                                 ((8, 9), "triton"), ((12, 0), "triton")])
def test_backend_is_cute_on_hopper_and_blackwell_only(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert _common.backend(CUDA0) == expected
    assert _common.backend(torch.device("cpu")) == "triton"


def test_backend_env_forces_either(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    monkeypatch.setenv(_common.BACKEND_ENV, "triton")
    assert _common.backend(CUDA0) == "triton"
    fake_gpu((8, 0))
    monkeypatch.setenv(_common.BACKEND_ENV, "cute")
    assert _common.backend(CUDA0) == "cute"
    monkeypatch.setenv(_common.BACKEND_ENV, "tilelang")
    with pytest.raises(ValueError, match="DSV4_BACKEND"):
        _common.backend(CUDA0)


def test_forcing_cute_without_cutlass_is_a_clear_error(fake_gpu, monkeypatch):
    fake_gpu((9, 0), have_cute=False)
    assert _common.backend(CUDA0) == "triton"  # not forced: silent fallback
    monkeypatch.setenv(_common.BACKEND_ENV, "cute")
    with pytest.raises(RuntimeError, match=r"DSV4_BACKEND=cute.*nvidia-cutlass-dsl"):
        _common.backend(CUDA0)


def test_arch_names_and_hardware_e2m1(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    assert _common.arch_name(CUDA0) == "sm_90a"
    fake_gpu((10, 0))
    assert _common.arch_name(CUDA0) == "sm_100a"
    monkeypatch.delenv(_common.E2M1_ENV, raising=False)
    assert not _common.use_hw_e2m1("sm_90a")
    assert _common.use_hw_e2m1("sm_100a")
    monkeypatch.setenv(_common.E2M1_ENV, "software")
    assert not _common.use_hw_e2m1("sm_100a")


def test_package_imports_and_runs_without_cutlass():
    # A fresh interpreter where cutlass and tvm_ffi cannot be imported: the package imports, the
    # selector says Triton (even on a Hopper), and the ops run. Importing never pulls in cutlass.
    code = (
        "import sys\n"
        "sys.modules['cutlass'] = None\n"
        "sys.modules['tvm_ffi'] = None\n"
        "import torch, dsv4_compile\n"
        "from dsv4_compile import reference\n"
        "from dsv4_compile.kernels import cute\n"
        "from dsv4_compile.kernels.cute import _common\n"
        "assert not cute.HAVE_CUTE\n"
        "_common.device_capability = lambda index: (9, 0)\n"
        "assert cute.backend(torch.device('cuda', 0)) == 'triton'\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "q = torch.randn(3, 4, 128).bfloat16(); pos = torch.tensor([0, 5, 9]); w = torch.randn(3, 4)\n"
        "cs = torch.randn(16, 64)\n"
        "got = torch.ops.dsv4.indexer_q_rope_fp8(q.to(dev), pos.to(dev), cs.to(dev), w.to(dev), 0.5)\n"
        "want = reference.indexer_q_rope_fp8(q, pos, cs, w, 0.5)\n"
        "assert torch.equal(got[0].cpu().view(torch.uint8), want[0].view(torch.uint8))\n"
        "assert torch.equal(got[1].cpu(), want[1])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != _common.BACKEND_ENV})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")


def test_importing_the_package_does_not_import_cutlass():
    code = (
        "import sys, dsv4_compile, dsv4_compile.kernels.cute\n"
        "assert 'cutlass' not in sys.modules, 'cutlass imported at package import time'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU: the CuTe kernels bit for bit
# ---------------------------------------------------------------------------------------------
def _cute_gpu() -> bool:
    return (torch.cuda.is_available() and _common.HAVE_CUTE
            and torch.cuda.get_device_capability()[0] in _common.CUTE_ARCH_MAJORS)


needs_cute_gpu = pytest.mark.skipif(not _cute_gpu(), reason="needs nvidia-cutlass-dsl and an sm_90 / sm_100 GPU")

GPU_TOKENS = [1, 7, 32, 257]


@pytest.mark.cuda
@needs_cute_gpu
@pytest.mark.parametrize("t", GPU_TOKENS)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hadamard", [False, True])
def test_cute_indexer_q_kernels_bit_exact(t, table_dtype, hadamard):
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    q, pos, cs, w, (qd, posd, csd, wd) = _data(t, 64, 128, table_dtype, "cuda", seed=t)
    ws = 128**-0.5 * 64**-0.5
    got = cute_iq.indexer_q_rope_fp8(qd, posd, csd, wd, ws, hadamard)
    want = reference.indexer_q_rope_fp8(q, pos, cs, w, ws, hadamard)
    assert all(_same(a, b) for a, b in zip(got, want))
    got = cute_iq.indexer_q_rope_mxfp4(qd, posd, csd, wd, ws, hadamard)
    want = reference.indexer_q_rope_mxfp4(q, pos, cs, w, ws, hadamard)
    assert all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_mxfp4_software_e2m1_bit_exact(monkeypatch):
    # on sm_100 the default is the hardware conversion: pin the software one as well
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    monkeypatch.setenv(_common.E2M1_ENV, "software")
    q, pos, cs, w, (qd, posd, csd, wd) = _data(257, 64, 128, torch.float32, "cuda", seed=5)
    got = cute_iq.indexer_q_rope_mxfp4(qd, posd, csd, wd, 0.25, True)
    want = reference.indexer_q_rope_mxfp4(q, pos, cs, w, 0.25, True)
    assert all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_kernel_honours_strided_q_ragged_heads_and_int32_positions():
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    q, pos, cs, w, _ = _data(5, 20, 128, torch.float32, "cuda")  # 20 heads: a partial head block
    big = torch.zeros(5, 40, 128, dtype=q.dtype)
    big[:, ::2] = q
    wt = w.t().contiguous().t()  # column-major weights
    dev = lambda x: x.cuda()  # noqa: E731
    got = cute_iq.indexer_q_rope_fp8(dev(big)[:, ::2], dev(pos).int(), dev(cs), dev(wt), 0.5)
    want = reference.indexer_q_rope_fp8(q, pos, cs, w, 0.5)
    assert all(_same(a, b) for a, b in zip(got, want))
    got = cute_iq.indexer_q_rope_mxfp4(dev(big)[:, ::2], dev(pos).int(), dev(cs), dev(wt), 0.5)
    want = reference.indexer_q_rope_mxfp4(q, pos, cs, w, 0.5)
    assert all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.cuda
@needs_cute_gpu
def test_ops_dispatch_to_cute_and_stay_bit_exact(monkeypatch):
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    monkeypatch.setenv(_common.BACKEND_ENV, "cute")
    calls = []
    original = cute_iq._launch
    monkeypatch.setattr(cute_iq, "_launch", lambda *a, **k: calls.append(1) or original(*a, **k))
    q, pos, cs, w, (qd, posd, csd, wd) = _data(32, 64, 128, torch.float32, "cuda", seed=3)
    got = dsv4.indexer_q_rope_fp8(qd, posd, csd, wd, 0.5, True)
    assert all(_same(a, b) for a, b in zip(got, reference.indexer_q_rope_fp8(q, pos, cs, w, 0.5, True)))
    got = dsv4.indexer_q_rope_mxfp4(qd, posd, csd, wd, 0.5, True)
    assert all(_same(a, b) for a, b in zip(got, reference.indexer_q_rope_mxfp4(q, pos, cs, w, 0.5, True)))
    assert len(calls) == 2


@pytest.mark.cuda
def test_ops_run_on_triton_when_cutlass_is_unavailable(monkeypatch):
    monkeypatch.setattr(_common, "HAVE_CUTE", False)
    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    q, pos, cs, w, (qd, posd, csd, wd) = _data(7, 64, 128, torch.bfloat16, "cuda", seed=7)
    got = dsv4.indexer_q_rope_mxfp4(qd, posd, csd, wd, 0.5)
    assert all(_same(a, b) for a, b in zip(got, reference.indexer_q_rope_mxfp4(q, pos, cs, w, 0.5)))


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_out_of_range_positions_stay_inside_the_table():
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    q, pos, cs, w, (qd, posd, csd, wd) = _data(8, 64, 128, torch.float32, "cuda")
    posd = posd.clone()
    posd[3] = 10**9
    posd[5] = -7
    q_fp8, w_out = cute_iq.indexer_q_rope_fp8(qd, posd, csd, wd, 1.0)
    torch.cuda.synchronize()
    ok = torch.ones(8, dtype=torch.bool)
    ok[3] = ok[5] = False
    want = reference.indexer_q_rope_fp8(q[ok], pos[ok], cs, w[ok], 1.0)
    assert _same(q_fp8[ok.cuda()], want[0])
    # MXFP4: the rows with a position outside the table have NaN rope dims (the last 64: blocks 2, 3),
    # and a block holding a NaN gets the E8M0 NaN scale byte (reference.quant.mxfp4_quant), never a
    # plausible scale; the other rows stay bit-exact
    q_mx, q_scale, w_mx = cute_iq.indexer_q_rope_mxfp4(qd, posd, csd, wd, 1.0)
    want = reference.indexer_q_rope_mxfp4(q[ok], pos[ok], cs, w[ok], 1.0)
    assert all(_same(a[ok.cuda()], b) for a, b in zip((q_mx, q_scale, w_mx), want))
    bad = q_scale[~ok.cuda()].cpu()
    assert (bad[..., 2:] == 0xFF).all() and (bad[..., :2] != 0xFF).all()


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_kernel_launches_on_the_current_stream_and_under_graph_capture():
    # tvm-ffi takes the stream from torch's current stream: a side stream and a CUDA-graph capture
    # (which rejects launches on any other stream) must both see the kernel.
    from dsv4_compile.kernels.cute import indexer_q as cute_iq

    q, pos, cs, w, (qd, posd, csd, wd) = _data(32, 64, 128, torch.float32, "cuda", seed=11)
    want = reference.indexer_q_rope_fp8(q, pos, cs, w, 0.5, True)
    cute_iq.indexer_q_rope_fp8(qd, posd, csd, wd, 0.5, True)  # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cute_iq.indexer_q_rope_fp8(qd, posd, csd, wd, 0.5, True)
    torch.cuda.current_stream().wait_stream(side)
    assert all(_same(a, b) for a, b in zip(got, want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = cute_iq.indexer_q_rope_fp8(qd, posd, csd, wd, 0.5, True)
    graph.replay()
    torch.cuda.synchronize()
    assert all(_same(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------
# kv_insert / kv_rope_insert (fp8_ds_mla record)
# ---------------------------------------------------------------------------------------------
def test_kv_insert_ops_pick_the_backend(fake_gpu, monkeypatch):
    # CPU side: the ops' CUDA kernels go through kernels.cute.backend like the indexer-q ops
    from dsv4_compile.kernels.triton import cache as triton_cache
    from dsv4_compile.ops import cache as ops_cache

    fake_gpu((8, 0))
    assert ops_cache._kv_insert_kernels(CUDA0) is triton_cache
    if not _common.HAVE_CUTE:
        pytest.skip("nvidia-cutlass-dsl not installed")
    from dsv4_compile.kernels.cute import cache as cute_cache

    fake_gpu((9, 0))
    assert ops_cache._kv_insert_kernels(CUDA0) is cute_cache
    monkeypatch.setenv(_common.BACKEND_ENV, "triton")
    assert ops_cache._kv_insert_kernels(CUDA0) is triton_cache


@pytest.mark.skipif(not _common.HAVE_CUTE, reason="nvidia-cutlass-dsl not installed")
def test_cute_kv_insert_falls_back_to_triton_for_unaligned_pages(monkeypatch):
    # CPU side: what the CuTe kernel takes, and that anything else goes to the Triton kernel
    from dsv4_compile.kernels.cute import cache as cute_cache
    from dsv4_compile.kernels.triton import cache as triton_cache
    from test_cache_ops import _cache

    kv = torch.zeros(3, 512, dtype=torch.bfloat16)
    cs = torch.zeros(16, 64)
    ok = _cache("fp8_ds_mla", 16, 2)
    assert cute_cache.supports(kv, cs, ok) and cute_cache.supports(kv, None, ok)
    assert cute_cache.supports(kv, cs.bfloat16(), _cache("fp8_ds_mla", 64, 2, extra=64))
    slack8 = _cache("fp8_ds_mla", 16, 2, extra=40)  # stride(0) % 16 == 8
    shifted = torch.zeros(2, ok.shape[1] + 8, dtype=torch.uint8)[:, 8:]  # pages 8-byte aligned only
    for bad in (slack8, shifted):
        assert not cute_cache.supports(kv, cs, bad)
    assert not cute_cache.supports(kv, cs.half(), ok)
    calls = []
    monkeypatch.setattr(triton_cache, "kv_insert", lambda *a: calls.append(a))
    slots = torch.tensor([0, -1, 5])
    cute_cache.kv_insert(kv, None, None, slack8, slots, 16)
    cute_cache.kv_insert(kv, torch.tensor([1, 2, 3]), cs, shifted, slots, 16)
    assert len(calls) == 2 and calls[0][3] is slack8 and calls[1][3] is shifted


def _kv_insert_case(t, bs, table_dtype, seed, slot_dtype=torch.int64):
    """kv, positions, table, reference slots (−1 = skip) and kernel slots (some of the −1 turned into
    slots past the cache, which the kernel must mask), pages."""
    from test_cache_ops import _kv, _slots

    g = torch.Generator().manual_seed(seed)
    nb = max(2, -(-2 * t // bs))
    kv = _kv(t, seed)
    pos = torch.randint(0, 4096, (t,), generator=g)
    cs = torch.randn(4096, 64, generator=g).to(table_dtype)  # any table values must round the same
    slots = _slots(t, nb * bs, seed)
    past = slots.clone()
    pad = (slots < 0).nonzero().flatten()
    past[pad[::2]] = nb * bs + torch.arange(pad[::2].numel())  # just past the end, and beyond
    if pad.numel() > 2:
        past[pad[2]] = torch.iinfo(slot_dtype).max
    return kv, pos, cs, slots, past.to(slot_dtype), nb


def _paged(bs, nb, device, extra):
    """(sentinel-filled cache view [nb, page_bytes], the whole buffer including the slack)."""
    from test_cache_ops import SENTINEL

    pb = layouts.page_bytes("fp8_ds_mla", bs)
    full = torch.full((nb, pb + extra), SENTINEL, dtype=torch.uint8, device=device)
    return full[:, :pb], full


@pytest.mark.cuda
@needs_cute_gpu
@pytest.mark.parametrize("t", [1, 7, 64, 1000, 5000])
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_cute_kv_insert_bit_exact(t, bs, table_dtype):
    from dsv4_compile.kernels.cute import cache as cute_cache
    from dsv4_compile.reference import cache as ref_cache

    slot_dtype = torch.int32 if t % 2 else torch.int64
    kv, pos, cs, slots, past, nb = _kv_insert_case(t, bs, table_dtype, seed=t + bs, slot_dtype=slot_dtype)
    for extra in (0, 576):  # contiguous pages, and strided pages with slack after each
        for rope in (False, True):
            want, want_full = _paged(bs, nb, "cpu", extra)
            got, got_full = _paged(bs, nb, "cuda", extra)
            assert cute_cache.supports(kv, cs if rope else None, got)
            if rope:
                ref_cache.kv_rope_insert(kv, pos, cs, want, slots, bs)
                p = pos.cuda() if t % 3 else pos.int().cuda()
                cute_cache.kv_insert(kv.cuda(), p, cs.cuda(), got, past.cuda(), bs)
            else:
                ref_cache.kv_insert(kv, want, slots, bs)
                cute_cache.kv_insert(kv.cuda(), None, None, got, past.cuda(), bs)
            assert torch.equal(got_full.cpu(), want_full), (extra, rope)  # record bytes, and nothing else


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_kv_insert_strided_kv_and_out_of_range_positions():
    from dsv4_compile.kernels.cute import cache as cute_cache
    from dsv4_compile.reference import cache as ref_cache

    t, bs = 33, 16
    kv, pos, cs, slots, past, nb = _kv_insert_case(t, bs, torch.float32, seed=2)
    wide = torch.zeros(t, 1024, dtype=torch.bfloat16)
    wide[:, 256:768] = kv  # rows with stride 1024, starting 512 bytes in
    posd = pos.clone().cuda()
    posd[4] = 10**9  # out of the table: never read, the rotated dims come out NaN (as in Triton)
    posd[5] = -3
    got, _ = _paged(bs, nb, "cuda", 0)
    cute_cache.kv_insert(wide.cuda()[:, 256:768], posd, cs.cuda(), got, past.cuda(), bs)
    want, _ = _paged(bs, nb, "cpu", 0)
    ref_cache.kv_rope_insert(kv, pos, cs, want, slots, bs)
    got = got.cpu()
    rope_bytes = torch.zeros_like(want, dtype=torch.bool)
    for i in (4, 5):
        page, k = int(slots[i]) // bs, int(slots[i]) % bs
        assert slots[i] >= 0
        rope_bytes[page, k * 576 + 448 : (k + 1) * 576] = True
        assert bool(got[page, k * 576 + 448 : (k + 1) * 576].view(torch.bfloat16).isnan().all())
    assert torch.equal(got[~rope_bytes], want[~rope_bytes])


@pytest.mark.cuda
@needs_cute_gpu
def test_ops_dispatch_kv_inserts_to_cute_and_fall_back_for_unaligned_pages(monkeypatch):
    from dsv4_compile.kernels.cute import cache as cute_cache
    from dsv4_compile.reference import cache as ref_cache

    monkeypatch.setenv(_common.BACKEND_ENV, "cute")
    compiled = []
    original = cute_cache.KVInsertKernel.compile
    monkeypatch.setattr(cute_cache.KVInsertKernel, "compile",
                        staticmethod(lambda *a, **k: compiled.append(a) or original(*a, **k)))
    t, bs = 100, 64
    kv, pos, cs, slots, past, nb = _kv_insert_case(t, bs, torch.float32, seed=9)
    for extra, cute_path in ((0, True), (40, False)):  # 40: stride(0) % 16 == 8 -> Triton
        n = len(compiled)
        want, want_full = _paged(bs, nb, "cpu", extra)
        got, got_full = _paged(bs, nb, "cuda", extra)
        ref_cache.kv_rope_insert(kv, pos, cs, want, slots, bs)
        dsv4.kv_rope_insert(kv.cuda(), pos.cuda(), cs.cuda(), got, past.cuda(), bs)
        ref_cache.kv_insert(kv.flip(0), want, slots, bs)
        dsv4.kv_insert(kv.flip(0).cuda(), got, past.cuda(), bs)
        assert torch.equal(got_full.cpu(), want_full)
        assert (len(compiled) == n + 2) == cute_path


@pytest.mark.cuda
@needs_cute_gpu
def test_cute_kv_rope_insert_under_graph_capture_and_replay(monkeypatch):
    from dsv4_compile.kernels.cute import cache as cute_cache
    from dsv4_compile.reference import cache as ref_cache

    monkeypatch.setenv(_common.BACKEND_ENV, "cute")
    t, bs = 48, 64
    kv, pos, cs, slots, past, nb = _kv_insert_case(t, bs, torch.float32, seed=0)
    csd = cs.cuda()
    static = dict(kv=kv.cuda(), pos=pos.cuda(), slots=past.cuda())
    got, _ = _paged(bs, nb, "cuda", 0)
    got_plain, _ = _paged(bs, nb, "cuda", 0)

    def step():
        dsv4.kv_rope_insert(static["kv"], static["pos"], csd, got, static["slots"], bs)
        cute_cache.kv_insert(static["kv"], None, None, got_plain, static["slots"], bs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture, and run on a side stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    want, _ = _paged(bs, nb, "cpu", 0)
    want_plain, _ = _paged(bs, nb, "cpu", 0)
    ref_cache.kv_rope_insert(kv, pos, cs, want, slots, bs)
    ref_cache.kv_insert(kv, want_plain, slots, bs)
    for seed in (1, 2, 3):  # new data copied into the same buffers, then replayed
        kv, pos, _, slots, past, _ = _kv_insert_case(t, bs, torch.float32, seed=seed)
        for name, x in (("kv", kv), ("pos", pos), ("slots", past)):
            static[name].copy_(x)
        graph.replay()
        ref_cache.kv_rope_insert(kv, pos, cs, want, slots, bs)
        ref_cache.kv_insert(kv, want_plain, slots, bs)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want) and torch.equal(got_plain.cpu(), want_plain)

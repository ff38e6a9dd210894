"""``dsv4::fp8_block_gemm`` (issue 15, the GEMM part): the reference against an independent float64
computation (dequantize every value exactly, one matmul), the Triton kernel (interpreter on CPU, the
GPU when present) against the reference with and without split-K, ragged N / M, e8m0 weight scales,
opcheck, the fake, ValueErrors, and the bound of the FP8 path against the bf16 dequantized weight."""

import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile.kernels.triton import gemm as kernels
from dsv4_compile.kernels.triton import primitives as quant_kernels
from dsv4_compile.model.attention import dequant_fp8_weight
from dsv4_compile.reference import gemm as ref
from dsv4_compile.reference import quant as ref_quant

dsv4 = torch.ops.dsv4


def _case(M, N, K, seed=0, e8m0=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    x_q, x_scale = dsv4.fp8_block_quant(x, 128)
    w = torch.randn(N, K, generator=g)
    w_q = (w * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
    e = torch.randint(-9, -3, (-(-N // 128), K // 128), generator=g).float()
    w_scale = torch.exp2(e)
    if e8m0:
        w_scale = w_scale.to(torch.float8_e8m0fnu)
    else:
        w_scale = w_scale * (1 + torch.rand(w_scale.shape, generator=g))  # any fp32 scale (HF checkpoints)
    return x_q, x_scale, w_q, w_scale


def _float64(x_q, x_scale, w_q, w_scale):
    """Independent: every value dequantized exactly in float64, one matmul."""
    xd = x_q.double() * x_scale.double().repeat_interleave(128, dim=1)
    ws = w_scale.to(torch.float32).double().repeat_interleave(128, 0)[: w_q.shape[0]].repeat_interleave(128, 1)
    return xd @ (w_q.double() * ws).T


@pytest.mark.parametrize("M,N,K", [(1, 256, 256), (5, 200, 384), (40, 130, 128), (0, 128, 128)])
@pytest.mark.parametrize("e8m0", [False, True])
def test_reference_is_the_exact_product_within_fp32_sums(M, N, K, e8m0):
    case = _case(M, N, K, seed=M + N, e8m0=e8m0)
    got = ref.fp8_block_gemm(*case, torch.float32).double()
    want = _float64(*case)
    # fp32 sums of K exact products: |err| <= K * 2^-24 * Σ|terms| (a loose bound: a few ulps in practice)
    terms = _float64(*(t.abs() if t.dtype != torch.float8_e8m0fnu else t for t in (case[0].float().abs().to(
        torch.float8_e4m3fn), case[1], case[2].float().abs().to(torch.float8_e4m3fn), case[3])))
    assert ((got - want).abs() <= K * 2.0**-24 * terms + 1e-30).all()
    assert dsv4.fp8_block_gemm(*case).dtype == torch.bfloat16


@pytest.mark.parametrize("M,N,K,splits", [(1, 256, 512, None), (3, 200, 512, 3), (17, 384, 256, 1),
                                          (40, 130, 384, 2)])
def test_kernel_matches_reference(kernel_device, M, N, K, splits):
    case = _case(M, N, K, seed=K + M)
    dev = [t.to(kernel_device) for t in case]
    want = ref.fp8_block_gemm(*case, torch.float32)
    got = kernels.fp8_block_gemm(*dev, torch.float32, splits=splits).cpu()
    if kernel_device.type == "cuda":  # Hopper's FP8 wgmma (64-row tiles) accumulates below fp32: the GPU bound
        assert float(((got.double() - want.double()).abs() / _l1(*case)).max()) <= GPU_BOUND
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
    got16 = kernels.fp8_block_gemm(*dev, torch.bfloat16, splits=splits).cpu()
    torch.testing.assert_close(got16.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_fp8_path_against_the_dequantized_bf16_weight():
    """What the model gains or loses: the FP8 path (activations quantized 1x128) against a bf16
    matmul of the bf16-dequantized weight. Documented bound (docs/numerics.md §4.5): relative RMS
    error <= 2^-4 (e4m3 activations: 3 mantissa bits, error ~2^-5 RMS per value)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, 1024, generator=g).bfloat16()
    w_q = (torch.randn(512, 1024, generator=g) * 16).to(torch.float8_e4m3fn)
    w_scale = torch.exp2(torch.randint(-8, -4, (4, 8), generator=g).float())
    w_bf16 = dequant_fp8_weight(w_q, w_scale)
    want = x.float() @ w_bf16.float().T
    got = dsv4.fp8_block_gemm(*dsv4.fp8_block_quant(x, 128), w_q, w_scale).float()
    rel = (got - want).norm() / want.norm()
    assert 1e-3 < rel < 2.0**-4, rel


def test_opcheck_fake_and_errors():
    case = _case(3, 200, 256)
    # test_schema compares inputs with allclose, which torch lacks for e4m3: the inputs by bytes instead
    utils = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    before = [t.clone() for t in case]
    torch.library.opcheck(dsv4.fp8_block_gemm.default, case, test_utils=utils)
    torch.library.opcheck(dsv4.fp8_block_gemm.default, case, {"out_dtype": torch.float32}, test_utils=utils)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, case))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = dsv4.fp8_block_gemm(*(mode.from_tensor(t) for t in case))
    assert out.shape == (3, 200) and out.stride() == (200, 1) and out.dtype == torch.bfloat16
    x_q, x_scale, w_q, w_scale = case
    bad = [
        (lambda: dsv4.fp8_block_gemm(x_q.float(), x_scale, w_q, w_scale), "x_q must be one of"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale, w_q[:, :200], w_scale), "multiple of 128"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale, w_q[:, :128], w_scale[:, :1]), "last dim must be"),
        (lambda: dsv4.fp8_block_gemm(x_q.view(3, 2, 128), x_scale.view(3, 2, 1), w_q[:, :128], w_scale[:, :1]),
         "G·128"),
        (lambda: dsv4.fp8_block_gemm(x_q.view(3, 1, 2, 128), x_scale, w_q, w_scale), "grouped"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale[:, :1], w_q, w_scale), "x_scale must be"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale, w_q, w_scale[:1]), "w_scale must be"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale, w_q, w_scale.bfloat16()), "w_scale must be one of"),
        (lambda: dsv4.fp8_block_gemm(x_q, x_scale, w_q, w_scale, torch.int32), "out_dtype"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()


def _l1(x_q, x_scale, w_q, w_scale):
    """Σ of |terms| of every output (the scale of fp32 / tensor-core summation error)."""
    a = (x_q.float().abs().to(torch.float8_e4m3fn), x_scale, w_q.float().abs().to(torch.float8_e4m3fn), w_scale)
    return _float64(*a)


def _grouped_case(M, G, n, K, seed=0):
    """A grouped (``wo_a``-like) case: x_q [M, G, K] laid out group-major (as the fused output quant
    writes it) and its scales MN-major, with the 2-D reference of each group."""
    g = torch.Generator().manual_seed(seed)
    x_q, x_scale = dsv4.fp8_block_quant(torch.randn(M, G, K, generator=g) * 3, 128)
    x_q = x_q.transpose(0, 1).contiguous().transpose(0, 1)
    x_scale = x_scale.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    w_q = (torch.randn(G * n, K, generator=g) * 8).to(torch.float8_e4m3fn)
    w_scale = torch.exp2(torch.randint(-9, -3, (G * n // 128, K // 128), generator=g).float())
    want = torch.cat([ref.fp8_block_gemm(x_q[:, i].contiguous(), x_scale[:, i].contiguous(), w_q[i * n:(i + 1) * n],
                                         w_scale[i * n // 128:(i + 1) * n // 128], torch.float32) for i in range(G)], 1)
    return (x_q, x_scale, w_q, w_scale), want


def _op_cases(device):
    """``(op overload, args, kwargs)`` of the FP8 GEMM ops (shared with ``test_strided_args``): 2-D and
    grouped ``fp8_block_gemm`` (one with split-K at this size), and ``fp8_linear``."""
    two_d = _case(3, 200, 256, seed=5)
    grouped, _ = _grouped_case(5, 2, 128, 256, seed=6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 256, generator=g).bfloat16()
    w_q, w_scale = two_d[2], two_d[3]
    return [(dsv4.fp8_block_gemm.default, tuple(t.to(device) for t in two_d), {}),
            (dsv4.fp8_block_gemm.default, tuple(t.to(device) for t in grouped), {"out_dtype": torch.float32}),
            (dsv4.fp8_linear.default, (x.to(device), w_q.to(device), w_scale.to(device)), {})]


def test_grouped_reference_and_kernel(kernel_device):
    case, want = _grouped_case(5, 4, 128, 256)
    assert torch.equal(ref.fp8_block_gemm(*case, torch.float32), want)
    assert torch.equal(dsv4.fp8_block_gemm(*case, torch.float32), want)
    dev = [t.to(kernel_device) for t in case]
    for splits in (1, 2):
        got = kernels.fp8_block_gemm(*dev, torch.float32, splits=splits).cpu()
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
    if kernel_device.type == "cpu":  # the split-K counters are left zero for the next call
        assert not kernels._counter_buffer(torch.device("cpu"), 1).any()


@pytest.mark.parametrize("M,N,K,splits", [(1, 256, 512, None), (3, 200, 384, 3), (17, 128, 256, 1),
                                          (64, 130, 256, 2), (65, 128, 256, None)])
def test_fp8_linear_is_quant_then_gemm_bit_for_bit(kernel_device, M, N, K, splits):
    """``fp8_linear`` (the GEMV or the tiled kernel quantizing x itself; quant + GEMM otherwise) equals
    the quant op's kernel then the GEMM kernel bit for bit, with a NaN row and a zero row (the floor's
    scale) where there are several, and an fp32 x. (Under the interpreter both quantize with its own e4m3
    conversion, which is not the hardware's round-to-nearest-even: the kernels' agreement is what is checked
    there; on the GPU the quant kernel is bit-exact with the reference, ``test_triton_kernels``.)"""
    g = torch.Generator().manual_seed(M + K)
    _, _, w_q, w_scale = _case(1, N, K, seed=N)
    x = torch.randn(M, K, generator=g) * 5
    if M > 1:  # (one row: a NaN would make every output NaN, hiding any difference)
        x[1, 3] = float("nan")
    if M > 2:
        x[2] = 0
    dev = [t.to(kernel_device) for t in (w_q, w_scale)]
    for xin in (x.bfloat16(), x):
        xd = xin.to(kernel_device)
        x_q, x_scale = quant_kernels.fp8_block_quant(xd, 128, 1e-4)  # the quant op's kernel
        for backend in (None, "triton"):  # automatic (one row: the fused GEMV), the fused tiled kernel
            want = kernels.fp8_block_gemm(x_q, x_scale, *dev, torch.float32, splits=splits, backend=backend)
            got = kernels.fp8_linear(xd, *dev, torch.float32, splits=splits, backend=backend)
            assert torch.equal(_bytes(got), _bytes(want))
        assert torch.equal(_bytes(dsv4.fp8_linear(xin, w_q, w_scale)), _bytes(ref.fp8_linear(xin, w_q, w_scale)))
    assert torch.equal(_bytes(ref.fp8_linear(x, w_q, w_scale, torch.float32)),
                       _bytes(ref.fp8_block_gemm(*ref_quant.fp8_block_quant(x, 128), w_q, w_scale, torch.float32)))


@pytest.mark.parametrize("M,N,K,cfg", [(1, 256, 512, {}), (1, 200, 384, {}), (1, 384, 1024, {"k_chunk": 256}),
                                       (2, 130, 640, {"k_chunk": 128, "rows": 8}), (4, 256, 256, {"rows": 16})])
def test_gemv_matches_reference(kernel_device, M, N, K, cfg):
    """The GEMV (one row by default; up to 4 forced): against the reference within fp32 rounding,
    against the float64 product within the GPU bound, ragged N (masked rows), K split over programs
    (``k_chunk`` below K: the split-order reduction) with a ragged last split, deterministic, and the
    counters left zero."""
    case = _case(M, N, K, seed=N + K)
    dev = [t.to(kernel_device) for t in case]
    want = ref.fp8_block_gemm(*case, torch.float32)
    got = kernels.fp8_block_gemm(*dev, torch.float32, backend="gemv", **cfg)
    assert torch.equal(got, kernels.fp8_block_gemm(*dev, torch.float32, backend="gemv", **cfg))
    got = got.cpu()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
    assert float(((got.double() - _float64(*case)).abs() / _l1(*case)).max()) <= GPU_BOUND
    assert not kernels._counter_buffer(kernel_device, 1).any()


def test_gemv_and_tiled_kernel_read_a_column_slice_weight(kernel_device):
    """A weight with a unit last stride but a longer row (a column slice) is read through its row
    stride by both kernels (no copy), and a weight with another last stride is copied first."""
    x_q, x_scale, w_q, w_scale = _case(2, 256, 512, seed=4)
    wide = torch.cat([w_q.view(torch.uint8), w_q.view(torch.uint8)], 1).view(torch.float8_e4m3fn)  # [256, 1024]
    sl = wide[:, 512:]
    tr = w_q.t().contiguous().t()  # last stride 256
    dev = lambda *t: [a.to(kernel_device) for a in t]  # noqa: E731
    want = ref.fp8_block_gemm(x_q, x_scale, w_q, w_scale, torch.float32)
    for w in (sl, tr):
        for backend, xs in (("gemv", (x_q[:1], x_scale[:1])), ("triton", (x_q, x_scale))):
            got = kernels.fp8_block_gemm(*dev(*xs), dev(w)[0] if w is tr else wide.to(kernel_device)[:, 512:],
                                         w_scale.to(kernel_device), torch.float32, backend=backend).cpu()
            torch.testing.assert_close(got, want[: got.shape[0]], rtol=2e-6, atol=1e-6 * float(want.abs().max()))


def test_gemv_grouped_and_fp8_linear(kernel_device):
    """The grouped form (``wo_a``: group-major x, MN-major scales) and the fused quant through the GEMV."""
    case, want = _grouped_case(1, 4, 128, 256, seed=3)
    got = kernels.fp8_block_gemm(*(t.to(kernel_device) for t in case), torch.float32, backend="gemv").cpu()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6 * float(want.abs().max()))
    _, _, w_q, w_scale = _case(1, 256, 512, seed=9)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(9)).to(kernel_device)
    dev = [t.to(kernel_device) for t in (w_q, w_scale)]
    for cfg in ({}, {"k_chunk": 128}):
        x_q, x_scale = quant_kernels.fp8_block_quant(x, 128, 1e-4)
        a = kernels.fp8_block_gemm(x_q, x_scale, *dev, torch.float32, backend="gemv", **cfg)
        b = kernels.fp8_linear(x, *dev, torch.float32, backend="gemv", **cfg)
        assert torch.equal(_bytes(a), _bytes(b))


def test_fp8_linear_fuses_the_quant_only_where_it_pays():
    """One row with K up to 4096 quantizes inside the GEMV (one launch); a longer K or more rows run
    the quant kernel, then the GEMM (the GEMV for two or three rows of a narrow weight)."""
    from dsv4_compile.kernels.triton import primitives

    def launches(M, K):
        _, _, w_q, w_scale = _case(1, 128, K, seed=K)
        q = primitives._fp8_block_quant_kernel
        before = q.launches + q.fast, kernels._gemv_kernel.launches + kernels._gemv_kernel.fast
        kernels.fp8_linear(torch.randn(M, K), w_q, w_scale)
        return q.launches + q.fast - before[0], kernels._gemv_kernel.launches + kernels._gemv_kernel.fast - before[1]

    assert launches(1, 4096) == (0, 1)
    assert launches(1, 8192) == (1, 1)
    assert launches(2, 512) == (1, 1) and launches(3, 512) == (1, 1)  # a 128-row weight: narrow
    assert launches(4, 512) == (1, 0)


def test_gemv_dispatch(monkeypatch):
    """One row goes to the GEMV unless a tiled configuration or ``DSV4_FP8_GEMM=triton`` asks for the
    tiled kernel; two or three rows of a weight of at most 2048 rows too, four rows or two of a wider
    weight go to the tiled kernel (off a GPU with CuTe DSL); the GEMV refuses more than 4 rows; its
    config rule."""
    case = _case(2, 256, 512, seed=1)
    one = (case[0][:1], case[1][:1], case[2], case[3])
    wide = _case(2, 2176, 256, seed=4)
    four = _case(4, 256, 512, seed=5)

    def launches(**kw):
        before = (kernels._gemv_kernel.launches + kernels._gemv_kernel.fast,
                  kernels._fp8_block_gemm_kernel.launches + kernels._fp8_block_gemm_kernel.fast)
        kernels.fp8_block_gemm(*kw.pop("args", one), **kw)
        return (kernels._gemv_kernel.launches + kernels._gemv_kernel.fast - before[0],
                kernels._fp8_block_gemm_kernel.launches + kernels._fp8_block_gemm_kernel.fast - before[1])

    assert launches() == (1, 0)
    assert launches(splits=2) == (0, 1)
    assert launches(args=case) == (1, 0)
    assert launches(args=wide) == (0, 1) and launches(args=four) == (0, 1)
    assert launches(args=wide, backend="gemv") == (1, 0) and launches(args=four, backend="gemv") == (1, 0)
    assert [kernels._gemv_rows(m, n) for m, n in ((1, 40960), (2, 2048), (3, 1536), (4, 1536), (2, 2049))] == [
        True, True, True, False, False]
    assert launches(splits=None) == (1, 0)  # None is the default, not a tiled configuration
    assert launches(args=wide, rows=8) == (0, 1)  # GEMV keys do not reach the tiled kernel's config
    with pytest.raises(ValueError, match="at most 4 rows"):
        kernels.fp8_block_gemm(*_case(5, 128, 128), backend="gemv")
    with pytest.raises(ValueError, match="at most 4 rows"):
        kernels.fp8_linear(torch.randn(5, 128), *_case(1, 128, 128)[2:], backend="gemv")
    # a forced split K with more row tiles than counters: refused (the automatic path falls back)
    big = _case(1, 4097, 256, seed=2)
    with pytest.raises(ValueError, match="tile counters"):
        kernels.fp8_block_gemm(*big, backend="gemv", rows=1, k_chunk=128)
    assert launches(args=big, rows=1, k_chunk=128) == (0, 1)
    monkeypatch.setenv(kernels.GEMM_ENV, "triton")
    assert launches() == (0, 1)
    assert kernels.gemv_config(40960, 1024) == (16, 1024, 1)  # q_proj: 16 KiB slabs
    assert kernels.gemv_config(4096, 8192) == (4, 8192, 1)  # wo_b: 32 KiB
    assert kernels.gemv_config(1024, 16384) == (4, 8192, 2)
    with pytest.raises(ValueError, match="power of two"):
        kernels.gemv_config(256, 512, rows=3)
    # the CuTe-DSL kernel forced where it cannot run (off a Hopper GPU, or without CuTe DSL): a ValueError
    with pytest.raises(ValueError, match="CuTe-DSL kernel does not take|needs nvidia-cutlass-dsl"):
        kernels.fp8_block_gemm(*_case(8, 256, 256), backend="cute")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_fp32_reference_and_gemv(kernel_device, dtype):
    """``dsv4::linear_fp32``: the reference is the float64 product of the 16-bit values within fp32
    summation error; the GEMV (one row, forced up to 4, K split, ragged N and K) matches it."""
    g = torch.Generator().manual_seed(5)
    for M, N, K, cfg in ((1, 200, 512, {}), (3, 130, 384, {}), (1, 64, 1024, {"k_chunk": 256}), (2, 40, 100, {})):
        x = torch.randn(M, K, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(dtype)
        want = ref.linear_fp32(x, w)
        exact = x.double() @ w.double().T
        bound = K * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
        if dtype != torch.float32:  # 16-bit products are exact in fp32: only the sums round
            assert ((want.double() - exact).abs() <= bound).all()
        assert torch.equal(dsv4.linear_fp32(x, w), want)
        got = kernels.linear_fp32(x.to(kernel_device), w.to(kernel_device), backend="gemv", **cfg).cpu()
        assert got.dtype == torch.float32
        assert ((got.double() - exact).abs() <= 2 * bound + 1e-30).all()


def test_linear_fp32_opcheck_and_errors():
    x = torch.randn(3, 256).bfloat16()
    w = torch.randn(64, 256).bfloat16()
    torch.library.opcheck(dsv4.linear_fp32.default, (x, w))
    torch.library.opcheck(dsv4.linear_fp32.default, (x[:, :128], w[:, 128:]))  # strided views
    for bad, match in (((x, w.float()), "weight"), ((x, w[:, :128]), "K"), ((x[0], w), "x"),
                       ((x.to(torch.int32), w), "x")):
        with pytest.raises(ValueError, match=match):
            dsv4.linear_fp32(*bad)


def _bytes(t):
    return t.contiguous().view(torch.uint8)


def test_kernel_rejects_a_tile_that_straddles_a_weight_scale_block():
    """An N tile reads one weight-scale row: it must sit inside one 128-row block and one group."""
    case = _case(2, 256, 256)
    for bn in (256, 96):
        with pytest.raises(ValueError, match="block_n"):
            kernels.fp8_block_gemm(*case, block_n=bn)
    cpu = torch.device("cpu")
    assert kernels.gemm_config(300, 256, 2, cpu, n_per_group=128)[1] == 128
    assert kernels.gemm_config(300, 256, 2, cpu, n_per_group=192)[1] == 64
    with pytest.raises(ValueError, match="block_n"):
        kernels.gemm_config(2, 256, 2, cpu, n_per_group=96, block_n=64)


def test_fp8_linear_opcheck_and_errors():
    op, args, kw = _op_cases("cpu")[2]
    # test_schema compares inputs with allclose, which torch lacks for e4m3 (as for fp8_block_gemm)
    torch.library.opcheck(op, args, kw, test_utils=("test_faketensor", "test_aot_dispatch_dynamic",
                                                   "test_autograd_registration"))
    x, w_q, w_scale = args
    bad = [
        (lambda: dsv4.fp8_linear(x.int(), w_q, w_scale), "x must be one of"),
        (lambda: dsv4.fp8_linear(x[:, :128], w_q, w_scale), "x must be"),
        (lambda: dsv4.fp8_linear(x, w_q, w_scale[:1]), "w_scale must be"),
        (lambda: dsv4.fp8_linear(x, w_q, w_scale, torch.int32), "out_dtype"),
        (lambda: dsv4.fp8_linear(x, w_q, w_scale, torch.bfloat16, 0.0), "scale_floor"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()


# Hopper's FP8 tensor-core dot (wgmma) keeps fewer accumulator bits than fp32 inside one 128-wide K
# block (the DeepSeek-V3 technical report, section 3.3.2: about 14); the kernel promotes to fp32 once
# per block, as DeepGEMM does. Bound: 2^-11 of the output's Σ|terms| (docs/numerics.md §4.5).
GPU_BOUND = 2.0**-11


@pytest.mark.cuda
@pytest.mark.parametrize("M,backend", [(1, "triton"), (8, "triton"), (64, "triton"), (300, "triton"),
                                       (300, "scaled_mm"), (2048, "scaled_mm"), (1, "gemv"), (4, "gemv")])
def test_gpu_op_matches_reference(M, backend):
    """The op dispatches to cuBLAS from 256 rows only (cuBLAS refuses block-wise scales at M = 1 on the
    H200's torch 2.11), so the scaled_mm backend is checked there."""
    if backend == "scaled_mm" and not kernels._scaled_mm_supported(torch.device("cuda")):
        pytest.skip("torch._scaled_mm takes no block-wise scales with this torch / cuBLAS")
    case = _case(M, 4096, 1024, seed=M)
    want = ref.fp8_block_gemm(*case, torch.float32)
    dev = [t.cuda() for t in case]
    got = kernels.fp8_block_gemm(*dev, torch.float32, backend=backend)
    again = kernels.fp8_block_gemm(*dev, torch.float32, backend=backend)
    assert torch.equal(got, again), "not deterministic"
    err = (got.cpu().double() - want.double()).abs()
    ratio = float((err / _l1(*case)).max())
    assert ratio <= GPU_BOUND, f"max |err| / Σ|terms| = {ratio:.3g} (2^{torch.tensor(ratio).log2():.1f})"
    if backend == "triton" and M <= 64:  # every split count agrees within the same bound
        for splits in (1, 3, 8):
            g = kernels.fp8_block_gemm(*dev, torch.float32, backend=backend, splits=splits).cpu().double()
            assert float(((g - want.double()).abs() / _l1(*case)).max()) <= GPU_BOUND
    if M == 8:  # through the op, default dispatch
        torch.testing.assert_close(dsv4.fp8_block_gemm(*dev).float().cpu(), want, rtol=1e-2,
                                   atol=1e-2 * float(want.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 8, 13, 32, 64])
def test_gpu_cute_gemm_matches_reference(M):
    """The CuTe-DSL decode GEMM (Hopper) against the reference within the wgmma bound: its default
    configuration, unsplit and split-K (1-8 splits, 4 and 6 stages: deterministic, the counters zero
    after), fp32 and bf16 output, a grouped x (``wo_a``) with its group-major scales."""
    pytest.importorskip("cutlass")
    from dsv4_compile.kernels import _device
    from dsv4_compile.kernels.cute import gemm as cute_gemm

    case = _case(M, 1024, 2048, seed=100 + M)
    dev = [t.cuda() for t in case]
    if not cute_gemm.supports(dev[0], dev[2], torch.float32):
        pytest.skip("the CuTe-DSL GEMM needs a Hopper GPU")
    want = ref.fp8_block_gemm(*case, torch.float32)
    l1 = _l1(*case)
    for cfg in ({}, dict(splits=1), dict(splits=3), dict(splits=8, stages=6), dict(splits=2, stages=6),
                dict(splits=1, stages=3), dict(splits=1, stages=5), dict(splits=1, stages=8)):
        got = kernels.fp8_block_gemm(*dev, torch.float32, backend="cute", **cfg)
        assert torch.equal(got, kernels.fp8_block_gemm(*dev, torch.float32, backend="cute", **cfg)), cfg
        ratio = float(((got.cpu().double() - want.double()).abs() / l1).max())
        assert ratio <= GPU_BOUND, (cfg, ratio)
        assert not _device.zeroed_counters(torch.device("cuda"), "fp8_gemm_cute", 1).any()
    # the op's default dispatch takes it (K = 2048: one row too), except 2-3 rows of this narrow weight: the GEMV
    default = "gemv" if M > 1 and kernels._gemv_rows(M, 1024) else "cute"
    if M <= kernels.CUTE_MAX_M:
        assert torch.equal(dsv4.fp8_block_gemm(*dev, torch.float32),
                           kernels.fp8_block_gemm(*dev, torch.float32, backend=default)), default
    got16 = kernels.fp8_block_gemm(*dev, torch.bfloat16, backend="cute")
    torch.testing.assert_close(got16.float().cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    gcase, gwant = _grouped_case(M, 8, 256, 1024, seed=M)
    got = kernels.fp8_block_gemm(*(t.cuda() for t in gcase), torch.float32, backend="cute").cpu()
    gl1 = torch.cat([_l1(gcase[0][:, i], gcase[1][:, i], gcase[2][i * 256:(i + 1) * 256],
                         gcase[3][i * 2:(i + 1) * 2]) for i in range(8)], 1)
    assert float(((got.double() - gwant.double()).abs() / gl1).max()) <= GPU_BOUND


def test_cute_gemm_config():
    """The CuTe-DSL kernel's launch rule: split-K only where four splits of every tile fit the SMs; the
    deepest ring with which every CTA is resident at once (up to 8 stages for one an SM, 6 for more; at
    least 3, else one CTA fewer an SM); the staged scales cap a split's K blocks."""
    cute_gemm = pytest.importorskip("dsv4_compile.kernels.cute.gemm")
    assert cute_gemm.gemm_config(8, 12 * 128, 32, 132) == (4, 8, 8)  # wq_a+wkv: 48 CTAs
    for M, stages in ((1, 6), (8, 6), (16, 6), (32, 5), (64, 4)):  # wq_b: 256 CTAs, two an SM
        assert cute_gemm.gemm_config(M, 256 * 128, 8, 132) == (1, 8, stages)
        mb = cute_gemm._mb(M)
        assert 2 * (cute_gemm.smem_bytes(mb, stages) + 1024) <= cute_gemm.SMEM_PER_SM
        assert stages == 6 or 2 * (cute_gemm.smem_bytes(mb, stages + 1) + 1024) > cute_gemm.SMEM_PER_SM
    for M, stages in ((1, 4), (8, 4), (16, 3), (32, 3), (64, 4)):  # q_proj: 320 CTAs, three an SM (64 rows: two)
        assert cute_gemm.gemm_config(M, 320 * 128, 8, 132) == (1, 8, stages)
    assert 3 * (cute_gemm.smem_bytes(64, 3) + 1024) > cute_gemm.SMEM_PER_SM
    assert cute_gemm.gemm_config(64, 32 * 128, 64, 132) == (4, 16, 8)  # wo_b
    assert cute_gemm.gemm_config(64, 32 * 128, 64, 132, splits=1) == (2, 32, 8)  # 32 K blocks of 64 rows' scales
    assert cute_gemm.smem_bytes(64, 8) <= cute_gemm.SMEM_PER_CTA
    assert cute_gemm.gemm_config(8, 256, 8, 132, stages=3) == (4, 2, 3)
    for M, stages in ((64, 10), (8, 0)):
        with pytest.raises(ValueError, match="do not fit a CTA's shared memory"):
            cute_gemm.gemm_config(M, 256, 8, 132, stages=stages)


def test_cute_dispatch_rows(monkeypatch):
    """The op's automatic dispatch (``_cute_preferred``, with the CuTe DSL backend and ``supports``
    stubbed as on a Hopper GPU): 2-16 rows and one row of K ≤ 2048 always; 17-32 rows only for an
    unsplit launch of at most two tiles an SM; never from 33 rows, off the GPU or past K ≤ 2048 at one row."""
    pytest.importorskip("dsv4_compile.kernels.cute.gemm")
    from dsv4_compile.kernels.cute import _common as cute_common
    from dsv4_compile.kernels.cute import gemm as cute_gemm

    monkeypatch.setattr(cute_common, "backend", lambda device: "cute")
    monkeypatch.setattr(cute_gemm, "supports", lambda x_q, w_q, out_dtype: True)
    monkeypatch.setattr(kernels, "sm_programs", lambda device: 132)
    monkeypatch.setattr(kernels, "interpreting", lambda: False)

    class Fake:  # shape and device of a CUDA tensor, no GPU needed
        def __init__(self, *shape):
            self.shape, self.device = shape, torch.device("cuda", 0)

    def takes(M, N, K):
        return kernels._cute_preferred(Fake(M, K), Fake(N, K), torch.bfloat16)

    assert takes(8, 1536, 4096) and takes(16, 4096, 8192) and takes(1, 32768, 1024) and takes(2, 4096, 8192)
    assert not takes(2, 1536, 4096) and not takes(3, 1536, 4096) and takes(4, 1536, 4096)  # narrow: the GEMV
    assert takes(1, 1536, 2048) and not takes(1, 1536, 2176) and not takes(1, 1536, 4096)
    assert takes(16, 1536, 4096) and not takes(17, 1536, 4096)  # 17 rows: wq_a+wkv's launch is split
    assert takes(32, 32768, 1024) and takes(32, 8192, 1024)  # wq_b, indexer.wq_b: unsplit
    assert not takes(32, 1536, 4096) and not takes(32, 4096, 8192)  # wq_a+wkv, wo_b: 4 splits
    assert not takes(32, 40960, 1024)  # q_proj: 320 tiles, more than two an SM
    assert takes(17, 32768, 1024) and not takes(33, 32768, 1024) and not takes(64, 32768, 1024)
    # grouped x [M, G, K] (wo_a): the rows are x's first dim, the tiles the weight's
    assert kernels._cute_preferred(Fake(32, 8, 1024), Fake(8192, 1024), torch.bfloat16)
    fake = Fake(8, 1024)
    fake.device = torch.device("cpu")
    assert not kernels._cute_preferred(fake, Fake(32768, 1024), torch.bfloat16)


@pytest.mark.cuda
def test_gpu_fp8_linear_one_row_follows_the_gemm_dispatch():
    """One row with K ≤ 2048, where the op's GEMM runs the CuTe-DSL kernel: ``fp8_linear`` runs the
    quant kernel, then that GEMM (no GEMV), bit for bit ``fp8_block_gemm(*fp8_block_quant(x))`` for a
    small and a large weight; with K = 4096 (the GEMM's GEMV) it keeps the quant-fused GEMV, bit for
    bit the same pair."""
    pytest.importorskip("cutlass")
    from dsv4_compile.kernels.cute import gemm as cute_gemm

    q, gemv = quant_kernels._fp8_block_quant_kernel, kernels._gemv_kernel
    for N, K, want_launches in ((256, 512, (1, 0)), (8192, 2048, (1, 0)), (1536, 4096, (0, 1))):
        _, _, w_q, w_scale = (t.cuda() for t in _case(1, N, K, seed=N))
        x = (torch.randn(1, K, generator=torch.Generator().manual_seed(K)) * 5).bfloat16().cuda()
        if not cute_gemm.supports(x, w_q, torch.bfloat16):
            pytest.skip("the CuTe-DSL GEMM needs a Hopper GPU")
        before = q.launches + q.fast, gemv.launches + gemv.fast
        got = kernels.fp8_linear(x, w_q, w_scale, torch.float32)
        assert (q.launches + q.fast - before[0], gemv.launches + gemv.fast - before[1]) == want_launches, (N, K)
        want = kernels.fp8_block_gemm(*quant_kernels.fp8_block_quant(x, 128, 1e-4), w_q, w_scale, torch.float32)
        assert torch.equal(_bytes(got), _bytes(want)), (N, K)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_linear_fp32(M):
    """The op on the GPU (one row: the GEMV; 8 rows: cuBLAS) against the float64 product, the
    comp_proj shape of V4-Flash (2624 x 4096)."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 4096, generator=g).bfloat16()
    w = (torch.randn(2624, 4096, generator=g) * 0.02).bfloat16()
    exact = x.double() @ w.double().T
    got = dsv4.linear_fp32(x.cuda(), w.cuda())
    assert torch.equal(got, dsv4.linear_fp32(x.cuda(), w.cuda()))
    bound = 4096 * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((got.cpu().double() - exact).abs() <= bound).all()


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 64])
def test_gpu_grouped_wo_a_shape(M):
    case, want = _grouped_case(M, 8, 1024, 1024, seed=M)
    got = dsv4.fp8_block_gemm(*(t.cuda() for t in case), torch.float32).cpu()
    l1 = torch.cat([_l1(case[0][:, i], case[1][:, i], case[2][i * 1024:(i + 1) * 1024],
                        case[3][i * 8:(i + 1) * 8]) for i in range(8)], 1)
    assert float(((got.double() - want.double()).abs() / l1).max()) <= GPU_BOUND

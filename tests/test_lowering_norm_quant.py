"""``dsv4::rms_norm_fp8_quant`` and the pass that makes it (``lowerings/norm_quant.py``): the op against
its reference bit for bit (any strides, every float dtype, rows past a block, no rows) and against an
independent fp32 RMSNorm within the e4m3 rounding; bad input; opcheck; the pass on the plain
``rms_normalize → fp8_block_quant`` (before/after op lists pinned, the fused op's bits, eager within
the rounding), and what it leaves alone."""

import pytest
import torch
from expecttest import assert_expected_inline
from torch.library import opcheck

import dsv4_compile  # noqa: F401
from dsv4_compile.reference import compressor as ref
from dsv4_compile.reference.layer import rms_normalize

from _compile import compile_checked

dsv4 = torch.ops.dsv4
EPS = 1e-6


def _x(t, d, dtype, device, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(t, d + 96, generator=g) * 3).to(dtype).to(device)
    x = wide[:, 32:32 + d] if strided else wide[:, :d].contiguous()
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device)
    return x, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t,d,block,strided", [(5, 384, 128, True), (3, 1024, 128, False), (2, 256, 64, True),
                                               (0, 128, 128, False), (17, 128, 16, True)])
def test_op_matches_reference_and_an_independent_norm(kernel_device, dtype, t, d, block, strided):
    x, w = _x(t, d, dtype, kernel_device, strided, seed=t + d)
    q, s = dsv4.rms_norm_fp8_quant(x, w, EPS, block)
    want_q, want_s = ref.rms_norm_fp8_quant(x.cpu(), w.cpu(), EPS, block, 1e-4)
    assert q.shape == (t, d) and s.shape == (t, d // block) and q.is_contiguous() and s.is_contiguous()
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s.cpu(), want_s)
    # independent: fp64 RMSNorm, dequantized q within e4m3's half step (2^-4 relative) plus x's own rounding
    xd, wd = x.cpu().double(), w.cpu().double()
    y = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + EPS) * wd
    deq = (q.cpu().double().unflatten(-1, (-1, block)) * s.cpu().double().unsqueeze(-1)).flatten(-2)
    assert ((deq - y).abs() <= y.abs() * 2**-4 * 1.05 + s.cpu().double().repeat_interleave(block, -1) * 2**-9).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_reads_strided_rows_in_place(kernel_device, dtype):
    """The Triton launcher itself (the op's CPU kernel is the reference): rows of a wider buffer read
    through their stride (as the layer's q latent, a column slice of its x GEMM), a 3-D input, D not a
    power of two, one row and several rows per program; bit for bit the reference."""
    from dsv4_compile.kernels.triton import compressor as kernels

    for t, d, block in ((1, 384, 128), (5, 384, 128), (9, 128, 16), (3, 1024, 128)):
        x, w = _x(t, d, dtype, kernel_device, strided=True, seed=d + t)
        assert x.stride(0) == d + 96 and x.stride(1) == 1
        for inp in (x, x.unsqueeze(0)):  # 2-D: read through the row stride; 3-D: flattened first
            q, s = kernels.rms_norm_fp8_quant(inp, w, EPS, block, 1e-4)
            want_q, want_s = ref.rms_norm_fp8_quant(inp.cpu(), w.cpu(), EPS, block, 1e-4)
            assert q.shape == inp.shape and torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
            assert torch.equal(s.cpu(), want_s)


def test_3d_input_and_opcheck():
    x, w = _x(6, 256, torch.bfloat16, "cpu", False, seed=4)
    x3 = x.view(2, 3, 256)
    q, s = dsv4.rms_norm_fp8_quant(x3, w, EPS)
    want_q, want_s = ref.rms_norm_fp8_quant(x, w, EPS, 128, 1e-4)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert torch.equal(q.view(6, 256).view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s.view(6, 2), want_s)
    opcheck(dsv4.rms_norm_fp8_quant.default, (x3, w, EPS, 128, 1e-4))
    xs, _ = _x(4, 128, torch.bfloat16, "cpu", True, seed=5)
    opcheck(dsv4.rms_norm_fp8_quant.default, (xs, w[:128], EPS))


@pytest.mark.parametrize("case,match", [
    (dict(d=384, block=256), "multiple of block"),
    (dict(d=288, block=96), "power of two"),
    (dict(d=256, block=8), "power of two"),
    (dict(d=256, wd=128), "entries"),
    (dict(d=256, eps=0.0), "eps"),
    (dict(d=8320, block=128), "at most 8192"),
    (dict(d=256, floor=0.0), "scale_floor"),
])
def test_bad_input_is_a_value_error(case, match):
    d = case["d"]
    x = torch.randn(2, d).bfloat16()
    w = torch.ones(case.get("wd", d)).bfloat16()
    with pytest.raises(ValueError, match=match):
        dsv4.rms_norm_fp8_quant(x, w, case.get("eps", EPS), case.get("block", 128), case.get("floor", 1e-4))


def q_norm_then_quant(qa, w):
    """DSv4's q path with FP8 wq_b: the q latent (a column slice of the x projection) normalized, then
    quantized for the GEMM."""
    qr = rms_normalize(qa[:, :256], EPS, w)
    return dsv4.fp8_block_quant(qr, 128)


def test_pass_fuses_the_plain_norm_and_quant(no_compile_cache):
    qa, w = _x(5, 384, torch.bfloat16, "cpu", False, seed=9)
    w = w[:256].contiguous()
    (q, s), pm = compile_checked(q_norm_then_quant, qa, w, rms_norm_quant=True)
    snap = pm.snapshots[-1]
    assert snap.matches["rms_norm_quant"] == 1
    assert_expected_inline(snap.before, """\
aten.slice.Tensor
prims.convert_element_type.default
aten.pow.Tensor_Scalar
aten.mean.dim
aten.add.Tensor
aten.rsqrt.default
aten.mul.Tensor
prims.convert_element_type.default
aten.mul.Tensor
prims.convert_element_type.default
dsv4.fp8_block_quant.default""")
    assert_expected_inline(snap.after, """\
aten.slice.Tensor
dsv4.rms_norm_fp8_quant.default""")
    want_q, want_s = ref.rms_norm_fp8_quant(qa[:, :256], w, EPS, 128, 1e-4)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    eq, es = q_norm_then_quant(qa, w)  # eager: torch.mean / rsqrt; equal scales, codes within one step
    assert torch.equal(s, es)
    assert ((q.float() - eq.float()).abs() <= eq.float().abs() * 2**-3 + 2**-9).all()


def norm_used_twice(qa, w):
    qr = rms_normalize(qa, EPS, w)
    return dsv4.fp8_block_quant(qr, 128), qr


def unweighted(qa):
    return dsv4.fp8_block_quant(rms_normalize(qa, EPS), 128)


def test_pass_leaves_other_forms_alone(no_compile_cache):
    qa, w = _x(3, 256, torch.bfloat16, "cpu", False, seed=2)
    _, pm = compile_checked(norm_used_twice, qa, w, rms_norm_quant=True)  # the bf16 norm is needed too
    assert pm.snapshots[-1].matches["rms_norm_quant"] == 0
    _, pm = compile_checked(unweighted, qa, rms_norm_quant=True)  # no weight: not the op's form
    assert pm.snapshots[-1].matches["rms_norm_quant"] == 0
    _, pm = compile_checked(q_norm_then_quant, torch.cat([qa, qa[:, :128]], 1), w)
    assert "rms_norm_quant" not in pm.snapshots[-1].matches  # off by default
    assert "dsv4.fp8_block_quant" in pm.snapshots[-1].after and "rms_norm_fp8" not in pm.snapshots[-1].after

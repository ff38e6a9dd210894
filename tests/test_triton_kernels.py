"""Triton kernels vs the reference, bit for bit: under the interpreter at small shapes on a CPU,
on the GPU at the serving shapes (``cuda`` marker)."""

import pytest
import torch

from dsv4_compile import reference
from dsv4_compile.kernels.triton import indexer_q as iq_kernels
from dsv4_compile.kernels.triton import primitives
from dsv4_compile.rope import cos_sin_cache

dsv4 = torch.ops.dsv4


def _same(a, b):
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def _data(t, h, d, table_dtype, device, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(t, h, d, generator=g) * scale).bfloat16()
    # a few exact zeros, negative zeros and tie-prone values exercise the edge cases
    q[:, 0, :8] = torch.tensor([0.0, -0.0, 0.25, -0.75, 1.25, 448.0, -1e-30, 3.5])
    pos = torch.randint(0, 4096, (t,), generator=g)
    cs = cos_sin_cache(64, 4096, 160000.0, dtype=table_dtype)
    if table_dtype == torch.float32:  # vLLM's test uses random tables: any values must round the same
        cs = torch.randn(4096, 64, generator=g)
    w = torch.randn(t, h, generator=g).bfloat16()
    return q, pos, cs, w, [x.to(device) for x in (q, pos, cs, w)]


CPU_SHAPES = [(1, 4, 128), (7, 3, 128), (33, 4, 64)]


@pytest.mark.parametrize("t,h,d", CPU_SHAPES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_primitive_kernels_match_reference(kernel_device, t, h, d, table_dtype):
    q, pos, cs, w, (qd, posd, csd, _) = _data(t, h, d, table_dtype, kernel_device)
    for inverse in (False, True):
        assert _same(primitives.rope(qd, posd, csd, inverse), reference.rope(q, pos, cs, inverse))
    assert _same(primitives.rope(qd.float(), posd.int(), csd, False), reference.rope(q.float(), pos, cs))
    assert _same(primitives.hadamard(qd, d**-0.5), reference.hadamard(q, d**-0.5))
    for block in (32, d):
        for got, want in zip(primitives.fp8_block_quant(qd, block, 1e-4), reference.fp8_block_quant(q, block, 1e-4)):
            assert _same(got, want)
    for got, want in zip(primitives.mxfp4_quant(qd), reference.mxfp4_quant(q)):
        assert _same(got, want)


def test_rope_kernel_handles_non_power_of_two_dims(kernel_device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 576, generator=g).bfloat16()  # 512 + 64: a padded pair range
    pos = torch.tensor([0, 9, 63])
    cs = cos_sin_cache(64, 64, 10000.0)
    got = primitives.rope(x.to(kernel_device), pos.to(kernel_device), cs.to(kernel_device))
    assert _same(got, reference.rope(x, pos, cs))


@pytest.mark.parametrize("t,h,d", CPU_SHAPES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hadamard", [False, True])
def test_fused_indexer_q_kernels_match_reference(kernel_device, t, h, d, table_dtype, hadamard):
    q, pos, cs, w, (qd, posd, csd, wd) = _data(t, h, d, table_dtype, kernel_device, seed=t)
    ws = 128**-0.5 * 64**-0.5
    got = iq_kernels.indexer_q_rope_fp8(qd, posd, csd, wd, ws, hadamard)
    want = reference.indexer_q_rope_fp8(q, pos, cs, w, ws, hadamard)
    assert all(_same(a, b) for a, b in zip(got, want))
    got = iq_kernels.indexer_q_rope_mxfp4(qd, posd, csd, wd, ws, hadamard)
    want = reference.indexer_q_rope_mxfp4(q, pos, cs, w, ws, hadamard)
    assert all(_same(a, b) for a, b in zip(got, want))


def test_fused_kernel_honours_strided_q_and_weights(kernel_device):
    q, pos, cs, w, _ = _data(5, 4, 128, torch.float32, kernel_device)
    big = torch.zeros(5, 8, 128, dtype=q.dtype)
    big[:, ::2] = q
    wt = w.t().contiguous().t()  # column-major weights
    dev = lambda x: x.to(kernel_device)  # noqa: E731
    got = iq_kernels.indexer_q_rope_fp8(dev(big)[:, ::2], dev(pos), dev(cs), dev(wt), 0.5)
    want = reference.indexer_q_rope_fp8(q, pos, cs, w, 0.5)
    assert all(_same(a, b) for a, b in zip(got, want))


GPU_TOKENS = [1, 7, 32, 257, 4096]


@pytest.mark.cuda
@pytest.mark.parametrize("t", GPU_TOKENS)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hadamard", [False, True])
def test_gpu_indexer_q_ops_bit_exact_at_serving_shapes(t, table_dtype, hadamard):
    q, pos, cs, w, (qd, posd, csd, wd) = _data(t, 64, 128, table_dtype, "cuda", seed=t)
    ws = 128**-0.5 * 64**-0.5
    got = dsv4.indexer_q_rope_fp8(qd, posd, csd, wd, ws, hadamard)
    assert got[0].device.type == "cuda"
    assert all(_same(a, b) for a, b in zip(got, reference.indexer_q_rope_fp8(q, pos, cs, w, ws, hadamard)))
    got = dsv4.indexer_q_rope_mxfp4(qd, posd, csd, wd, ws, hadamard)
    assert all(_same(a, b) for a, b in zip(got, reference.indexer_q_rope_mxfp4(q, pos, cs, w, ws, hadamard)))


@pytest.mark.cuda
@pytest.mark.parametrize("t", GPU_TOKENS)
def test_gpu_primitive_ops_bit_exact_at_serving_shapes(t):
    q, pos, cs, w, (qd, posd, csd, wd) = _data(t, 64, 128, torch.float32, "cuda", seed=t + 1)
    assert _same(dsv4.rope(qd, posd, csd), reference.rope(q, pos, cs))
    assert _same(dsv4.rope(qd, posd, csd, True), reference.rope(q, pos, cs, True))
    assert _same(dsv4.hadamard(qd, 128**-0.5), reference.hadamard(q, 128**-0.5))
    for got, want in zip(dsv4.fp8_block_quant(qd, 128, 1e-4), reference.fp8_block_quant(q, 128, 1e-4)):
        assert _same(got, want)
    for got, want in zip(dsv4.mxfp4_quant(qd), reference.mxfp4_quant(q)):
        assert _same(got, want)


@pytest.mark.cuda
def test_gpu_out_of_range_positions_stay_inside_the_table():
    q, pos, cs, w, (qd, posd, csd, wd) = _data(8, 64, 128, torch.float32, "cuda")
    posd = posd.clone()
    posd[3] = 10**9
    posd[5] = -7
    q_fp8, w_out = dsv4.indexer_q_rope_fp8(qd, posd, csd, wd, 1.0)
    torch.cuda.synchronize()
    ok = torch.ones(8, dtype=torch.bool)
    ok[3] = ok[5] = False
    want = reference.indexer_q_rope_fp8(q[ok], pos[ok], cs, w[ok], 1.0)
    assert _same(q_fp8[ok.cuda()], want[0])

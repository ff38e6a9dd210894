"""Hand-computed values pinning the reference numerics (docs/numerics.md §3, §4.1-§4.3)."""

import math

import pytest
import torch

from dsv4_compile import layouts, reference
from dsv4_compile.rope import cos_sin_cache


def _u8(t):
    return t.view(torch.uint8)


def test_ue8m0_scale_at_exact_powers_of_two():
    # amax 448 -> e = 0; 896 -> 1; 449 -> 1; 1.0 -> ceil(log2(1/448)) = -8
    x = torch.zeros(4, 64)
    x[0, 3], x[1, 5], x[2, 7], x[3, 1] = 448.0, 896.0, 449.0, -1.0
    q, s = reference.fp8_block_quant(x, 64)
    assert s.flatten().tolist() == [1.0, 2.0, 2.0, 2.0**-8]
    assert _u8(q)[0, 3].item() == 0x7E  # 448 = largest finite e4m3
    assert _u8(q)[1, 5].item() == 0x7E
    assert q[2, 7].float().item() == 224.0  # 449/2 = 224.5 rounds to 224 (step 16 in [128, 256))
    assert _u8(q)[3, 1].item() == 0xF8  # -1 * 256 = -256 = sign | exp 15 | mant 0


def test_fp8_zero_block_uses_the_amax_floor_and_keeps_signed_zero():
    x = torch.zeros(2, 64)
    x[1] = -0.0
    q, s = reference.fp8_block_quant(x, 64)
    assert s.flatten().tolist() == [2.0**-22] * 2  # ceil(log2(1e-4 / 448)) = -22
    assert torch.equal(_u8(q)[0], torch.zeros(64, dtype=torch.uint8))
    assert torch.equal(_u8(q)[1], torch.full((64,), 0x80, dtype=torch.uint8))


def test_fp8_scale_is_exact_ceil_log2_for_every_bf16_amax_near_a_boundary():
    # Every bf16 amax in [448·2^-3, 448·2^3): the exponent is the real-number ceil(log2(amax/448)).
    vals = torch.arange(0x3F00, 0x4700, dtype=torch.int16).view(torch.bfloat16).float()
    vals = vals[(vals >= 56.0) & (vals < 3584.0)]
    x = torch.zeros(vals.numel(), 64)
    x[:, 0] = vals
    _, s = reference.fp8_block_quant(x, 64)
    expect = torch.tensor([2.0 ** math.ceil(math.log2(v / 448.0)) for v in vals.double().tolist()])
    assert torch.equal(s.flatten(), expect.float())


def test_fp8_values_never_exceed_448():
    x = torch.randn(64, 128) * 1000
    q, s = reference.fp8_block_quant(x, 128)
    assert q.float().abs().max().item() <= 448.0
    err = (q.float() * s - x).abs().max(dim=-1).values
    assert torch.all(err <= 16 * s.flatten())  # half an ulp at the top binade


def test_e2m1_ties_round_to_even_and_keep_the_sign():
    v = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, 5.01, 0.26, -6.0, 1.0, 3.0])
    codes = reference.e2m1_codes(v).tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 0x8, 0x8, 0, 7, 1, 0xF, 2, 5]


def test_mxfp4_block_scale_packing_and_saturation():
    x = torch.zeros(3, 32)
    x[0, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, 5.01, 0.26, -6.0, 1.0, 3.0])
    x[1, 0], x[1, 1] = 6.5, -13.0  # amax 13 -> e = ceil(log2(13/6)) = 2: 6.5/4 = 1.625 -> 1.5, -13/4 = -3.25 -> -3
    packed, scale = reference.mxfp4_quant(x)
    assert scale.tolist() == [[127], [129], [1]]  # zero block: floor 6·2^-126 -> e = -126
    assert packed[0, :8].tolist() == [7 | 0 << 4, 2 | 2 << 4, 4 | 4 << 4, 6 | 6 << 4, 0x8 | 0x8 << 4, 0 | 7 << 4, 1 | 0xF << 4, 2 | 5 << 4]
    assert packed[1, 0].item() == 3 | (0x8 | 5) << 4
    assert torch.equal(packed[2], torch.zeros(16, dtype=torch.uint8))
    deq = reference.mxfp4_dequant(packed, scale)
    assert deq[1, 0].item() == 6.0 and deq[1, 1].item() == -12.0


def test_mxfp4_dequant_error_bound():
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    packed, scale = reference.mxfp4_quant(x)
    s = reference.pow2(scale.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    err = (reference.mxfp4_dequant(packed, scale) - x.float()).abs()
    assert torch.all(err <= s)  # half the widest E2M1 gap (2) times the scale


def test_rope_is_identity_at_position_zero_and_inverse_undoes_it():
    cs = cos_sin_cache(64, 64, 160000.0)
    x = torch.randn(5, 3, 128, dtype=torch.float32)
    pos = torch.tensor([0, 1, 7, 33, 63])
    y = reference.rope(x, pos, cs)
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[:, :, :64], x[:, :, :64])  # only the trailing 64 dims rotate
    back = reference.rope(y, pos, cs, inverse=True)
    assert torch.allclose(back, x, atol=1e-5)
    # pair (64, 65) at position 1 with theta_0 = 1 rad: closed form
    c, s = math.cos(1.0), math.sin(1.0)
    x0, x1 = x[1, 0, 64].item(), x[1, 0, 65].item()
    assert y[1, 0, 64].item() == pytest.approx(x0 * c - x1 * s, abs=1e-6)
    assert y[1, 0, 65].item() == pytest.approx(x0 * s + x1 * c, abs=1e-6)


def test_rope_rounds_once_to_input_dtype():
    cs = cos_sin_cache(64, 16, 10000.0)
    x = torch.randn(4, 2, 128).bfloat16()
    pos = torch.arange(4)
    y = reference.rope(x, pos, cs)
    y32 = reference.rope(x.float(), pos, cs)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.bfloat16())


def test_hadamard_is_orthonormal_with_scale_inverse_sqrt_d():
    d = 128
    eye = torch.eye(d)
    h = reference.hadamard(eye, d**-0.5)
    assert torch.allclose(h @ h.T, eye, atol=1e-6)
    # Sylvester sign pattern: H[j, k] = (-1)^popcount(j & k)
    signs = (-1.0) ** torch.tensor([[bin(a & b).count("1") for b in range(d)] for a in range(d)], dtype=torch.float32)
    assert torch.equal(torch.sign(h), signs)


def test_indexer_q_fp8_folds_q_scale_into_weights():
    cs = cos_sin_cache(64, 32, 160000.0)
    q = torch.randn(3, 4, 128).bfloat16()
    pos = torch.tensor([0, 5, 31])
    w = torch.randn(3, 4).bfloat16()
    q_fp8, w_out = reference.indexer_q_rope_fp8(q, pos, cs, w, 0.011)
    y = reference.rope(q, pos, cs)
    q2, s2 = reference.fp8_block_quant(y, 128, layouts.FP8_AMAX_FLOOR)
    assert torch.equal(_u8(q_fp8), _u8(q2))
    assert torch.equal(w_out, w.float() * 0.011 * s2[..., 0])
    packed, scale, w4 = reference.indexer_q_rope_mxfp4(q, pos, cs, w, 0.011, hadamard=True)
    p2, sc2 = reference.mxfp4_quant(reference.hadamard(y, 128**-0.5))
    assert torch.equal(packed, p2) and torch.equal(scale, sc2) and torch.equal(w4, w.float() * 0.011)

"""The output path (docs/numerics.md §8.3, §5.6): ``dsv4::inv_rope_fp8_quant`` equals the composition of the two
primitives bit for bit, in vLLM's SM90 / DeepGEMM layout (outputs and fake, padding rows zero);
``round_rope_bf16=False`` equals an independent fp64 model of vLLM's kernel (fp32 rotation, UE8M0
quant) and the default's bytes outside the last block of each head; opcheck and ValueErrors; the
Triton kernel bit-exact under the interpreter at small shapes and on the GPU at serving shapes
(``cuda`` marker), both modes; the plain grouped output projection and the dequant."""

import numpy as np
import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile import layouts, reference
from dsv4_compile.kernels.triton import output as out_kernels
from dsv4_compile.rope import cos_sin_cache

dsv4 = torch.ops.dsv4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOOR = layouts.INV_ROPE_AMAX_FLOOR


def _data(t, h, table_dtype=torch.float32, seed=0, scale=4.0, max_pos=256):
    g = torch.Generator().manual_seed(seed * 1009 + t * 31 + h)
    o = (torch.randn(t, h, 512, generator=g) * scale).bfloat16()
    # exact zeros, negative zeros, tie-prone and tiny values; a whole zero head (amax floor) on token 0
    o[:, 0, :8] = torch.tensor([0.0, -0.0, 0.25, -0.75, 1.25, 448.0, -1e-30, 3.5])
    o[:, 0, 504:] = torch.tensor([1e-20, -2e-20, 0.0, 7.0, -7.0, 0.5, 1e-3, -1e-3])  # inside the rotated dims
    o[0, h - 1] = 0.0
    pos = torch.randint(0, max_pos, (t,), generator=g)
    if table_dtype == torch.float32:  # a random table: any values must round the same way
        cs = torch.randn(max_pos, 64, generator=g)
    else:
        cs = cos_sin_cache(64, max_pos, 160000.0, dtype=table_dtype)
    return o, pos, cs


def _bits(x):
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _same(a, b):
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and torch.equal(
        _bits(a).cpu(), _bits(b).cpu())


def _t_al(t):
    return (t + 3) // 4 * 4


def _scale_storage(scale, t):
    """The whole ``[G, D/128, T_al]`` buffer behind a ``[G, T, D/128]`` scale view (padding included)."""
    g, _, nb = scale.shape
    return scale.as_strided((g, nb, _t_al(t)), (nb * _t_al(t), _t_al(t), 1))


def _layout(t, h, n_groups):
    dg = h // n_groups * 512
    nb = dg // 128
    return ((t, n_groups, dg), (dg, t * dg, 1)), ((n_groups, t, nb), (nb * _t_al(t), 1, _t_al(t)))


# ---------------------------------------------------------------------------------------------
# reference: the composition, the layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,h,n_groups", [(1, 8, 1), (5, 8, 2), (8, 16, 2), (3, 16, 16), (6, 4, 4)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_composition_of_the_primitives(t, h, n_groups, table_dtype):
    o, pos, cs = _data(t, h, table_dtype)
    q, s = reference.inv_rope_fp8_quant(o, pos, cs, n_groups)
    y = reference.rope(o, pos, cs, inverse=True)
    want_q, want_s = reference.fp8_block_quant(y.view(t, n_groups, -1), 128, FLOOR)
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(s, want_s.transpose(0, 1))
    (q_shape, q_stride), (s_shape, s_stride) = _layout(t, h, n_groups)
    assert (tuple(q.shape), q.stride(), q.dtype) == (q_shape, q_stride, torch.float8_e4m3fn)
    assert (tuple(s.shape), s.stride(), s.dtype) == (s_shape, s_stride, torch.float32)
    assert q.storage_offset() == 0 and s.storage_offset() == 0
    padded = _scale_storage(s, t)
    assert torch.equal(padded[..., :t], s.transpose(1, 2)) and not padded[..., t:].any()
    # the op is the reference on CPU
    got = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups)
    assert _same(got[0], q) and _same(got[1], s)


def test_zero_head_uses_the_output_path_floor():
    o, pos, cs = _data(2, 8)
    _, s = reference.inv_rope_fp8_quant(o, pos, cs, 2)
    # head 7 of token 0 is zero: its 4 blocks (the last 4 of group 1) take amax = 1e-10
    e = reference.ceil_log2_ratio(torch.tensor([FLOOR]), reference.quant.FP8_MAX_EXP, reference.quant.FP8_MAX_MANT)
    assert torch.equal(s[1, 0, -4:], reference.pow2(e).expand(4))


# ---------------------------------------------------------------------------------------------
# round_rope_bf16=False: vLLM's bytes
# ---------------------------------------------------------------------------------------------
def _vllm_model(o, pos, cs, n_groups):
    """An independent model of vLLM's ``fused_inv_rope_fp8_quant`` (SM90, fp32 scales), in fp64
    with every fp32 operation rounded back to fp32 (exact for one +, −, ×: 53 ≥ 2·24 + 2):

    even dim 2i of the rope slice ``x·cos + x_partner·sin``, odd dim ``x·cos − x_partner·sin`` (pair
    (2i, 2i+1), ``cos = table[p, i]``, ``sin = table[p, 32 + i]``), the other 448 dims as loaded;
    per 128 elements ``scale = exp2(ceil(log2(fp32(max(amax, 1e-10) · fp32(1/448)))))`` and
    ``clamp(x / scale, ±448)`` → e4m3. Returns ``(q [G, T, D] e4m3, scale [T, G, D/128])``."""
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    t, h, _ = o.shape
    x = o.float().numpy().astype(np.float64)
    table = cs.float().numpy().astype(np.float64)[pos.long().numpy()]  # [T, 64]
    cos, sin = table[:, None, :32], table[:, None, 32:]
    xe, xo = x[..., 448::2], x[..., 449::2]
    y = x.copy()
    y[..., 448::2] = f32(f32(xe * cos) + f32(xo * sin))
    y[..., 449::2] = f32(f32(xo * cos) - f32(xe * sin))
    blocks = y.reshape(t, n_groups, -1, 128)
    amax = np.maximum(np.abs(blocks).max(-1), f32(np.array(FLOOR)))
    scale = np.exp2(np.ceil(np.log2(f32(amax * f32(np.array(1 / 448))))))
    v = np.clip(blocks / scale[..., None], -448.0, 448.0).reshape(t, n_groups, -1)
    q = torch.from_numpy(v.astype(np.float32)).to(torch.float8_e4m3fn)
    return q.transpose(0, 1).contiguous(), torch.from_numpy(scale.astype(np.float32))


@pytest.mark.parametrize("t,h,n_groups", [(1, 8, 1), (5, 8, 2), (8, 16, 2), (6, 4, 4)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_vllm_mode_matches_an_fp64_model_of_vllms_kernel(t, h, n_groups, table_dtype):
    o, pos, cs = _data(t, h, table_dtype, seed=5)
    q, s = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups, round_rope_bf16=False)
    want_q, want_s = _vllm_model(o, pos, cs, n_groups)
    # the same layout as the default mode; vLLM's o_fp8 is ours, its scale is our storage viewed
    # [T, G, D/128] with strides (1, (D/128)·T_al, T_al)
    (q_shape, q_stride), (s_shape, s_stride) = _layout(t, h, n_groups)
    assert (tuple(q.shape), q.stride()) == (q_shape, q_stride) and (tuple(s.shape), s.stride()) == (s_shape, s_stride)
    nb = s_shape[-1]
    vllm_s = s.transpose(0, 1)
    assert vllm_s.shape == (t, n_groups, nb) and vllm_s.stride() == (1, nb * _t_al(t), _t_al(t))
    assert torch.equal(_bits(q.transpose(0, 1)), _bits(want_q))  # the [G, T, D] buffer
    assert torch.equal(vllm_s, want_s)
    assert not _scale_storage(s, t)[..., t:].any()
    # it is the composition with an fp32 rotation (no bf16 rounding)
    y = reference.rope(o.float(), pos, cs, inverse=True)
    comp_q, comp_s = reference.fp8_block_quant(y.view(t, n_groups, -1), 128, FLOOR)
    assert torch.equal(_bits(q), _bits(comp_q)) and torch.equal(vllm_s, comp_s)
    ref = reference.inv_rope_fp8_quant(o, pos, cs, n_groups, False)
    assert _same(ref[0], q) and _same(ref[1], s)


def test_vllm_mode_differs_from_the_default_only_in_the_rotated_block():
    t, h, n_groups = 64, 8, 2
    o, pos, cs = _data(t, h, torch.float32, seed=6)
    dq, ds = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups)
    vq, vs = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups, round_rope_bf16=False)
    diff_q = (_bits(dq) != _bits(vq)).reshape(t, h, 4, 128)
    diff_s = (ds != vs).reshape(n_groups, t, h // n_groups, 4)
    assert not diff_q[:, :, :3].any() and not diff_s[..., :3].any()
    # in the last block the 64 unrotated dims change only with the block's scale
    last_scale_differs = diff_s[..., 3].permute(1, 0, 2).reshape(t, h)
    assert not (diff_q[:, :, 3, :64].any(-1) & ~last_scale_differs).any() and last_scale_differs.any()
    # the rounding is visible: a few % of the rotated dims' bytes (and some last-block scales) change
    frac = diff_q[..., 64:].float().mean().item()
    assert 0.001 < frac < 0.2, frac
    # the default stays the bf16-rounded composition
    y = reference.rope(o, pos, cs, inverse=True)
    want_q, want_s = reference.fp8_block_quant(y.view(t, n_groups, -1), 128, FLOOR)
    assert torch.equal(_bits(dq), _bits(want_q)) and torch.equal(ds, want_s.transpose(0, 1))


def test_fake_matches_real_layout_including_symbolic_tokens():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    for t, h, n_groups in ((5, 8, 2), (4, 16, 1), (1, 8, 8)):
        o, pos, cs = _data(t, h)
        real = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups)
        with FakeTensorMode() as mode:
            fake = dsv4.inv_rope_fp8_quant(mode.from_tensor(o), mode.from_tensor(pos), mode.from_tensor(cs), n_groups)
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype, r.storage_offset()) == (f.shape, f.stride(), f.dtype,
                                                                            f.storage_offset())

    # T a SymInt: T_al = (T + 3) // 4 * 4 stays symbolic in the scale strides
    o, pos, cs = _data(7, 8)
    gm = make_fx(lambda o, p, c: dsv4.inv_rope_fp8_quant(o, p, c, 2), tracing_mode="symbolic")(o, pos, cs)
    node = next(n for n in gm.graph.nodes if n.target is dsv4.inv_rope_fp8_quant.default)
    fq, fs = node.meta["val"]
    assert any(isinstance(x, torch.SymInt) for x in fs.stride())
    (q_shape, q_stride), (s_shape, s_stride) = _layout(7, 8, 2)
    assert tuple(int(x) for x in fq.stride()) == q_stride and tuple(int(x) for x in fs.stride()) == s_stride
    for t in (1, 5, 8):
        o, pos, cs = _data(t, 8)
        got = gm(o, pos, cs)
        want = reference.inv_rope_fp8_quant(o, pos, cs, 2)
        assert _same(got[0], want[0]) and _same(got[1], want[1])


def _op_cases(device):
    o, pos, cs = (x.to(device) for x in _data(5, 8))
    wide = torch.zeros(5, 12, 512, dtype=torch.bfloat16, device=device)
    wide[:, 2:10] = o
    return [
        (o, pos, cs, 2),
        (o, pos.int(), cs.bfloat16(), 1),
        (o[:4], pos[:4], cs, 8),
        (wide[:, 2:10], pos, cs, 4),  # a head slice of a padded attention output: strided o
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("round_rope_bf16", [True, False])
def test_opcheck(device, case, round_rope_bf16):
    args = _op_cases(device)[case]
    if not round_rope_bf16:
        args = args + (False,)
    torch.library.opcheck(dsv4.inv_rope_fp8_quant.default, args)


def test_outputs_are_fresh_and_empty_batches_work():
    o, pos, cs = _data(5, 8)
    for out in dsv4.inv_rope_fp8_quant(o, pos, cs, 2):
        for a in (o, pos, cs):
            assert out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    q, s = dsv4.inv_rope_fp8_quant(o[:0], pos[:0], cs, 2)
    assert q.shape == (0, 2, 2048) and s.shape == (2, 0, 16)


def test_bad_inputs_raise_value_error_naming_the_argument():
    o, pos, cs = _data(5, 8)
    cases = [
        (lambda: dsv4.inv_rope_fp8_quant(o.float(), pos, cs, 2), "o must be one of"),
        (lambda: dsv4.inv_rope_fp8_quant(o.half(), pos, cs, 2), "o must be one of"),
        (lambda: dsv4.inv_rope_fp8_quant(o[0], pos, cs, 2), "o must have 3 dims"),
        (lambda: dsv4.inv_rope_fp8_quant(o[..., :256], pos, cs, 2), "head dim must be 512"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos, cs, 3), "not a multiple of n_groups=3"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos, cs, 0), "n_groups must be a positive int"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos, cs, -2), "n_groups must be a positive int"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos, cs[:, :32], 2), r"cos_sin_cache must be \[max_pos, 64\]"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos, cs.half(), 2), "cos_sin_cache must be one of"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos[:3], cs, 2), "positions has 3 entries"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos.float(), cs, 2), "positions must be one of"),
        (lambda: dsv4.inv_rope_fp8_quant(o, pos + 1000, cs, 2), r"positions must lie in \[0, 256\)"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# ---------------------------------------------------------------------------------------------
# the Triton kernel
# ---------------------------------------------------------------------------------------------
def _check_kernel(o, pos, cs, n_groups, device, round_rope_bf16=True, **launch):
    got = out_kernels.inv_rope_fp8_quant(o.to(device), pos.to(device), cs.to(device), n_groups, round_rope_bf16,
                                         **launch)
    want = reference.inv_rope_fp8_quant(o, pos, cs, n_groups, round_rope_bf16)
    t = o.shape[0]
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert torch.equal(_scale_storage(got[1], t).cpu(), _scale_storage(want[1], t))  # zero padding rows too


@pytest.mark.parametrize("t", [1, 5, 8])
@pytest.mark.parametrize("h", [8, 16])
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("round_rope_bf16", [True, False])
def test_kernel_matches_reference(kernel_device, t, h, n_groups, table_dtype, round_rope_bf16):
    o, pos, cs = _data(t, h, table_dtype, seed=1)
    _check_kernel(o, pos, cs, n_groups, kernel_device, round_rope_bf16)


@pytest.mark.parametrize("bt,block_h", [(4, 2), (2, 4), (1, 1)])
@pytest.mark.parametrize("round_rope_bf16", [True, False])
def test_kernel_tilings_and_strided_o(kernel_device, bt, block_h, round_rope_bf16):
    # several tokens per program (a partial tile and padding rows in one program), odd head blocks
    o, pos, cs = _data(5, 8, seed=2)
    _check_kernel(o, pos, cs, 2, kernel_device, round_rope_bf16, bt=bt, block_h=block_h)
    wide = torch.zeros(5, 12, 512, dtype=torch.bfloat16)
    wide[:, 3:11] = o
    _check_kernel(wide[:, 3:11], pos.int(), cs, 4, kernel_device, round_rope_bf16, bt=bt, block_h=block_h)


# ---------------------------------------------------------------------------------------------
# GPU: the op at serving shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 3, 64, 1027, 4096])
@pytest.mark.parametrize("h,n_groups", [(64, 8), (128, 16), (32, 4), (8, 1)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("round_rope_bf16", [True, False])
def test_cuda_op_matches_reference(t, h, n_groups, table_dtype, round_rope_bf16):
    o, pos, cs = _data(t, h, table_dtype, seed=3, max_pos=4096)
    got = dsv4.inv_rope_fp8_quant(o.cuda(), pos.cuda(), cs.cuda(), n_groups, round_rope_bf16)
    want = reference.inv_rope_fp8_quant(o, pos, cs, n_groups, round_rope_bf16)
    assert got[0].is_cuda and _same(got[0], want[0]) and _same(got[1], want[1])
    assert torch.equal(_scale_storage(got[1], t).cpu(), _scale_storage(want[1], t))


@pytest.mark.cuda
def test_cuda_opcheck_and_strided_o():
    o, pos, cs = _data(37, 64, seed=4, max_pos=4096)
    wide = torch.zeros(37, 80, 512, dtype=torch.bfloat16)
    wide[:, 5:69] = o
    got = dsv4.inv_rope_fp8_quant(wide.cuda()[:, 5:69], pos.cuda(), cs.cuda(), 8)
    want = reference.inv_rope_fp8_quant(o, pos, cs, 8)
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    torch.library.opcheck(dsv4.inv_rope_fp8_quant.default, (o.cuda(), pos.cuda(), cs.cuda(), 8))
    torch.library.opcheck(dsv4.inv_rope_fp8_quant.default, (o.cuda(), pos.cuda(), cs.cuda(), 8, False))


# ---------------------------------------------------------------------------------------------
# the plain grouped output projection and the dequant
# ---------------------------------------------------------------------------------------------
def _proj_weights(h, n_groups, rank, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    dg = h // n_groups * 512
    wo_a = (torch.randn(n_groups * rank, dg, generator=g) * dg**-0.5).bfloat16()
    wo_b = (torch.randn(hidden, n_groups * rank, generator=g) * (n_groups * rank) ** -0.5).bfloat16()
    return wo_a, wo_b


@pytest.mark.parametrize("h,n_groups", [(8, 2), (8, 1), (4, 4)])
def test_grouped_o_proj_matches_a_loop_over_groups(h, n_groups):
    o, _, _ = _data(6, h)
    rank, hidden = 32, 48
    wo_a, wo_b = _proj_weights(h, n_groups, rank, hidden)
    y = reference.grouped_o_proj(o, wo_a, wo_b, n_groups)
    assert y.shape == (6, hidden) and y.dtype == torch.bfloat16
    dg = h // n_groups * 512
    x = o.reshape(6, n_groups, dg)
    z = torch.cat([x[:, g] @ wo_a[g * rank:(g + 1) * rank].t() for g in range(n_groups)], dim=1)
    want = z @ wo_b.t()
    torch.testing.assert_close(y, want, rtol=1.6e-2, atol=1e-2)
    # fp32 check of the math itself (independent of bf16 accumulation order)
    zf = torch.einsum("tgd,grd->tgr", x.float(), wo_a.float().view(n_groups, rank, dg)).flatten(1)
    torch.testing.assert_close(y.float(), zf.bfloat16().float() @ wo_b.float().t(), rtol=2e-2, atol=2e-2)
    # a grouped [T, G, D] input is accepted as is
    assert torch.equal(reference.grouped_o_proj(x, wo_a, wo_b, n_groups), y)


def test_dequant_inverts_the_quant_within_half_an_fp8_ulp():
    t, h, n_groups = 5, 8, 2
    o, pos, cs = _data(t, h)
    q, s = dsv4.inv_rope_fp8_quant(o, pos, cs, n_groups)
    x = reference.fp8_dequant_grouped(q, s)
    assert x.shape == (t, n_groups, h // n_groups * 512) and x.dtype == torch.bfloat16
    y = reference.rope(o, pos, cs, inverse=True).view(t, n_groups, -1).float()
    err = (x.float() - y).unflatten(-1, (-1, 128)).abs().amax(-1)
    assert (err <= 16 * s.transpose(0, 1)).all()  # half an e4m3 ulp at the top binade
    # dequant is exact: it is q · 2^e, elementwise, whatever the strides
    manual = torch.stack([q[:, g].float().view(t, -1, 128) * s[g].unsqueeze(-1) for g in range(n_groups)], dim=1)
    assert torch.equal(x, manual.flatten(-2).bfloat16())
    # the grouped projection runs on the dequantized activations
    wo_a, wo_b = _proj_weights(h, n_groups, 16, 24)
    assert reference.grouped_o_proj(x, wo_a, wo_b, n_groups).shape == (t, 24)

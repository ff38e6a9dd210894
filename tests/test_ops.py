"""opcheck for every op, fake shapes/strides, and ValueError on bad input."""

import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile.rope import cos_sin_cache

dsv4 = torch.ops.dsv4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(device, t=5, h=4, d=128, table_dtype=torch.float32):
    g = torch.Generator().manual_seed(t * 31 + h)
    q = torch.randn(t, h, d, generator=g).bfloat16().to(device)
    pos = torch.randint(0, 64, (t,), generator=g).to(device)
    cs = cos_sin_cache(64, 64, 160000.0, dtype=table_dtype, device=device)
    w = torch.randn(t, h, generator=g).bfloat16().to(device)
    return q, pos, cs, w


def _op_cases(device):
    q, pos, cs, w = _inputs(device)
    return [
        (dsv4.rope.default, (q, pos, cs), {}),
        (dsv4.rope.default, (q.float(), pos.int(), cs.bfloat16()), {"inverse": True}),
        (dsv4.hadamard.default, (q, 128**-0.5), {}),
        (dsv4.fp8_block_quant.default, (q, 64, 1e-4), {}),
        (dsv4.fp8_block_quant.default, (q.float(), 128), {}),
        (dsv4.mxfp4_quant.default, (q,), {}),
        (dsv4.indexer_q_rope_fp8.default, (q, pos, cs, w, 0.011), {}),
        (dsv4.indexer_q_rope_fp8.default, (q, pos, cs, w.float(), 0.011, True), {}),
        (dsv4.indexer_q_rope_mxfp4.default, (q, pos, cs, w, 0.011), {}),
        (dsv4.indexer_q_rope_mxfp4.default, (q, pos.int(), cs, w, 1.0, True), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(10))
def test_opcheck(device, case):
    op, args, kwargs = _op_cases(device)[case]
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("case", range(10))
def test_fake_matches_real_shapes_strides_dtypes(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args, kwargs = _op_cases("cpu")[case]
    real = op(*args, **kwargs)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args, **kwargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


def test_outputs_never_alias_inputs():
    q, pos, cs, w = _inputs("cpu")
    for op, args, kwargs in _op_cases("cpu"):
        outs = op(*args, **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for o in outs:
            for a in args:
                if isinstance(a, torch.Tensor):
                    assert o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


def test_bad_inputs_raise_value_error_naming_the_argument():
    q, pos, cs, w = _inputs("cpu")
    cases = [
        (lambda: dsv4.rope(q, pos.float(), cs), "positions"),
        (lambda: dsv4.rope(q, pos[:3], cs), "positions has 3 entries"),
        (lambda: dsv4.rope(q, pos, cs.half()), "cos_sin_cache"),
        (lambda: dsv4.rope(q, pos, cs[:, :63]), "even"),
        (lambda: dsv4.rope(q[..., :32], pos, cs), "exceeds"),
        (lambda: dsv4.rope(q.int(), pos, cs), "x must be one of"),
        (lambda: dsv4.rope(q[0, 0], pos[:1], cs), "at least 2 dims"),
        (lambda: dsv4.rope(q, pos + 1000, cs), r"positions must lie in \[0, 64\)"),
        (lambda: dsv4.rope(q, pos - 100, cs), "positions must lie"),
        (lambda: dsv4.hadamard(q[..., :96], 0.1), "power of two"),
        (lambda: dsv4.fp8_block_quant(q, 48, 1e-4), "multiple of block"),
        (lambda: dsv4.fp8_block_quant(q, 64, 0.0), "scale_floor"),
        (lambda: dsv4.mxfp4_quant(q[..., :48]), "multiple of 32"),
        (lambda: dsv4.indexer_q_rope_fp8(q[0], pos, cs, w, 1.0), "q must have 3 dims"),
        (lambda: dsv4.indexer_q_rope_fp8(q, pos, cs, w[:, :2], 1.0), "weights must be"),
        (lambda: dsv4.indexer_q_rope_fp8(q, pos, cs, w.int(), 1.0), "weights must be one of"),
        (lambda: dsv4.indexer_q_rope_mxfp4(q[..., :48], pos, cs, w, 1.0), "head_dim"),
        (lambda: dsv4.indexer_q_rope_mxfp4(q[..., :96], pos, cs, w, 1.0), "head_dim"),
        (lambda: dsv4.indexer_q_rope_fp8(q, pos.short(), cs, w, 1.0), "positions must be one of"),
        (lambda: dsv4.indexer_q_rope_fp8(q, pos, cs, w.unsqueeze(-1), 1.0), "weights must have 2 dims"),
        (lambda: dsv4.indexer_q_rope_mxfp4(q, pos, cs, w, 1.0, hadamard=True) and dsv4.indexer_q_rope_mxfp4(q, pos, cs[:, :2].repeat(1, 80), w, 1.0), "exceeds"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.cuda
def test_device_mismatch_is_a_value_error():
    q, pos, cs, w = _inputs("cuda")
    with pytest.raises(ValueError, match="positions is on cpu"):
        dsv4.rope(q, pos.cpu(), cs)
    with pytest.raises(ValueError, match="weights is on cpu"):
        dsv4.indexer_q_rope_fp8(q, pos, cs, w.cpu(), 1.0)

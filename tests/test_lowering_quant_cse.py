"""Activation-quant CSE (``lowerings/quant_cse.py``): a second ``fp8_block_quant`` / ``mxfp4_quant`` of
the same input with the same arguments is replaced by the first; different arguments, a different
input, or a write to the input in between keep both. Before/after op lists pinned, compiled == eager
bit for bit."""

import pytest
import torch
from expecttest import assert_expected_inline
from torch import fx

import dsv4_compile  # noqa: F401
from dsv4_compile.lowerings.graph_utils import op_list
from dsv4_compile.lowerings.quant_cse import QuantCSE
from dsv4_compile.model.fp8 import quantize_weight

from _compile import compile_checked

dsv4 = torch.ops.dsv4


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(n, k, generator=g) * 0.05)


def two_projections(x, w1, s1, w2, s2):
    """One activation into two FP8 projections (DSv4's q_norm output into wq_b and the indexer's wq_b),
    plus an MXFP4 quant asked for twice and an FP8 quant with another floor (kept)."""
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],)).to(torch.bfloat16)
    q1, s1x = dsv4.fp8_block_quant(y, 128)
    q2, s2x = dsv4.fp8_block_quant(y, block=128, scale_floor=1e-4)  # the same call, by keyword and default
    q3, s3x = dsv4.fp8_block_quant(y, 128, 1e-6)  # another floor: another result
    a = dsv4.fp8_block_gemm(q1, s1x, w1, s1)
    b = dsv4.fp8_block_gemm(q2, s2x, w2, s2)
    m1, e1 = dsv4.mxfp4_quant(y)
    m2, e2 = dsv4.mxfp4_quant(y)
    return a, b, q3, s3x, m1, e1, m2, e2


def test_identical_quants_merge_and_the_result_is_unchanged(no_compile_cache):
    x = torch.randn(5, 256).bfloat16()
    (w1, s1), (w2, s2) = _weights(384, 256, 1), _weights(128, 256, 2)
    eager = two_projections(x, w1, s1, w2, s2)
    # default passes: the CSE runs before fp8_linear, which leaves the merged quant (two GEMM users) alone
    out, pm = compile_checked(two_projections, x, w1, s1, w2, s2)
    for got, want in zip(out, eager):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    snap = pm.snapshots[-1]
    assert snap.matches["quant_cse"] == 2
    assert_expected_inline(snap.before, """\
prims.convert_element_type.default
aten.pow.Tensor_Scalar
aten.mean.dim
aten.add.Scalar
aten.rsqrt.default
aten.mul.Tensor
prims.convert_element_type.default
dsv4.fp8_block_quant.default
dsv4.fp8_block_quant.default
dsv4.fp8_block_quant.default
dsv4.mxfp4_quant.default
dsv4.mxfp4_quant.default
dsv4.fp8_block_gemm.default
dsv4.fp8_block_gemm.default""")
    assert_expected_inline(snap.after, """\
prims.convert_element_type.default
aten.pow.Tensor_Scalar
aten.mean.dim
aten.add.Scalar
aten.rsqrt.default
aten.mul.Tensor
prims.convert_element_type.default
dsv4.fp8_block_quant.default
dsv4.fp8_block_quant.default
dsv4.mxfp4_quant.default
dsv4.fp8_block_gemm.default
dsv4.fp8_block_gemm.default""")


def test_a_write_to_the_input_between_keeps_both():
    """At the FX level (a post-grad graph is functional, so the compiled path never shows this): an
    in-place op on the input's storage between the two calls, directly or through a view, blocks the
    merge; one on another tensor does not."""

    def f(x, other):
        a = dsv4.fp8_block_quant(x, 128)
        other.add_(1)
        b = dsv4.fp8_block_quant(x, 128)
        x.view(-1).mul_(2)
        c = dsv4.fp8_block_quant(x, 128)
        return a, b, c

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 256), torch.randn(3))
    assert QuantCSE()(gm.graph) == 1
    gm.graph.lint()
    assert op_list(gm.graph).count("dsv4.fp8_block_quant.default") == 2


@pytest.mark.parametrize("on", [True, False])
def test_config_switch(on, no_compile_cache):
    x = torch.randn(3, 128).bfloat16()
    (w1, s1), (w2, s2) = _weights(128, 128, 3), _weights(256, 128, 4)
    # fp8_linear off: without the CSE it would fuse each single-user quant into its GEMM
    _, pm = compile_checked(two_projections, x, w1, s1, w2, s2, quant_cse=on, fp8_linear=False)
    snap = pm.snapshots[-1]
    assert ("quant_cse" in snap.matches) == on
    assert snap.after.count("dsv4.fp8_block_quant.default") == (2 if on else 3)


def test_merge_keeps_a_valid_graph_with_getitem_users():
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 128)
    q1 = g.call_function(dsv4.fp8_block_quant.default, (x, 128))
    q2 = g.call_function(dsv4.fp8_block_quant.default, (x, 128, 1e-4))
    import operator

    outs = [g.call_function(operator.getitem, (q, i)) for q in (q1, q2) for i in (0, 1)]
    g.output(tuple(outs))
    assert QuantCSE()(g) == 1
    g.lint()
    assert all(o.args[0] is q1 for o in outs)

"""The indexer-q fusion: op lists before/after the pass (expecttest), compiled == eager, the plain
``IndexerQ`` module compiles to one fused call with no graph breaks, and the pass manager's uuid."""

import subprocess
import sys

import expecttest
import pytest
import torch

import dsv4_compile
from dsv4_compile.lowerings import DSV4PassManager, PassConfig, count_ops
from dsv4_compile.model import IndexerQ
from dsv4_compile.rope import cos_sin_cache

from _compile import compile_checked

pytestmark = pytest.mark.usefixtures("no_compile_cache")
dsv4 = torch.ops.dsv4
SOFTMAX, HEAD = 128**-0.5, 64**-0.5


def _inputs(t=6, h=4, d=128, device="cpu"):
    g = torch.Generator().manual_seed(t)
    q = (torch.randn(t, h, d, generator=g) * 3).bfloat16()
    pos = torch.randint(0, 128, (t,), generator=g)
    cs = cos_sin_cache(64, 128, 160000.0)
    w = torch.randn(t, h, generator=g).bfloat16()
    return tuple(x.to(device) for x in (q, pos, cs, w))


def fp8_one_constant(q, positions, cs, weights):
    y = dsv4.rope(q, positions, cs)
    q_fp8, q_scale = dsv4.fp8_block_quant(y, 128, 1e-4)
    return q_fp8, weights.float() * (SOFTMAX * HEAD) * q_scale.squeeze(-1)


def fp8_constant_chain(q, positions, cs, weights):
    y = dsv4.rope(q, positions, cs)
    q_fp8, q_scale = dsv4.fp8_block_quant(y, 128, 1e-4)
    return q_fp8, weights.float() * SOFTMAX * HEAD * 1.5 * q_scale.squeeze(-1)


def fp8_hadamard_scale_first(q, positions, cs, weights):
    y = dsv4.hadamard(dsv4.rope(q, positions, cs), 128**-0.5)
    q_fp8, q_scale = dsv4.fp8_block_quant(y, 128, 1e-4)
    return q_fp8, q_scale[..., 0] * weights.float() * SOFTMAX * HEAD


def mxfp4_chain(q, positions, cs, weights):
    packed, scale = dsv4.mxfp4_quant(dsv4.rope(q, positions, cs))
    return packed, scale, weights.float() * SOFTMAX * HEAD


def mxfp4_hadamard(q, positions, cs, weights):
    packed, scale = dsv4.mxfp4_quant(dsv4.hadamard(dsv4.rope(q, positions, cs), 128**-0.5))
    return packed, scale, weights.float() * (SOFTMAX * HEAD)


def _compile(fn, *args, dynamic=False, **pass_kw):
    return compile_checked(fn, *args, dynamic=dynamic, **pass_kw)


def _bits(x):
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _ulps(a, b):
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    return (ia - ib).abs().max().item()


class TestIndexerQFusion(expecttest.TestCase):
    def test_fp8_one_constant(self):
        args = _inputs()
        out, pm = _compile(fp8_one_constant, *args)
        snap = pm.snapshots[-1]
        self.assertEqual(snap.matches["indexer_q"], 1)
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
dsv4.fp8_block_quant.default
prims.convert_element_type.default
aten.mul.Tensor
aten.squeeze.dim
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """dsv4.indexer_q_rope_fp8.default""")
        _assert_same(out, fp8_one_constant(*args))  # one constant: weights_out bit-identical

    def test_fp8_constant_chain_is_folded_within_one_rounding(self):
        args = _inputs(t=40)
        out, pm = _compile(fp8_constant_chain, *args)
        snap = pm.snapshots[-1]
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
dsv4.fp8_block_quant.default
prims.convert_element_type.default
aten.mul.Tensor
aten.mul.Tensor
aten.mul.Tensor
aten.squeeze.dim
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """dsv4.indexer_q_rope_fp8.default""")
        ref = fp8_constant_chain(*args)
        assert torch.equal(_bits(out[0]), _bits(ref[0]))
        # eager rounds after each of its 3 multiplies, the fused op rounds the folded constant and
        # one product: they agree to within the chain's extra rounding steps, never more.
        assert 0 < _ulps(out[1], ref[1]) <= 2

    def test_fp8_hadamard_scale_leaf_first(self):
        args = _inputs()
        out, pm = _compile(fp8_hadamard_scale_first, *args)
        snap = pm.snapshots[-1]
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
dsv4.hadamard.default
dsv4.fp8_block_quant.default
aten.select.int
prims.convert_element_type.default
aten.mul.Tensor
aten.mul.Tensor
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """dsv4.indexer_q_rope_fp8.default""")
        ref = fp8_hadamard_scale_first(*args)
        assert torch.equal(_bits(out[0]), _bits(ref[0])) and _ulps(out[1], ref[1]) <= 2

    def test_mxfp4_chain(self):
        args = _inputs()
        out, pm = _compile(mxfp4_chain, *args)
        snap = pm.snapshots[-1]
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
dsv4.mxfp4_quant.default
prims.convert_element_type.default
aten.mul.Tensor
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """dsv4.indexer_q_rope_mxfp4.default""")
        ref = mxfp4_chain(*args)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and _ulps(out[2], ref[2]) <= 2

    def test_mxfp4_hadamard_one_constant(self):
        args = _inputs()
        out, pm = _compile(mxfp4_hadamard, *args)
        snap = pm.snapshots[-1]
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
dsv4.hadamard.default
dsv4.mxfp4_quant.default
prims.convert_element_type.default
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """dsv4.indexer_q_rope_mxfp4.default""")
        _assert_same(out, mxfp4_hadamard(*args))

    def test_dynamic_token_dim_and_lifted_float_scales_stay_bit_exact(self):
        # dynamic=True lifts float module attributes to graph inputs: they cannot be folded, so the
        # pass re-applies them after the fused op (exact: the q scale is a power of two).
        m = IndexerQ(64, 32, n_heads=4, head_dim=128, fmt="fp8")
        g = torch.Generator().manual_seed(0)
        cs = cos_sin_cache(64, 256, 160000.0)
        pm = DSV4PassManager(record=True)
        compiled = torch.compile(m, fullgraph=True, dynamic=True, options={"post_grad_custom_post_pass": pm})
        for t in (3, 17, 64):
            args = (torch.randn(t, 32, generator=g).bfloat16(), torch.randn(t, 64, generator=g).bfloat16(),
                    torch.randint(0, 256, (t,), generator=g), cs)
            _assert_same(compiled(*args), m(*args))
        self.assertEqual(len(pm.snapshots), 1)  # one dynamic graph, no recompiles
        after = pm.snapshots[0].after.splitlines()
        self.assertIn("dsv4.indexer_q_rope_fp8.default", after)
        self.assertNotIn("dsv4.rope.default", after)
        self.assertNotIn("dsv4.fp8_block_quant.default", after)

    def test_mxfp4_fuses_under_dynamic_tokens_when_the_model_states_one_token_dim(self):
        m = IndexerQ(64, 32, n_heads=4, head_dim=128, fmt="mxfp4")
        g = torch.Generator().manual_seed(2)
        cs = cos_sin_cache(64, 256, 160000.0)
        pm = DSV4PassManager(record=True)
        compiled = torch.compile(m, fullgraph=True, options={"post_grad_custom_post_pass": pm})
        for t in (3, 17, 40):
            args = [torch.randn(t, 32, generator=g).bfloat16(), torch.randn(t, 64, generator=g).bfloat16(),
                    torch.randint(0, 256, (t,), generator=g), cs]
            for a in args[:3]:
                torch._dynamo.mark_dynamic(a, 0)
            _assert_same(compiled(*args), m(*args))
        self.assertEqual(len(pm.snapshots), 1)
        self.assertEqual(pm.snapshots[0].matches["indexer_q"], 1)

    def test_mxfp4_is_not_fused_when_weights_may_have_another_token_count(self):
        # Without a stated shared token dim the weights' T is an unrelated symbol: fusing would
        # impose weights.shape[0] == q.shape[0], which the plain graph does not promise.
        args = _inputs()
        for a in (args[0], args[1], args[3]):
            torch._dynamo.mark_dynamic(a, 0)
        out, pm = _compile(mxfp4_chain, *args)
        self.assertEqual(pm.snapshots[-1].matches["indexer_q"], 0)
        _assert_same(out, mxfp4_chain(*args))

    def test_no_match_when_an_intermediate_escapes(self):
        def rope_escapes(q, positions, cs, weights):
            y = dsv4.rope(q, positions, cs)
            q_fp8, q_scale = dsv4.fp8_block_quant(y, 128, 1e-4)
            return y, q_fp8, weights.float() * 0.5 * q_scale.squeeze(-1)

        def wrong_block(q, positions, cs, weights):
            q_fp8, q_scale = dsv4.fp8_block_quant(dsv4.rope(q, positions, cs), 64, 1e-4)
            return q_fp8, weights.float().unsqueeze(-1) * q_scale

        def inverse_rope(q, positions, cs, weights):
            q_fp8, q_scale = dsv4.fp8_block_quant(dsv4.rope(q, positions, cs, True), 128, 1e-4)
            return q_fp8, weights.float() * q_scale.squeeze(-1)

        for fn in (rope_escapes, wrong_block, inverse_rope):
            args = _inputs()
            out, pm = _compile(fn, *args)
            self.assertEqual(pm.snapshots[-1].matches["indexer_q"], 0, fn.__name__)
            _assert_same(out, fn(*args))

    def test_disabled_by_config_and_by_dtype(self):
        args = _inputs()
        _, pm = _compile(fp8_one_constant, *args, indexer_q=False)
        self.assertNotIn("indexer_q", pm.snapshots[-1].matches)
        torch._dynamo.reset()
        _, pm = _compile(fp8_one_constant, *args, dtypes=("float32",))
        self.assertEqual(pm.snapshots[-1].matches["indexer_q"], 0)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_plain_indexer_q_module_compiles_to_one_fused_call(fmt, hadamard):
    from torch._dynamo.utils import counters

    counters.clear()
    m = IndexerQ(64, 32, n_heads=4, head_dim=128, fmt=fmt, hadamard=hadamard)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(9, 32, generator=g).bfloat16(), torch.randn(9, 64, generator=g).bfloat16(),
            torch.randint(0, 64, (9,), generator=g), cos_sin_cache(64, 64, 160000.0))
    pm = DSV4PassManager(record=True)
    compiled = dsv4_compile.compile(m, options={"post_grad_custom_post_pass": pm})
    out = compiled(*args)
    ref = m(*args)
    assert sum(counters["graph_break"].values()) == 0
    fused = dsv4.indexer_q_rope_fp8.default if fmt == "fp8" else dsv4.indexer_q_rope_mxfp4.default
    after = pm.snapshots[-1].after.splitlines()
    assert after.count(f"dsv4.{fused._schema.name.split('::')[1]}.default") == 1
    for name in ("dsv4.rope.default", "dsv4.hadamard.default", "dsv4.fp8_block_quant.default", "dsv4.mxfp4_quant.default"):
        assert name not in after
    assert torch.equal(_bits(out[0]), _bits(ref[0]))
    assert _ulps(out[-1], ref[-1]) <= 2


def test_inductor_options_and_compile_wrapper():
    opts = dsv4_compile.inductor_options(indexer_q=False)
    assert isinstance(opts["post_grad_custom_post_pass"], DSV4PassManager)
    assert opts["post_grad_custom_post_pass"].config == PassConfig(indexer_q=False)
    with pytest.raises(ValueError, match="mode="):
        dsv4_compile.compile(lambda x: x, mode="reduce-overhead")
    with pytest.raises(ValueError, match="PassConfig.dtypes"):
        PassConfig(dtypes=("int8",))


def test_uuid_is_stable_across_processes_and_tracks_config():
    code = "import dsv4_compile.lowerings as L; print(L.DSV4PassManager().uuid())"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert len(runs) == 1 and DSV4PassManager().uuid() in runs
    assert DSV4PassManager(PassConfig(indexer_q=False)).uuid() != DSV4PassManager().uuid()


def test_pass_count_helper_counts_fused_calls():
    args = _inputs()
    pm = DSV4PassManager(record=True)
    gm_holder = {}

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        gm_holder["gm"] = gm
        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": pm})

    torch.compile(fp8_one_constant, backend=backend, fullgraph=True)(*args)
    assert count_ops(gm_holder["gm"].graph, dsv4.rope.default) == 1  # Dynamo graph: plain form
    assert pm.snapshots[-1].matches["indexer_q"] == 1

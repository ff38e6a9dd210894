"""The output-path fusion ``rope(inverse) → fp8_block_quant(128)`` ⇒ ``inv_rope_fp8_quant``: op lists
before/after the pass (expecttest), compiled == eager bit for bit (static, a dynamic token dim,
``dynamic=True``), and the regions it must leave alone."""

import expecttest
import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.rope import cos_sin_cache

from _compile import compile_checked

pytestmark = pytest.mark.usefixtures("no_compile_cache")
dsv4 = torch.ops.dsv4
G = 2


def _inputs(t=5, h=8, seed=0):
    g = torch.Generator().manual_seed(seed * 97 + t)
    o = (torch.randn(t, h, 512, generator=g) * 3).bfloat16()
    pos = torch.randint(0, 256, (t,), generator=g)
    return o, pos, cos_sin_cache(64, 256, 160000.0)


def inv_rope_quant(o, pos, cs):
    t, h, d = o.shape
    y = dsv4.rope(o, pos, cs, True)
    return dsv4.fp8_block_quant(y.view(t, G, h // G * d), 128, 1e-10)


def inv_rope_quant_consumers(o, pos, cs):
    # the quantized values and the scales both feed further (aten) computation
    q, s = inv_rope_quant(o, pos, cs)
    return q.float().sum(-1), s * 2.0


def inv_rope_quant_per_head(o, pos, cs):
    q, s = dsv4.fp8_block_quant(dsv4.rope(o, pos, cs, inverse=True), 128, 1e-10)  # G = H, no view
    return q, s


def inv_rope_quant_scale_only(o, pos, cs):
    _, s = dsv4.fp8_block_quant(dsv4.rope(o, pos, cs, True).reshape(o.shape[0], 1, -1), 128, 1e-10)
    return s


def grouped_dequant(o, pos, cs):
    # the values a plain grouped projection would consume: q · 2^e per 128-block, bf16
    q, s = inv_rope_quant(o, pos, cs)
    return (q.float().unflatten(-1, (-1, 128)) * s.unsqueeze(-1)).flatten(-2).bfloat16()


def flat_views(o, pos, cs):
    # views that need the plain contiguous layout of q and s
    q, s = inv_rope_quant(o, pos, cs)
    return q.view(o.shape[0], -1).float() * 2.0, s.view(o.shape[0], -1) * 3.0


def _bits(x):
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _strides(x):
    return [st for st, n in zip(x.stride(), x.shape) if n > 1]


def _assert_same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        # values and the eager strides (Inductor restrides graph outputs to the plain graph's; the
        # stride of a size-1 dim is insignificant and may differ)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _strides(a) == _strides(b)
        assert torch.equal(_bits(a), _bits(b))


class TestInvRopeQuantFusion(expecttest.TestCase):
    def test_rope_then_grouped_quant_becomes_one_op(self):
        args = _inputs()
        out, pm = compile_checked(inv_rope_quant, *args)
        snap = pm.snapshots[-1]
        self.assertEqual(snap.matches["inv_rope_quant"], 1)
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
aten.reshape.default
dsv4.fp8_block_quant.default""")
        self.assertExpectedInline(snap.after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
aten.clone.default""")
        _assert_same(out, inv_rope_quant(*args))

    def test_consumers_of_values_and_scales(self):
        args = _inputs(t=7)
        out, pm = compile_checked(inv_rope_quant_consumers, *args)
        snap = pm.snapshots[-1]
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
aten.reshape.default
dsv4.fp8_block_quant.default
prims.convert_element_type.default
aten.sum.dim_IntList
aten.mul.Tensor""")
        self.assertExpectedInline(snap.after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
prims.convert_element_type.default
aten.sum.dim_IntList
aten.mul.Tensor""")
        _assert_same(out, inv_rope_quant_consumers(*args))

    def test_per_head_groups_and_scale_only(self):
        args = _inputs(t=4, h=4)
        out, pm = compile_checked(inv_rope_quant_per_head, *args)
        self.assertExpectedInline(pm.snapshots[-1].after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
aten.clone.default""")
        _assert_same(out, inv_rope_quant_per_head(*args))
        torch._dynamo.reset()
        out, pm = compile_checked(inv_rope_quant_scale_only, *args)
        self.assertExpectedInline(pm.snapshots[-1].after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
aten.clone.default""")
        _assert_same(out, inv_rope_quant_scale_only(*args))

    def test_dynamic_token_dim(self):
        # token counts on both sides of the scale's padding (T % 4 == 0 and != 0): one graph
        for fn in (inv_rope_quant, grouped_dequant, flat_views):
            torch._dynamo.reset()
            pm = DSV4PassManager(record=True)
            compiled = torch.compile(fn, fullgraph=True, options={"post_grad_custom_post_pass": pm})
            for t in (3, 8, 5, 12, 2):
                args = _inputs(t=t, seed=1)
                for a in args[:2]:
                    torch._dynamo.mark_dynamic(a, 0)
                _assert_same(compiled(*args), fn(*args))
            self.assertEqual(len(pm.snapshots), 1, fn.__name__)  # no recompiles
            self.assertEqual(pm.snapshots[0].matches["inv_rope_quant"], 1, fn.__name__)

    def test_dynamic_true_with_static_head_dims(self):
        # dynamic=True makes every input dim symbolic; in a model H and 512 come from static weight
        # shapes, which mark_static reproduces here. Only the token dim varies.
        pm = DSV4PassManager(record=True)
        compiled = torch.compile(inv_rope_quant_consumers, fullgraph=True, dynamic=True,
                                 options={"post_grad_custom_post_pass": pm})
        for t in (5, 8, 2, 13, 4):
            args = _inputs(t=t, seed=2)
            torch._dynamo.mark_static(args[0], 1)
            torch._dynamo.mark_static(args[0], 2)
            _assert_same(compiled(*args), inv_rope_quant_consumers(*args))
        self.assertEqual(len(pm.snapshots), 1)
        self.assertExpectedInline(pm.snapshots[0].after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
prims.convert_element_type.default
aten.sum.dim_IntList
aten.mul.Tensor""")

    def test_no_match(self):
        def forward_rope(o, pos, cs):
            return dsv4.fp8_block_quant(dsv4.rope(o, pos, cs).view(o.shape[0], G, -1), 128, 1e-10)

        def block_64(o, pos, cs):
            return dsv4.fp8_block_quant(dsv4.rope(o, pos, cs, True).view(o.shape[0], G, -1), 64, 1e-10)

        def other_floor(o, pos, cs):
            return dsv4.fp8_block_quant(dsv4.rope(o, pos, cs, True).view(o.shape[0], G, -1), 128, 1e-4)

        def rope_escapes(o, pos, cs):
            y = dsv4.rope(o, pos, cs, True)
            return (y,) + tuple(dsv4.fp8_block_quant(y.view(o.shape[0], G, -1), 128, 1e-10))

        def split_heads(o, pos, cs):  # the view does not keep whole heads per group
            return dsv4.fp8_block_quant(dsv4.rope(o, pos, cs, True).view(o.shape[0], -1, 256), 128, 1e-10)

        def fp32_o(o, pos, cs):
            return dsv4.fp8_block_quant(dsv4.rope(o.float(), pos, cs, True).view(o.shape[0], G, -1), 128, 1e-10)

        for fn in (forward_rope, block_64, other_floor, rope_escapes, split_heads, fp32_o):
            torch._dynamo.reset()
            args = _inputs()
            out, pm = compile_checked(fn, *args)
            self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 0, fn.__name__)
            self.assertNotIn("dsv4.inv_rope_fp8_quant.default", pm.snapshots[-1].after, fn.__name__)
            _assert_same(out, fn(*args))

    def test_no_match_on_a_narrow_table(self):
        args = _inputs()
        narrow = args[2][:, :32].contiguous()  # a 32-wide table rotates 32 dims: not the fused op's 64
        out, pm = compile_checked(inv_rope_quant, args[0], args[1], narrow)
        self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 0)
        _assert_same(out, inv_rope_quant(args[0], args[1], narrow))

    def test_disabled_by_config_and_by_dtype(self):
        args = _inputs()
        _, pm = compile_checked(inv_rope_quant, *args, inv_rope_quant=False)
        self.assertNotIn("inv_rope_quant", pm.snapshots[-1].matches)
        self.assertIn("dsv4.fp8_block_quant.default", pm.snapshots[-1].after)
        torch._dynamo.reset()
        _, pm = compile_checked(inv_rope_quant, *args, dtypes=("float32",))
        self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 0)

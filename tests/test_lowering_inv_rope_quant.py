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


def inv_rope_quant_vllm(o, pos, cs):
    # vLLM's bytes: the fp32 rotation of o.float() is quantized (nothing rounded to bf16)
    t, h, d = o.shape
    y = dsv4.rope(o.float(), pos, cs, True)
    return dsv4.fp8_block_quant(y.view(t, G, h // G * d), 128, 1e-10)


def inv_rope_quant_vllm_shared_convert(o, pos, cs):
    # the fp32 copy of o has another user: it stays, the rope and the quant fuse
    of = o.float()
    q, s = dsv4.fp8_block_quant(dsv4.rope(of, pos, cs, True).view(o.shape[0], G, -1), 128, 1e-10)
    return q, s, of.amax(-1)


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
        for fn in (inv_rope_quant, grouped_dequant, flat_views, inv_rope_quant_vllm):
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

        def fp16_o_as_fp32(o, pos, cs):  # an fp32 rotation, but of an fp16 o: not the fused op's input
            return dsv4.fp8_block_quant(dsv4.rope(o.half().float(), pos, cs, True).view(o.shape[0], G, -1),
                                        128, 1e-10)

        for fn in (forward_rope, block_64, other_floor, rope_escapes, split_heads, fp16_o_as_fp32):
            torch._dynamo.reset()
            args = _inputs()
            out, pm = compile_checked(fn, *args)
            self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 0, fn.__name__)
            self.assertNotIn("dsv4.inv_rope_fp8_quant.default", pm.snapshots[-1].after, fn.__name__)
            _assert_same(out, fn(*args))

    def test_fp32_rotation_becomes_the_vllm_mode(self):
        args = _inputs(t=6)
        out, pm = compile_checked(inv_rope_quant_vllm, *args)
        snap = pm.snapshots[-1]
        self.assertEqual(snap.matches["inv_rope_quant"], 1)
        self.assertExpectedInline(snap.before, """\
prims.convert_element_type.default
dsv4.rope.default
aten.reshape.default
dsv4.fp8_block_quant.default""")
        self.assertExpectedInline(snap.after, """\
dsv4.inv_rope_fp8_quant.default
aten.permute.default
aten.clone.default""")
        _assert_same(out, inv_rope_quant_vllm(*args))
        # = the fused op in vLLM mode on the bf16 o, which differs from the default mode here
        q, s = dsv4.inv_rope_fp8_quant(*args, G, round_rope_bf16=False)
        _assert_same(out, (q.contiguous(), s.transpose(0, 1).contiguous()))
        self.assertFalse(torch.equal(_bits(out[0]), _bits(inv_rope_quant(*args)[0])))

        torch._dynamo.reset()
        out, pm = compile_checked(inv_rope_quant_vllm_shared_convert, *args)
        self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 1)
        self.assertExpectedInline(pm.snapshots[-1].after, """\
prims.convert_element_type.default
dsv4.inv_rope_fp8_quant.default
aten.permute.default
aten.clone.default
aten.amax.default""")
        _assert_same(out, inv_rope_quant_vllm_shared_convert(*args))

    def test_fp32_input_is_not_matched(self):
        # an fp32 graph input (no bf16 o to hand the fused op)
        o, pos, cs = _inputs()
        out, pm = compile_checked(inv_rope_quant, o.float(), pos, cs)
        self.assertEqual(pm.snapshots[-1].matches["inv_rope_quant"], 0)
        _assert_same(out, inv_rope_quant(o.float(), pos, cs))

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


def test_model_vllm_mode_is_fused_and_matches_eager():
    """``DeepseekV4Attention(o_rope_bf16=False)`` (an SWA layer, 40 + 25 tokens): the pass fuses its
    ``rope(o.float())`` → quant into the vLLM mode, compiled == eager bit for bit, and the layer's
    output differs from the default's (the rotated dims are not rounded to bf16)."""
    from dsv4_compile import DSv4AttentionConfig
    from dsv4_compile.model import DeepseekV4Attention
    from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

    cfg = DSv4AttentionConfig.tiny()
    cc = CacheConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=80, token_budget=4096)
    x = torch.randn(65, cfg.hidden_size, generator=torch.Generator().manual_seed(5)).bfloat16()

    def run(o_rope_bf16, compiled=False):
        torch.manual_seed(0)
        layer = DeepseekV4Attention(cfg, 0, max_model_len=256, o_rope_bf16=o_rope_bf16)
        mgr = KVCacheManager(cfg, [0], cc)
        builder = StepMetadataBuilder(mgr)
        for r in ("a", "b"):
            mgr.add_request(r)
        pm = DSV4PassManager(record=True)
        step = lambda x, meta: layer(x, meta, mgr.caches[0])  # noqa: E731
        if compiled:
            step = compile_step(step, options={"post_grad_custom_post_pass": pm, "fx_graph_cache": False})
        return step(x, builder.build([("a", 40), ("b", 25)])), pm

    eager, _ = run(False)
    out, pm = run(False, compiled=True)
    assert pm.snapshots[-1].matches["inv_rope_quant"] == 1
    after = pm.snapshots[-1].after.splitlines()
    assert "dsv4.inv_rope_fp8_quant.default" in after and "dsv4.fp8_block_quant.default" not in after
    assert torch.equal(out, eager)
    assert not torch.equal(eager, run(True)[0])

"""The cache fusions: ``rope → kv_insert`` ⇒ ``kv_rope_insert`` and the compressor chain ⇒
``compressor_insert``. Op lists before/after the pass (expecttest), compiled cache bytes == eager
cache bytes, the no-clone / no-host-sync checks on every final graph (``compile_checked``), and
negative tests that show the checks fire."""

import expecttest
import pytest
import torch

import dsv4_compile  # noqa: F401
from dsv4_compile import layouts
from dsv4_compile.lowerings.checks import cache_copies, capture_final_graphs, host_syncs
from dsv4_compile.rope import cos_sin_cache

from _compile import compile_checked
from test_compressor import Sequence

pytestmark = pytest.mark.usefixtures("no_compile_cache")
dsv4 = torch.ops.dsv4
BS = 16


def _kv_args(t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(t, 512, generator=g) * 3).bfloat16()
    pos = torch.randint(0, 256, (t,), generator=g)
    cs = cos_sin_cache(64, 256, 160000.0)
    cache = torch.full((3, layouts.page_bytes("fp8_ds_mla", BS)), 165, dtype=torch.uint8)
    slots = torch.randperm(3 * BS, generator=g)[:t]
    slots[1] = -1
    return kv, pos, cs, cache, slots


def rope_then_insert(kv, pos, cs, cache, slots):
    dsv4.kv_insert(dsv4.rope(kv, pos, cs), cache, slots, BS)


def rope_escapes(kv, pos, cs, cache, slots):
    y = dsv4.rope(kv, pos, cs)
    dsv4.kv_insert(y, cache, slots, BS)
    return y


def inverse_rope_then_insert(kv, pos, cs, cache, slots):
    dsv4.kv_insert(dsv4.rope(kv, pos, cs, inverse=True), cache, slots, BS)


def _eager_and_compiled(fn, args, dynamic=False, **pass_kw):
    eager = [a.clone() for a in args]
    want = fn(*eager)
    comp = [a.clone() for a in args]
    got, pm = compile_checked(fn, *comp, dynamic=dynamic, **pass_kw)
    for a, b in zip(eager, comp):
        assert torch.equal(a, b)  # every cache byte, including the untouched sentinels
    return want, got, pm


def compressor_chain(r, d, hadamard):
    """The plain compressor (as ``dsv4_compile.ops.compressor`` documents it) for one layer."""

    sbs = 4 if r == 4 else 8  # state rows per page, as test_compressor.Sequence allocates them

    def fn(kv_score, positions, ape, st, sslot, bt, req, w, cs, cache, slot, fmt):
        dsv4.compressor_state_save(kv_score, positions, ape, st, sslot, sbs)
        pooled = dsv4.compressor_pool(st, positions, bt, req, sbs, r, d)
        y = dsv4.rope(dsv4.rms_norm(pooled, w, 1e-6), positions // r * r, cs).to(torch.bfloat16)
        if hadamard:
            y = dsv4.hadamard(y, d**-0.5)
        if d == layouts.KV_HEAD_DIM:
            dsv4.kv_insert(y, cache, slot, BS)
        else:
            dsv4.indexer_k_insert(y, cache, slot, BS, fmt)

    return fn


def _compressor_steps(r, d, fmt, n=None):
    n = n or (19 if r == 4 else 2 * r + 3)
    seq = Sequence(r, d, fmt, [n, 6], seed=r + d)
    st, cache = seq.caches()
    steps = []
    for spans, pad in (([(0, 0, 11), (1, 0, 2)], 2), ([(0, 11, n), (1, 2, 6)], 0)):
        a = seq.step(spans, pad)
        steps.append((a["kv_score"], a["positions"], a["ape"], a["state_slot_mapping"], a["state_block_table"],
                      a["token_to_req"], a["norm_weight"], a["cos_sin_cache"], a["slot_mapping"]))
    return st, cache, steps


def _run_compressor(fn, st, cache, steps, fmt, compiled=None):
    for kv_score, pos, ape, sslot, bt, req, w, cs, slot in steps:
        (compiled or fn)(kv_score, pos, ape, st, sslot, bt, req, w, cs, cache, slot, fmt)


class TestKvRopeInsertFusion(expecttest.TestCase):
    def test_rope_then_insert_becomes_one_op(self):
        _, _, pm = _eager_and_compiled(rope_then_insert, _kv_args())
        snap = pm.snapshots[-1]
        self.assertEqual(snap.matches["kv_rope_insert"], 1)
        self.assertExpectedInline(snap.before, """\
dsv4.rope.default
af2(dsv4.kv_insert.default)
aten.copy_.default""")
        self.assertExpectedInline(snap.after, """\
af2(dsv4.kv_rope_insert.default)
aten.copy_.default""")

    def test_dynamic_token_dim(self):
        args = _kv_args(t=9)
        torch._dynamo.mark_dynamic(args[0], 0)
        _, _, pm = _eager_and_compiled(rope_then_insert, args)
        self.assertEqual(pm.snapshots[-1].matches["kv_rope_insert"], 1)
        args = _kv_args(t=13, seed=1)  # another size: no recompile needed, same bytes
        _eager_and_compiled(rope_then_insert, args)

    def test_no_match_when_rotated_kv_escapes_or_rotation_is_inverse(self):
        for fn in (rope_escapes, inverse_rope_then_insert):
            torch._dynamo.reset()
            want, got, pm = _eager_and_compiled(fn, _kv_args())
            self.assertEqual(pm.snapshots[-1].matches["kv_rope_insert"], 0, fn.__name__)
            if want is not None:
                assert torch.equal(want, got)

    def test_disabled_by_config(self):
        _, _, pm = _eager_and_compiled(rope_then_insert, _kv_args(), kv_rope_insert=False)
        self.assertNotIn("kv_rope_insert", pm.snapshots[-1].matches)
        self.assertIn("af2(dsv4.kv_insert.default)", pm.snapshots[-1].after)


class TestCompressorFusion(expecttest.TestCase):
    def _check(self, r, d, fmt, hadamard, dynamic=False):
        fn = compressor_chain(r, d, hadamard)
        st, cache, steps = _compressor_steps(r, d, fmt)
        est, ecache = st.clone(), cache.clone()
        _run_compressor(fn, est, ecache, steps, fmt)
        kv_score, pos, ape, sslot, bt, req, w, cs, slot = steps[0]
        args = (kv_score, pos, ape, st, sslot, bt, req, w, cs, cache, slot, fmt)
        _, pm = compile_checked(fn, *args, dynamic=dynamic)
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic,
                                 options={"post_grad_custom_post_pass": pm})
        _run_compressor(fn, st, cache, steps[1:], fmt, compiled)
        assert torch.equal(st, est) and torch.equal(cache, ecache)  # both steps, every byte
        assert int((cache != 165).sum()) > 0
        return pm.snapshots[0]

    def test_main_c4(self):
        snap = self._check(4, 512, "fp8_ds_mla", False)
        self.assertEqual(snap.matches["compressor"], 1)
        self.assertExpectedInline(snap.before, """\
af2(dsv4.compressor_state_save.default)
dsv4.compressor_pool.default
dsv4.rms_norm.default
aten.div.Tensor_mode
aten.mul.Tensor
dsv4.rope.default
prims.convert_element_type.default
af2(dsv4.kv_insert.default)
aten.copy_.default
aten.copy_.default""")
        self.assertExpectedInline(snap.after, """\
af2(dsv4.compressor_insert.default)
aten.copy_.default
aten.copy_.default""")

    def test_indexer_c4_hadamard_mxfp4(self):
        snap = self._check(4, 128, "mxfp4", True)
        self.assertEqual(snap.matches["compressor"], 1)
        self.assertExpectedInline(snap.before, """\
af2(dsv4.compressor_state_save.default)
dsv4.compressor_pool.default
dsv4.rms_norm.default
aten.div.Tensor_mode
aten.mul.Tensor
dsv4.rope.default
prims.convert_element_type.default
dsv4.hadamard.default
af2(dsv4.indexer_k_insert.default)
aten.copy_.default
aten.copy_.default""")
        self.assertExpectedInline(snap.after, """\
af2(dsv4.compressor_insert.default)
aten.copy_.default
aten.copy_.default""")

    def test_main_c128_dynamic(self):
        snap = self._check(128, 512, "fp8_ds_mla", False, dynamic=True)
        self.assertEqual(snap.matches["compressor"], 1)
        self.assertExpectedInline(snap.after, """\
af2(dsv4.compressor_insert.default)
aten.copy_.default
aten.copy_.default""")

    def test_no_match_when_rope_is_not_at_the_window_start(self):
        r, d = 4, 128

        def fn(kv_score, positions, ape, st, sslot, bt, req, w, cs, cache, slot, fmt):
            dsv4.compressor_state_save(kv_score, positions, ape, st, sslot, 4)
            pooled = dsv4.compressor_pool(st, positions, bt, req, 4, r, d)
            y = dsv4.rope(dsv4.rms_norm(pooled, w, 1e-6), positions, cs).to(torch.bfloat16)  # not (p//r)·r
            dsv4.indexer_k_insert(y, cache, slot, BS, fmt)

        st, cache, steps = _compressor_steps(r, d, "fp8")
        kv_score, pos, ape, sslot, bt, req, w, cs, slot = steps[0]
        est, ecache = st.clone(), cache.clone()
        fn(kv_score, pos, ape, est, sslot, bt, req, w, cs, ecache, slot, "fp8")
        _, pm = compile_checked(fn, kv_score, pos, ape, st, sslot, bt, req, w, cs, cache, slot, "fp8")
        self.assertEqual(pm.snapshots[0].matches["compressor"], 0)
        assert torch.equal(st, est) and torch.equal(cache, ecache)


# --- the checks fire ----------------------------------------------------------------------------
def _final_graphs(fn, *args):
    with capture_final_graphs() as graphs:
        torch.compile(fn, fullgraph=True)(*args)
    return graphs


def test_check_finds_a_cache_clone():
    def snapshot_then_insert(kv, pos, cs, cache, slots):
        old = cache.clone()
        dsv4.kv_insert(kv, cache, slots, BS)
        return old

    (gm,) = _final_graphs(snapshot_then_insert, *_kv_args())
    assert len(cache_copies(gm.graph)) == 1 and not host_syncs(gm.graph)


def test_check_finds_host_syncs(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", True)

    def item(kv, pos, cs, cache, slots):
        dsv4.kv_insert(kv, cache, slots, BS)
        return kv[: slots.max().item()]

    def mask(kv, pos, cs, cache, slots):
        dsv4.kv_insert(kv, cache, slots, BS)
        return slots[slots > 0]

    for fn in (item, mask):
        torch._dynamo.reset()
        (gm,) = _final_graphs(fn, *_kv_args())
        assert host_syncs(gm.graph) and not cache_copies(gm.graph), fn.__name__


def test_clean_graph_passes_the_checks():
    (gm,) = _final_graphs(rope_then_insert, *_kv_args())
    assert not cache_copies(gm.graph) and not host_syncs(gm.graph)

"""Limits enforced on the host before any state changes, and what the GPU kernels do with a value
past a limit when those checks are bypassed (issue 12, item 3; docs/numerics.md §9.4)."""

import pytest
import torch

from dsv4_compile import DSv4AttentionConfig, layouts
from dsv4_compile.kernels.triton import cache as tcache
from dsv4_compile.kernels.triton import indexer_q as tindexer_q
from dsv4_compile.kernels.triton import output as toutput
from dsv4_compile.kernels.triton import primitives
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.rope import cos_sin_cache
from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

CFG = DSv4AttentionConfig.tiny()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_layer_with_short_rope_tables_is_refused_before_any_cache_byte(compiled):
    """The reported input: tables of 64 positions served by a runtime of max_model_len 256."""
    layer = DeepseekV4Attention(CFG, 1, max_model_len=64)
    mgr = KVCacheManager(CFG, [1], CacheConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=128,
                                               token_budget=512))
    b = StepMetadataBuilder(mgr)
    mgr.add_request("a")
    fn = lambda x, meta: layer(x, meta, mgr.caches[0])  # noqa: E731
    step = compile_step(fn) if compiled else fn
    before = [t.clone() for t in mgr.caches[0].tensors()]
    with pytest.raises(ValueError, match=r"RoPE tables of 64 positions .*CacheConfig.max_model_len=256"):
        step(torch.randn(100, CFG.hidden_size).bfloat16(), b.build([("a", 100)]))
    assert all(torch.equal(w, g) for w, g in zip(before, mgr.caches[0].tensors()))
    assert mgr.used_tokens == 100  # a direct call: the builder accounted the step; rollback undoes it
    mgr.rollback()
    assert mgr.used_tokens == 0 and mgr.requests["a"].num_tokens == 0


def test_a_step_that_raises_is_rolled_back():
    """A layer that raises inside a step (the short-table check, bypassing the construction probe)
    leaves the cache manager as before the step: the request is not stuck holding 100 tokens."""
    from dsv4_compile.runtime import CUDAGraphRunner

    cc = CacheConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=128, token_budget=512)
    short = DeepseekV4Attention(CFG, 1, max_model_len=64)
    good = DeepseekV4Attention(CFG, 1, max_model_len=256)
    mgr = KVCacheManager(CFG, [1], cc)
    b = StepMetadataBuilder(mgr)
    use = {"layer": good}
    runner = CUDAGraphRunner(lambda x, meta: use["layer"](x, meta, mgr.caches[0]), b, CFG.hidden_size)
    mgr.add_request("a")
    runner(torch.randn(20, CFG.hidden_size).bfloat16(), [("a", 20)])
    pages = {k: list(v) for k, v in mgr.requests["a"].pages.items()}
    tables = {k: t.clone() for k, t in mgr.tables.items()}
    use["layer"] = short
    with pytest.raises(ValueError, match="RoPE tables of 64 positions"):
        runner(torch.randn(100, CFG.hidden_size).bfloat16(), [("a", 100)])
    assert mgr.used_tokens == 20 and mgr.requests["a"].num_tokens == 20
    assert {k: list(v) for k, v in mgr.requests["a"].pages.items()} == pages
    assert all(torch.equal(tables[k], mgr.tables[k]) for k in tables)
    with pytest.raises(ValueError, match="x has 3 rows"):  # a check before the build: nothing to undo
        runner(torch.randn(3, CFG.hidden_size).bfloat16(), [("a", 2)])
    assert mgr.used_tokens == 20
    use["layer"] = good
    runner(torch.randn(100, CFG.hidden_size).bfloat16(), [("a", 100)])  # the same step now runs
    assert mgr.used_tokens == 120


def test_runner_refuses_a_layer_with_short_rope_tables_at_construction():
    """Before any request is admitted: nothing to roll back."""
    from dsv4_compile.runtime import DecodeGraphRunner

    layer = DeepseekV4Attention(CFG, 2, max_model_len=64)
    mgr = KVCacheManager(CFG, [2], CacheConfig(max_num_seqs=2, max_model_len=256, max_num_batched_tokens=128,
                                               token_budget=512))
    b = StepMetadataBuilder(mgr)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    with pytest.raises(ValueError, match=r"RoPE tables of 64 positions"):
        DecodeGraphRunner(step, b, CFG.hidden_size)
    assert mgr.used_tokens == 0 and not mgr.requests


def test_builder_refuses_positions_past_max_model_len_before_accounting():
    mgr = KVCacheManager(CFG, [1], CacheConfig(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=128,
                                               token_budget=512))
    b = StepMetadataBuilder(mgr)
    mgr.add_request("a")
    with pytest.raises(ValueError, match="max_model_len = 64"):
        b.build([("a", 65)])
    assert mgr.used_tokens == 0 and mgr.requests["a"].num_tokens == 0


# --- past a limit on the GPU path (launchers called directly: no host check) ----------------------
def _bad_positions(t, max_pos):
    pos = torch.arange(t) % max_pos
    pos[1], pos[3] = max_pos, -5  # one past the table, and negative
    return pos


def _kernel_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_rope_kernel_out_of_range_position_gives_nan_not_a_rotation():
    dev = _kernel_device()
    cs = cos_sin_cache(64, 16, 10000.0, device=dev)
    x = torch.randn(6, 2, 128, device=dev).bfloat16()
    pos = _bad_positions(6, 16).to(dev)
    y = primitives.rope(x, pos, cs)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[1, 3]] = True
    assert torch.isnan(y[bad.to(dev)][..., 64:]).all()
    assert torch.equal(y[bad.to(dev)][..., :64], x[bad.to(dev)][..., :64])  # unrotated dims untouched
    good = ~bad.to(dev)
    assert torch.equal(y[good], torch.ops.dsv4.rope(x[good].cpu(), pos[good].cpu(), cs.cpu()).to(dev))


def test_kv_rope_insert_kernel_out_of_range_position_stores_nan_rope_dims():
    dev = _kernel_device()
    cs = cos_sin_cache(64, 16, 10000.0, device=dev)
    kv = torch.randn(6, 512, device=dev).bfloat16()
    cache = torch.zeros(1, layouts.page_bytes("fp8_ds_mla", 16), dtype=torch.uint8, device=dev)
    tcache.kv_insert(kv, _bad_positions(6, 16).to(dev), cs, cache, torch.arange(6, device=dev), 16)
    back = torch.ops.dsv4.kv_gather(cache.cpu(), torch.arange(6), 16)
    assert torch.isnan(back[[1, 3], 448:].float()).all() and torch.isfinite(back[[0, 2, 4, 5]].float()).all()


def test_indexer_q_and_inv_rope_quant_kernels_out_of_range_position_give_nan():
    dev = _kernel_device()
    cs = cos_sin_cache(64, 16, 10000.0, device=dev)
    pos = _bad_positions(6, 16).to(dev)
    q = torch.randn(6, 4, 128, device=dev).bfloat16()
    q_fp8, _ = tindexer_q.indexer_q_rope_fp8(q, pos, cs, torch.randn(6, 4, device=dev), 0.5)
    assert torch.isnan(q_fp8[[1, 3]][..., 64:].float()).all() and torch.isfinite(q_fp8[[0, 2]].float()).all()
    o = torch.randn(6, 8, 512, device=dev).bfloat16()
    o_fp8, _ = toutput.inv_rope_fp8_quant(o, pos, cs, 2)  # [T, G, D]: each head's last 64 dims rotate
    rot = o_fp8.float().reshape(6, 8, 512)[..., 448:]
    assert torch.isnan(rot[[1, 3]]).all() and torch.isfinite(rot[[0, 2, 4, 5]]).all()


@pytest.mark.parametrize("fmt,d", [("fp8_ds_mla", 512), ("fp8", 128), ("mxfp4", 128)])
def test_compressor_insert_kernel_out_of_range_position_is_not_plausible(fmt, d):
    """Entries whose window start is past the RoPE table come out NaN / non-finite in every cache
    format (fp8_ds_mla: NaN rope dims; FP8 indexer: NaN e4m3; MXFP4: the E8M0 NaN scale byte)."""
    from test_compressor import Sequence

    from dsv4_compile.kernels.triton import compressor as tcomp
    from dsv4_compile.reference import cache as rcache

    dev = _kernel_device()
    seq = Sequence(4, d, fmt, [16], seed=3, device=dev)
    st, cache = seq.caches()
    a = seq.step([(0, 0, 16)])
    cs = a["cos_sin_cache"][:8]  # entries closed at p = 11, 15 rotate at 8, 12: outside the table
    tcomp.compressor_insert(a["kv_score"], a["positions"], a["ape"], st, a["state_slot_mapping"],
                            a["state_block_table"], a["token_to_req"], a["state_block_size"], a["norm_weight"],
                            a["eps"], cs, cache, a["slot_mapping"], a["block_size"], fmt, False)
    slots = a["slot_mapping"].cpu()[[3, 7, 11, 15]]
    if fmt == "fp8_ds_mla":
        back = rcache.kv_gather(cache.cpu(), slots, seq.bs).float()
        assert torch.isnan(back[2:, 448:]).all() and torch.isfinite(back[:2]).all()
    else:
        back = rcache.indexer_k_gather(cache.cpu(), slots, seq.bs, fmt)
        assert torch.isfinite(back[:2]).all()
        assert (~torch.isfinite(back[2:, 64:])).all() if fmt == "fp8" else (~torch.isfinite(back[2:])).any(dim=1).all()


def test_mxfp4_quant_marks_nan_blocks_with_the_e8m0_nan_scale():
    from dsv4_compile.kernels.triton import primitives as tprim
    from dsv4_compile.reference import quant as rquant

    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    for packed, scale in (rquant.mxfp4_quant(x), tprim.mxfp4_quant(x.to(_kernel_device()))):
        scale = scale.cpu()
        assert scale[1, 1] == 0xFF and (scale[[0, 2]] != 0xFF).all() and scale[1, 0] != 0xFF
    (rp, rs), (kp, ks) = rquant.mxfp4_quant(x), (t.cpu() for t in tprim.mxfp4_quant(x.to(_kernel_device())))
    assert torch.equal(rs, ks)
    same = torch.ones_like(rp, dtype=torch.bool)
    same[1, 20] = False  # the byte holding the NaN element: E2M1 has no NaN code, either nibble will do
    assert torch.equal(rp[same], kp[same])
    q_packed, q_scale, _ = tindexer_q.indexer_q_rope_mxfp4(
        torch.randn(6, 4, 128).bfloat16().to(_kernel_device()), _bad_positions(6, 16).to(_kernel_device()),
        cos_sin_cache(64, 16, 10000.0, device=_kernel_device()), torch.randn(6, 4, device=_kernel_device()), 0.5)
    q_scale = q_scale.cpu()
    assert (q_scale[[1, 3]][..., 2:] == 0xFF).all() and (q_scale[[0, 2, 4, 5]] != 0xFF).all()

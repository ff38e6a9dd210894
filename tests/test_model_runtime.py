"""DeepseekV4Attention under torch.compile and the runtime (issue 6 guarantees, CPU part; the CUDA
part is marked ``cuda``): fullgraph with no graph breaks, one graph for every batch size (no
recompiles over 100 varying decode steps), no host syncs and no cache clone / copy-back in the final
graphs, the fusions that fire per layer type (expecttest), compiled == eager bit-exact, padding that
never changes a cache byte, checkpoint loading, and host-side ValueErrors for bad input."""

import dataclasses
import functools
import random

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.utils import counters

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.lowerings.checks import assert_graph_ok, capture_final_graphs
from dsv4_compile.model import DeepseekV4Attention, dequant_fp8_weight
from dsv4_compile.runtime import (CacheConfig, DecodeGraphRunner, KVCacheManager, StepMetadataBuilder,
                                  compile_step)

CFG = DSv4AttentionConfig.tiny()
MAX_LEN = 512
CC = CacheConfig(max_num_seqs=8, max_model_len=MAX_LEN, max_num_batched_tokens=160, token_budget=4096)
LAYER_TYPES = {0: "swa", 1: "csa", 2: "hca"}


def make_layer(idx, seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    return DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN, device=device, **kw)


def make_runtime(idx, device="cpu", cc=CC):
    mgr = KVCacheManager(CFG, [idx], cc, device=device)
    return mgr, StepMetadataBuilder(mgr, device=device)


def cache_bytes(mgr):
    return [t.clone() for c in mgr.caches for t in c.tensors()]


def dsv4_ops(op_list: str) -> str:
    return "\n".join(line for line in op_list.splitlines() if "dsv4." in line)


@functools.lru_cache(maxsize=None)
def compiled(idx, **layer_kw):
    """(layer, cache manager, builder, compiled step, pass manager, final graphs, graph breaks) of one
    layer compiled on a 40 + 25 token prefill of two requests; the pass manager records op lists."""
    layer = make_layer(idx, **layer_kw)
    fmt = layer_kw.get("indexer_fmt", CC.indexer_fmt)
    mgr, builder = make_runtime(idx, cc=dataclasses.replace(CC, indexer_fmt=fmt))
    pm = DSV4PassManager(record=True)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]),
                        options={"post_grad_custom_post_pass": pm, "fx_graph_cache": False})
    for r in ("a", "b"):
        mgr.add_request(r)
    x = torch.randn(65, CFG.hidden_size).bfloat16()
    counters.clear()
    with capture_final_graphs() as graphs:
        step(x, builder.build([("a", 40), ("b", 25)]))
    return layer, mgr, builder, step, pm, graphs, dict(counters["graph_break"])


@pytest.mark.parametrize("idx", sorted(LAYER_TYPES), ids=LAYER_TYPES.get)
def test_fullgraph_no_breaks_and_graph_checks(idx):
    *_, graphs, breaks = compiled(idx)
    assert breaks == {}
    assert len(graphs) == 1
    for gm in graphs:  # no host-sync node, no clone / copy-back of any cache
        assert_graph_ok(gm.graph)


def fusions(idx, **layer_kw) -> str:
    snap = compiled(idx, **layer_kw)[4].snapshots[-1]
    return f"{snap.matches}\n{dsv4_ops(snap.after)}"


def test_fusions_swa():
    assert_expected_inline(fusions(0), """\
{'indexer_q': 0, 'compressor': 0, 'kv_rope_insert': 1, 'inv_rope_quant': 1, 'quant_cse': 0, 'fp8_linear': 0}
af2(dsv4.kv_rope_insert.default)
dsv4.swa_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default""")


def test_fusions_csa():
    assert_expected_inline(fusions(1), """\
{'indexer_q': 1, 'compressor': 2, 'kv_rope_insert': 1, 'inv_rope_quant': 1, 'quant_cse': 0, 'fp8_linear': 0}
af2(dsv4.kv_rope_insert.default)
dsv4.swa_indices.default
dsv4.linear_fp32.default
af2(dsv4.compressor_insert.default)
af2(dsv4.compressor_insert.default)
dsv4.indexer_q_rope_fp8.default
dsv4.indexer_topk.default
dsv4.global_topk_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default""")


def test_fusions_csa_mxfp4():
    """The MXFP4 indexer query fuses too: its weights are the fp32 weights_proj columns of the layer's
    fp32-out GEMM (no bf16 → fp32 convert to start the product from)."""
    assert_expected_inline(fusions(1, indexer_fmt="mxfp4"), """\
{'indexer_q': 1, 'compressor': 2, 'kv_rope_insert': 1, 'inv_rope_quant': 1, 'quant_cse': 0, 'fp8_linear': 0}
af2(dsv4.kv_rope_insert.default)
dsv4.swa_indices.default
dsv4.linear_fp32.default
af2(dsv4.compressor_insert.default)
af2(dsv4.compressor_insert.default)
dsv4.indexer_q_rope_mxfp4.default
dsv4.indexer_topk.default
dsv4.global_topk_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default""")


def test_fusions_hca():
    assert_expected_inline(fusions(2), """\
{'indexer_q': 0, 'compressor': 1, 'kv_rope_insert': 1, 'inv_rope_quant': 1, 'quant_cse': 0, 'fp8_linear': 0}
af2(dsv4.kv_rope_insert.default)
dsv4.swa_indices.default
dsv4.linear_fp32.default
af2(dsv4.compressor_insert.default)
dsv4.compressed_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default""")


# --- decode steps: one graph, compiled == eager, padding invisible ----------------------------------
class Twin:
    """Runs every step twice: through ``runner`` (decode batches padded to a capture size and copied
    into its persistent buffers, graph-replayed on CUDA) and through ``ref_step(x, meta)`` — the same
    compiled step called directly on a twin cache manager, with the same padded rows — and requires
    outputs and every cache byte to agree bit for bit.

    Why not eager, and why pad the twin: Inductor's fused RMSNorm reductions may round differently
    from eager (by a bf16 ulp now and then: that is what ``test_layer_reference`` bounds), and GEMMs
    are not batch-invariant, so a padded and an unpadded batch may round differently too."""

    def __init__(self, runner, ref_step, builder_b, device="cpu"):
        self.runner, self.ref_step, self.builder_b, self.device = runner, ref_step, builder_b, device
        self.live, self.next_id = [], 0

    @property
    def managers(self):
        return self.runner.builder.manager, self.builder_b.manager

    def step(self, x, batch):
        y = self.runner(x, batch)
        n = len(x)
        if self.runner.builder.is_decode(batch) or self.builder_b.is_decode(batch):
            rows = self.runner.padded_size(len(batch))
            xp = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
            xp[:n] = x
            ref = self.ref_step(xp, self.builder_b.build(batch, pad_to=rows))[:n]
        else:
            ref = self.ref_step(x, self.builder_b.build(batch))
        assert torch.equal(y, ref), f"{batch}: max |diff| {(y.float() - ref.float()).abs().max()}"
        return y

    def admit(self, rng, max_prefill=40):
        rid, self.next_id = f"r{self.next_id}", self.next_id + 1
        for m in self.managers:
            m.add_request(rid)
        n = rng.randint(1, max_prefill)
        self.step(torch.randn(n, CFG.hidden_size, device=self.device).bfloat16(), [(rid, n)])
        self.live.append(rid)

    def retire(self, rng):
        rid = self.live.pop(rng.randrange(len(self.live)))
        for m in self.managers:
            m.free_request(rid)

    def decode(self, rng):
        batch = [(r, 1) for r in rng.sample(self.live, rng.randint(1, len(self.live)))]
        return self.step(torch.randn(len(batch), CFG.hidden_size, device=self.device).bfloat16(), batch)

    def assert_caches_equal(self):
        for a, b in zip(*(cache_bytes(m) for m in self.managers)):
            assert torch.equal(a, b)


def test_100_decode_steps_one_graph_bit_exact():
    """The runner (padding, persistent buffers) == the compiled step called directly, bit for bit on
    outputs and every cache byte, over 100 decode steps of varying batch size and context; no
    recompile after the first decode step (prefill and decode share the one dynamic graph)."""
    layer = make_layer(1, seed=3)
    mgr, builder = make_runtime(1)
    mgr_b, builder_b = make_runtime(1)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    runner = DecodeGraphRunner(step, builder, CFG.hidden_size, capture_sizes=(1, 2, 4, 8))
    twin = Twin(runner, compile_step(lambda x, meta: layer(x, meta, mgr_b.caches[0])), builder_b)
    rng = random.Random(0)
    counters.clear()
    for _ in range(6):
        twin.admit(rng)
    twin.decode(rng)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2  # the runner's step and the twin's (same code, its own closure)
    for i in range(100):
        if i % 30 == 29:
            twin.retire(rng)
            twin.admit(rng)
        twin.decode(rng)
    assert counters["stats"]["unique_graphs"] == graphs, "a step recompiled"
    assert runner.stats["ungraphed_decode_steps"] == 101
    twin.assert_caches_equal()


def test_padding_rows_never_write():
    layer = make_layer(2, seed=4)
    mgr, builder = make_runtime(2)
    mgr.add_request("a")
    layer(torch.randn(30, CFG.hidden_size).bfloat16(), builder.build([("a", 30)]), mgr.caches[0])
    before = cache_bytes(mgr)
    y = layer(torch.randn(8, CFG.hidden_size).bfloat16(), builder.pad_only(8), mgr.caches[0])
    assert torch.equal(y, torch.zeros_like(y))  # nothing to attend to: 0 before and after wo
    for a, b in zip(before, cache_bytes(mgr)):
        assert torch.equal(a, b)


# --- bad input: ValueError on the host, before anything changes ---------------------------------
def test_unsupported_configs():
    with pytest.raises(ValueError, match="compress_ratios may only hold 0, 4 or 128"):
        dataclasses.replace(CFG, compress_ratios=(0, 2, 128, 0))
    with pytest.raises(ValueError, match="n_local_heads"):
        DeepseekV4Attention(CFG, 0, n_local_heads=1)  # the tiny config has 2 heads per output group
    with pytest.raises(ValueError, match="head_offset"):
        DeepseekV4Attention(CFG, 0, n_local_heads=2, head_offset=4)
    with pytest.raises(ValueError, match="layer_idx"):
        DeepseekV4Attention(CFG, 9)
    with pytest.raises(ValueError, match="bf16"):
        DeepseekV4Attention(CFG, 0, dtype=torch.float16)
    with pytest.raises(ValueError, match="max_model_len"):
        DeepseekV4Attention(CFG, 0, max_model_len=CFG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="capture_sizes"):
        mgr, builder = make_runtime(1)
        DecodeGraphRunner(lambda x, m: x, builder, CFG.hidden_size, capture_sizes=(1, 16))  # > max_num_seqs


def _state(mgr, builder):
    return (mgr.used_tokens, {r: q.num_tokens for r, q in mgr.requests.items()}, builder.tokens.clone(),
            cache_bytes(mgr))


def _assert_state(before, after):
    assert before[:2] == after[:2]
    assert torch.equal(before[2], after[2])
    for a, b in zip(before[3], after[3]):
        assert torch.equal(a, b)


def test_bad_batches_raise_before_anything_changes():
    cc = CacheConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, token_budget=80)
    layer = make_layer(1)
    mgr, builder = make_runtime(1, cc=cc)
    runner = DecodeGraphRunner(lambda x, meta: layer(x, meta, mgr.caches[0]), builder, CFG.hidden_size,
                               capture_sizes=(1, 2))
    for r in "abc":
        mgr.add_request(r)
    runner(torch.randn(40, CFG.hidden_size).bfloat16(), [("a", 40)])
    runner(torch.randn(30, CFG.hidden_size).bfloat16(), [("b", 30)])
    runner(torch.randn(5, CFG.hidden_size).bfloat16(), [("c", 5)])
    before = _state(mgr, builder)
    cases = [
        ([("c", 20)], "token budget"),  # 95 > 80 cached tokens
        ([("a", 30)], "max_model_len"),  # position 69 is past the 64-row RoPE table
        ([("a", 1), ("b", 1), ("c", 1)], "larger than the largest capture size"),
        ([("c", 49)], "max_num_batched_tokens"),
        ([("zz", 1)], "not live"),
        ([("a", 1), ("a", 1)], "twice"),
        ([("a", 0), ("b", 2)], "positive int"),
    ]
    for batch, match in cases:
        n = sum(k for _, k in batch)
        with pytest.raises(ValueError, match=match):
            runner(torch.randn(n, CFG.hidden_size).bfloat16(), batch)
        _assert_state(before, _state(mgr, builder))
    with pytest.raises(ValueError, match="rows but the batch schedules"):
        runner(torch.randn(3, CFG.hidden_size).bfloat16(), [("a", 1)])
    with pytest.raises(ValueError, match="already live"):
        mgr.add_request("a")
    _assert_state(before, _state(mgr, builder))


# --- checkpoint loading -------------------------------------------------------------------------
def _fp8_blocks(w):
    """(e4m3 weight, fp32 power-of-two scale per 128x128 block) with w ≈ q · s."""
    out, inp = w.shape
    blocks = torch.nn.functional.pad(w.float(), (0, -inp % 128, 0, -out % 128)).unflatten(0, (-1, 128)).unflatten(
        2, (-1, 128))
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    full = s.repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inp]
    return (w.float() / full).to(torch.float8_e4m3fn), s


def test_load_fp8_checkpoint_and_head_shard():
    full = make_layer(1, seed=5)
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    fp8_names = ["wq_a", "wq_b", "wkv", "wo_a", "wo_b", "indexer.wq_b"]
    for name in fp8_names:
        q, s = _fp8_blocks(sd[f"{name}.weight"])
        sd[f"{name}.weight"], sd[f"{name}.scale"] = q, s
    loaded = make_layer(1, seed=6)
    loaded.load_state_dict(sd)  # strict: every checkpoint name has a parameter
    for name in fp8_names:
        want = dequant_fp8_weight(sd[f"{name}.weight"], sd[f"{name}.scale"])
        assert torch.equal(loaded.get_parameter(f"{name}.weight"), want)
        # the block scales reproduce the bf16 weights to FP8 precision
        err = (want.float() - full.get_parameter(f"{name}.weight").float()).abs().max()
        assert err <= full.get_parameter(f"{name}.weight").float().abs().max() / 8
    assert torch.equal(loaded.compressor.ape, full.compressor.ape)
    # the checkpoint-named weights are views of the fused projections the forward uses, after a load
    # and after anything that converts parameters one by one (what .to() / .cuda() do)
    for layer in (loaded, loaded._apply(lambda t: t.clone())):
        ql, d = CFG.q_lora_rank, CFG.head_dim
        assert layer.wq_a.weight.data_ptr() == layer.x_proj.data_ptr()
        assert torch.equal(layer.x_proj[:ql], layer.wq_a.weight) and torch.equal(layer.x_proj[ql:ql + d], layer.wkv.weight)
        assert layer.x_proj.shape[0] == ql + d
        # the fp32-out GEMM: the indexer's weights_proj, then the compressors' [wkv | wgate], the indexer's last
        n = CFG.index_n_heads
        assert torch.equal(layer.comp_proj[:n], layer.indexer.weights_proj.weight)
        w = layer.compressor.wkv.weight.shape[0]
        assert torch.equal(layer.comp_proj[n + w:n + 2 * w], layer.compressor.wgate.weight)
        assert torch.equal(layer.comp_proj[n + 2 * w:], torch.cat([layer.indexer.compressor.wkv.weight,
                                                                    layer.indexer.compressor.wgate.weight]))
        # wq_b and the indexer's wq_b: one projection of qr
        hd = layer.wq_b.weight.shape[0]
        assert layer.wq_b.weight.data_ptr() == layer.q_proj.data_ptr()
        assert torch.equal(layer.q_proj[hd:], layer.indexer.wq_b.weight)
    assert torch.equal(loaded.x_proj[:CFG.q_lora_rank], dequant_fp8_weight(sd["wq_a.weight"], sd["wq_a.scale"]))

    # a head shard (heads 2..3 = output group 1) slices the full checkpoint on load
    shard = DeepseekV4Attention(CFG, 1, n_local_heads=2, head_offset=2, max_model_len=MAX_LEN)
    shard.load_state_dict(full.state_dict())
    d, r = CFG.head_dim, CFG.o_lora_rank
    assert torch.equal(shard.wq_b.weight, full.wq_b.weight[2 * d:4 * d])
    assert torch.equal(shard.wo_a.weight, full.wo_a.weight[r:2 * r])
    assert torch.equal(shard.wo_b.weight, full.wo_b.weight[:, r:2 * r])
    assert torch.equal(shard.attn_sink, full.attn_sink[2:4])
    assert torch.equal(shard.indexer.wq_b.weight, full.indexer.wq_b.weight)  # replicated
    with pytest.raises(ValueError, match="block scale"):
        bad = dict(sd)
        bad["wkv.scale"] = bad["wkv.scale"][:1]
        make_layer(1).load_state_dict(bad)


def test_example_runs_on_cpu():
    """``examples/run_layer.py`` with no arguments: the tiny CSA layer, 100-token prefill, 20 decode
    steps through the compiled layer, one graph, no graph breaks."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(root, "examples", "run_layer.py")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "graph breaks: 0" in res.stdout and "graphs compiled: 1" in res.stdout, res.stdout
    assert "finite: True" in res.stdout


# --- review regressions ---------------------------------------------------------------------------
def test_compressed_slots_when_max_model_len_is_not_a_multiple_of_the_ratio():
    # 300 tokens hold C128 entries 0 and 1 (one table column of 2 entries); tokens 256..299 have
    # p // 128 = 2, past the table, but close nothing: they must not be looked up (was an IndexError)
    cc = CacheConfig(max_num_seqs=2, max_model_len=300, max_num_batched_tokens=256, token_budget=600)
    layer = make_layer(2)
    mgr, builder = make_runtime(2, cc=cc)
    mgr.add_request("a")
    layer(torch.randn(256, CFG.hidden_size).bfloat16(), builder.build([("a", 256)]), mgr.caches[0])
    meta = builder.build([("a", 44)])
    assert int(meta.c128.slot_mapping[(meta.positions + 1) % 128 != 0].max()) == -1
    assert int(meta.c4.slot_mapping.max() if meta.c4 is not None else -1) == -1


def test_fused_projections_survive_deepcopy_reload_and_to_empty():
    import copy

    ref = make_layer(1, seed=7)
    sd = ref.state_dict()
    twin = copy.deepcopy(ref)
    twin.wq_a.weight.mul_(0)  # the views still share the fused buffer after deepcopy
    assert not twin.x_proj[:CFG.q_lora_rank].any()
    ptr = twin.x_proj.data_ptr()
    twin.load_state_dict(sd)  # in-place reload: same buffer (captured graphs stay valid)
    assert twin.x_proj.data_ptr() == ptr and torch.equal(twin.x_proj, ref.x_proj)
    meta_layer = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, device="meta")
    meta_layer.to_empty(device="cpu")
    meta_layer.load_state_dict(sd)
    assert torch.equal(meta_layer.cos_sin_cache, ref.cos_sin_cache)  # the non-persistent table is rebuilt
    assert torch.equal(meta_layer.x_proj, ref.x_proj) and torch.equal(meta_layer.comp_proj, ref.comp_proj)
    assert torch.equal(meta_layer.q_proj, ref.q_proj)


def test_runtime_input_checks():
    with pytest.raises(ValueError, match="layer_ids"):
        KVCacheManager(CFG, [99], CC)
    mgr, builder = make_runtime(1, cc=dataclasses.replace(CC, max_chunk_tokens=32))
    with pytest.raises(ValueError, match="not live"):
        mgr.free_request("nope")
    mgr.add_request("a")
    with pytest.raises(ValueError, match="max_chunk_tokens"):
        builder.build([("a", 33)])
    assert mgr.requests["a"].num_tokens == 0
    small = CacheConfig(max_num_seqs=3, max_model_len=MAX_LEN, max_num_batched_tokens=160, token_budget=4096)
    m2, b2 = make_runtime(1, cc=small)
    assert DecodeGraphRunner(lambda x, meta: x, b2, CFG.hidden_size).capture_sizes == [1, 2, 3]
    layer = make_layer(0)
    with pytest.raises(ValueError, match="token rows"):
        m2.add_request("a")
        layer(torch.randn(3, CFG.hidden_size).bfloat16(), b2.build([("a", 2)]), m2.caches[0])


def test_dtype_conversion_keeps_the_fp32_tensors_exact():
    ref = make_layer(1, seed=8)
    conv = make_layer(1, seed=8).to(torch.float16)
    for name in ("attn_sink", "cos_sin_cache", "compressor.ape", "indexer.compressor.ape"):
        a, b = ref.get_parameter(name) if "cache" not in name else ref.cos_sin_cache, (
            conv.get_parameter(name) if "cache" not in name else conv.cos_sin_cache)
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    assert conv.wq_b.weight.dtype == torch.float16 and conv.x_proj.dtype == torch.float16
    assert conv.wq_a.weight.data_ptr() == conv.x_proj.data_ptr()


def test_fp8_checkpoint_scale_names_dtypes_and_missing_scales():
    """The reported inputs: an e4m3 weight with no scale under a strict load, and an HF-format
    ``weight_scale_inv`` key, used to load raw e4m3 values silently. Every FP8 weight now needs its
    scale under one of the two names, fp32 or e8m0, of the right shape (ValueError naming the key);
    the expected weights come from float64 math on the blocks."""
    full = make_layer(1, seed=5)
    sd = {k: v.clone() for k, v in full.state_dict().items()}
    q, s = _fp8_blocks(sd["wq_b.weight"])
    out, inp = q.shape
    want = (q.double() * s.double().repeat_interleave(128, 0)[:out].repeat_interleave(128, 1)[:, :inp]).bfloat16()

    for name, scale in ((".scale", s), (".weight_scale_inv", s), (".scale", s.to(torch.float8_e8m0fnu)),
                        (".weight_scale_inv", s.to(torch.float8_e8m0fnu))):
        layer = make_layer(1, seed=6)
        layer.load_state_dict({**sd, "wq_b.weight": q, f"wq_b{name}": scale})
        assert torch.equal(layer.wq_b.weight, want), name

    cases = [
        ({"wq_b.weight": q}, r"wq_b.weight is float8_e4m3fn but the state dict has no block scale .*wq_b.scale "
                              r"or wq_b.weight_scale_inv"),
        ({"wq_b.weight": q, "wq_b.scale": s[:1]}, r"wq_b.scale: the block scale of a \[.*\] weight must be"),
        ({"wq_b.weight": q, "wq_b.scale": s.half()}, r"wq_b.scale: the block scale must be float32 or"),
        ({"wq_b.weight": q, "wq_b.scale": s, "wq_b.weight_scale_inv": s}, "two block scales"),
        ({"wq_b.scale": s}, r"wq_b.scale: a block scale needs an FP8 weight"),
    ]
    for override, msg in cases:
        for strict in (True, False):
            with pytest.raises(ValueError, match=msg):
                make_layer(1).load_state_dict({**sd, **override}, strict=strict)
    stray = {k: v for k, v in sd.items() if k != "wq_b.weight"}
    with pytest.raises(ValueError, match="wq_b.weight_scale_inv is a block scale without its FP8 weight"):
        make_layer(1).load_state_dict({**stray, "wq_b.weight_scale_inv": s}, strict=False)


def _expected_rows(mgr, batch, starts, rows):
    """The builder's seven host rows for ``batch``, token by token in plain Python from the manager's
    block tables (read after the step's pages were allocated): position, request row, SWA slot, then
    per ratio the compressed slot of the entry a token closes and its compressor-state slot."""
    def slot(kind, row, idx):
        k, table = mgr.kinds[kind], mgr.tables[kind]
        col = idx // k.block_size
        page = int(table[row, col]) if col < table.shape[1] else -1
        return page * k.block_size + idx % k.block_size if page >= 0 else -1

    out = [[0] * rows] + [[-1] * rows for _ in range(6)]
    t = 0
    for (rid, n), start in zip(batch, starts):
        row = mgr.requests[rid].row
        for p in range(start, start + n):
            out[1][t], out[0][t], out[2][t] = row, p, slot("swa", row, p)
            for r in mgr.ratios:
                k = 3 if r == 4 else 5
                out[k][t] = slot(f"c{r}", row, p // r) if (p + 1) % r == 0 else -1
                out[k + 1][t] = slot(f"c{r}_state", row, p)
            t += 1
    return out


@pytest.mark.parametrize("seed", range(3))
def test_builder_rows_match_a_token_by_token_computation(seed):
    """StepMetadataBuilder's vectorized index math (NumPy) against a scalar recomputation, over random
    schedules with admissions, retirements, prefill chunks, decodes and padding rows (every ratio:
    the stack of all three layer types)."""
    rng = random.Random(seed)
    cc = CacheConfig(max_num_seqs=5, max_model_len=300, max_num_batched_tokens=96, token_budget=1200,
                     max_chunk_tokens=48)
    mgr = KVCacheManager(CFG, [0, 1, 2], cc)
    builder = StepMetadataBuilder(mgr)
    live, next_id = [], 0
    for _ in range(60):
        if live and rng.random() < 0.1:
            mgr.free_request(live.pop(rng.randrange(len(live))))
        if len(live) < cc.max_num_seqs and rng.random() < 0.4:
            mgr.add_request(next_id)
            live.append(next_id)
            next_id += 1
        batch, budget = [], cc.max_num_batched_tokens
        cached = cc.token_budget - mgr.used_tokens
        for rid in rng.sample(live, len(live)):
            room = cc.max_model_len - mgr.requests[rid].num_tokens
            n = min(rng.choice([1, 1, rng.randint(1, cc.max_chunk_tokens)]), budget, room, cached)
            if n >= 1:
                batch.append((rid, n))
                budget -= n
                cached -= n
        n_tok = sum(n for _, n in batch)
        rows = n_tok + rng.randint(0, cc.max_num_batched_tokens - n_tok)
        starts = [mgr.requests[rid].num_tokens for rid, _ in batch]
        meta = builder.build(batch, pad_to=rows)
        assert meta.positions.shape[0] == rows
        assert builder.host[:, :rows].tolist() == _expected_rows(mgr, batch, starts, rows)
        assert torch.equal(builder.tokens[:, :rows], builder.host[:, :rows])
        for name, table in mgr.tables.items():
            assert torch.equal(builder.tables[name], table), name
        for rid in [r for r in live if mgr.requests[r].num_tokens >= cc.max_model_len or rng.random() < 0.02]:
            mgr.free_request(rid)  # full requests retire (and a few others)
            live.remove(rid)

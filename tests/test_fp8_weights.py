"""``DeepseekV4Attention(weight_format=...)`` with an FP8 checkpoint (issue 15, the model part, CPU):
the FP8 projections stay e4m3 + fp32 block scales and run through ``fp8_block_gemm``; the layer
against the same layer with the weights dequantized to bf16 (the documented bound), compiled ==
eager with one graph and no graph break, the final graph's op list (expecttest), state dict round
trips, a bf16 load turning the layer back, head-shard slicing of weights and scales, ``.to()`` and
deepcopy keeping the FP8 bytes, and ValueErrors."""

import copy
import dataclasses

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.utils import counters

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager, PassConfig
from dsv4_compile.lowerings.checks import assert_graph_ok, capture_final_graphs
from dsv4_compile.model import DeepseekV4Attention, dequant_fp8_weight
from dsv4_compile.model.attention import FP8_LINEARS
from dsv4_compile.model.fp8 import quantize_weight
from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

# o_lora_rank 128: each output group's wo_a rows are whole 128-row weight blocks (the FP8 GEMM's unit)
CFG = dataclasses.replace(DSv4AttentionConfig.tiny(), o_lora_rank=128)
MAX_LEN = 512
CC = CacheConfig(max_num_seqs=4, max_model_len=MAX_LEN, max_num_batched_tokens=160, token_budget=2048)
E4M3 = torch.float8_e4m3fn


def fp8_checkpoint(layer, scale_name=".scale", e8m0=False):
    """``layer``'s state dict with the ``FP8_LINEARS`` weights quantized (``model.fp8.quantize_weight``),
    their scales named ``scale_name``, as fp32 or ``float8_e8m0fnu``."""
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    for name in FP8_LINEARS:
        if f"{name}.weight" in sd:
            q, s = quantize_weight(sd[f"{name}.weight"])
            sd[f"{name}.weight"], sd[name + scale_name] = q, (s.to(torch.float8_e8m0fnu) if e8m0 else s)
    return sd


def layers(idx, **kw):
    torch.manual_seed(idx)
    src = DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN)
    sd = fp8_checkpoint(src)
    fp8 = DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN, weight_format="fp8", **kw)
    fp8.load_state_dict(sd)
    bf16 = DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN, weight_format="bf16", **kw)
    bf16.load_state_dict(sd)
    return fp8, bf16, sd


def run(layer, make_step=None, seed=0):
    """Outputs of a prefill (two requests) then a decode step, on fresh caches; ``make_step(mgr)``
    gives the step (default: the layer, eager)."""
    mgr = KVCacheManager(CFG, [layer.layer_idx], CC)
    b = StepMetadataBuilder(mgr)
    for r in ("a", "b"):
        mgr.add_request(r)
    g = torch.Generator().manual_seed(seed)
    fn = make_step(mgr) if make_step else (lambda x, meta: layer(x, meta, mgr.caches[0]))
    outs = []
    for batch in ([("a", 70), ("b", 9)], [("a", 1), ("b", 1)]):
        x = torch.randn(sum(n for _, n in batch), CFG.hidden_size, generator=g).bfloat16()
        outs.append(fn(x, b.build(batch)))
    return outs, mgr


@pytest.mark.parametrize("idx", [0, 1, 2], ids=["swa", "csa", "hca"])
def test_fp8_layer_against_the_dequantized_bf16_layer(idx):
    fp8, bf16, _ = layers(idx)
    for name in FP8_LINEARS:
        if name.startswith("indexer.") and fp8.indexer is None:
            continue
        lin = fp8.get_submodule(name)
        assert lin.weight.dtype == E4M3 and lin.scale.dtype == torch.float32, name
        assert torch.equal(dequant_fp8_weight(lin.weight, lin.scale), bf16.get_submodule(name).weight), name
    a, _ = run(fp8)
    b, _ = run(bf16)
    for y, ref in zip(a, b):
        rel = (y.float() - ref.float()).norm() / ref.float().norm()
        # the activation quantization of four to six projections (docs/numerics.md §4.5): about 2^-5
        # each; the top-k choice of CSA may also move an entry across the cut
        assert rel < 0.1, rel


def compiled_run(layer, config=None):
    """``run`` through ``compile_step`` with a recording pass manager: (outputs, cache manager, pass
    manager, the final graph), after checking one Dynamo graph, no graph break and ``assert_graph_ok``."""
    torch._dynamo.reset()
    counters.clear()
    pm = DSV4PassManager(config, record=True)
    with capture_final_graphs() as graphs:
        outs, mgr = run(layer, lambda mgr: compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]),
                                                        options={"post_grad_custom_post_pass": pm}))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert_graph_ok(graphs[-1].graph)
    return outs, mgr, pm, graphs[-1]


def dsv4_ops(gm) -> str:
    return "\n".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("dsv4."))


def test_compiled_equals_eager_one_graph_and_op_list(no_compile_cache):
    fp8, _, _ = layers(1)
    eager, _ = run(fp8)
    outs, _, pm, gm = compiled_run(fp8)
    for y, ref in zip(outs, eager):
        assert (y.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()
    # every pass still fires with FP8 weights (the output-path fusion feeds the FP8 wo_a directly)
    # (no quant to merge: wq_b and the indexer's wq_b are one GEMM of qr, its output quantized once)
    assert dict(pm.snapshots[-1].matches) == {"compressor": 2, "indexer_q": 1, "inv_rope_quant": 1, "kv_rope_insert": 1,
                                              "fp8_linear": 3, "quant_cse": 0}
    assert_expected_inline(dsv4_ops(gm), """\
dsv4.fp8_linear.default
dsv4.kv_rope_insert.default
dsv4.swa_indices.default
dsv4.linear_fp32.default
dsv4.compressor_insert.default
dsv4.compressor_insert.default
dsv4.fp8_linear.default
dsv4.indexer_q_rope_fp8.default
dsv4.indexer_topk.default
dsv4.global_topk_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default
dsv4.fp8_block_gemm.default
dsv4.fp8_linear.default""")


def test_fp8_linear_pass_is_bit_exact_and_drops_the_activation_quants(no_compile_cache):
    """``PassConfig.fp8_linear``: every ``fp8_block_quant`` feeding 2-D FP8 GEMMs becomes part of one
    ``fp8_linear`` per GEMM (the grouped ``wo_a`` keeps the fused output quant's FP8 ``o``); the step
    is bit for bit the one without the pass (outputs and every cache byte), one graph, no break."""
    fp8, _, _ = layers(1)
    plain, fused = (compiled_run(fp8, PassConfig(fp8_linear=on)) for on in (False, True))
    for a, b in zip(plain[0] + [t for c in plain[1].caches for t in c.tensors()],
                    fused[0] + [t for c in fused[1].caches for t in c.tensors()]):
        assert torch.equal(a, b)
    assert fused[2].snapshots[-1].matches["fp8_linear"] == 3
    assert_expected_inline(dsv4_ops(fused[3]), """\
dsv4.fp8_linear.default
dsv4.kv_rope_insert.default
dsv4.swa_indices.default
dsv4.linear_fp32.default
dsv4.compressor_insert.default
dsv4.compressor_insert.default
dsv4.fp8_linear.default
dsv4.indexer_q_rope_fp8.default
dsv4.indexer_topk.default
dsv4.global_topk_indices.default
dsv4.rope.default
dsv4.sparse_attn.default
dsv4.inv_rope_fp8_quant.default
dsv4.fp8_block_gemm.default
dsv4.fp8_linear.default""")


def test_state_dict_round_trip_scale_names_and_bf16_load_back():
    fp8, bf16, sd = layers(1)
    out = fp8.state_dict()
    for name in FP8_LINEARS:  # DeepSeek's names: the FP8 weight and its fp32 scale
        assert out[f"{name}.weight"].dtype == E4M3 and out[f"{name}.scale"].dtype == torch.float32
    again = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, weight_format="fp8")
    again.load_state_dict(out)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a, b.view(torch.uint8) if b.dtype == E4M3 else b)
               for a, b in zip(again.state_dict().values(), out.values()))
    # HF names and e8m0 scales load to the same bytes
    hf = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, weight_format="fp8")
    torch.manual_seed(1)
    src = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN)
    hf.load_state_dict(fp8_checkpoint(src, ".weight_scale_inv", e8m0=True))
    assert torch.equal(hf.wq_b.weight.view(torch.uint8), fp8.wq_b.weight.view(torch.uint8))
    assert torch.equal(hf.wq_b.scale, fp8.wq_b.scale)
    # a bf16 state dict turns the FP8 projections back into bf16 ones (strict: no scale keys left)
    fp8.load_state_dict(bf16.state_dict())
    assert fp8.wq_b.weight.dtype == torch.bfloat16 and not hasattr(fp8.wq_b, "scale")
    assert torch.equal(fp8.x_proj, bf16.x_proj) and fp8.x_proj_fp8 is None
    a, _ = run(fp8)
    b, _ = run(bf16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # auto on the CPU: bf16 (FP8 is its default on GPUs with FP8 tensor cores: test_model_cuda)
    auto = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN)
    auto.load_state_dict(sd)
    assert auto.wq_b.weight.dtype == torch.bfloat16


def test_fused_views_to_and_deepcopy_keep_the_fp8_bytes():
    fp8, _, _ = layers(1)
    ql = CFG.q_lora_rank
    assert fp8.x_proj_fp8.dtype == E4M3 and fp8.wq_a.weight.data_ptr() == fp8.x_proj_fp8.data_ptr()
    assert torch.equal(fp8.x_proj_fp8_scale[: ql // 128], fp8.wq_a.scale)
    # no bf16 GEMM of x left: the indexer's weights_proj heads the compressors' fp32-out GEMM
    assert fp8.x_proj is None and torch.equal(fp8.comp_proj[: CFG.index_n_heads], fp8.indexer.weights_proj.weight)
    # wq_b and the indexer's wq_b: one FP8 GEMM of qr, their block scales fused the same way
    hd = fp8.wq_b.weight.shape[0]
    assert fp8.q_proj.dtype == E4M3 and fp8.wq_b.weight.data_ptr() == fp8.q_proj.data_ptr()
    assert torch.equal(fp8.q_proj_scale[hd // 128:], fp8.indexer.wq_b.scale)
    ref, _ = run(fp8)
    for other in (fp8.to(torch.bfloat16), copy.deepcopy(fp8), fp8._apply(lambda t: t.clone())):
        assert other.wq_b.weight.dtype == E4M3 and other.wq_b.scale.dtype == torch.float32
        assert other.wq_a.weight.data_ptr() == other.x_proj_fp8.data_ptr()
        assert other.indexer.wq_b.scale.data_ptr() == other.q_proj_scale[hd // 128:].data_ptr()
        got, _ = run(other)
        assert all(torch.equal(x, y) for x, y in zip(got, ref))


def test_head_shard_slices_fp8_weights_and_scales():
    """Heads 8..15 of 16 (output group 1 of 2, 8 heads each): the shard's FP8 weights and scales are
    the matching rows / columns of the full checkpoint's."""
    cfg = dataclasses.replace(CFG, num_attention_heads=16, o_groups=2)
    torch.manual_seed(3)
    full = DeepseekV4Attention(cfg, 0, max_model_len=MAX_LEN)
    sd = fp8_checkpoint(full)
    shard = DeepseekV4Attention(cfg, 0, n_local_heads=8, head_offset=8, max_model_len=MAX_LEN, weight_format="fp8")
    shard.load_state_dict(sd)
    d, r = cfg.head_dim, cfg.o_lora_rank
    u8 = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(u8(shard.wq_b.weight), u8(sd["wq_b.weight"][8 * d:16 * d]))
    assert torch.equal(shard.wq_b.scale, sd["wq_b.scale"][8 * d // 128:16 * d // 128])
    assert torch.equal(u8(shard.wo_a.weight), u8(sd["wo_a.weight"][r:2 * r]))
    assert torch.equal(shard.wo_a.scale, sd["wo_a.scale"][r // 128:2 * r // 128])
    assert torch.equal(u8(shard.wo_b.weight), u8(sd["wo_b.weight"][:, r:2 * r]))
    assert torch.equal(shard.wo_b.scale, sd["wo_b.scale"][:, r // 128:2 * r // 128])


def test_value_errors():
    with pytest.raises(ValueError, match="weight_format must be one of"):
        DeepseekV4Attention(CFG, 0, max_model_len=MAX_LEN, weight_format="int8")
    torch.manual_seed(0)
    tiny = DeepseekV4Attention(DSv4AttentionConfig.tiny(), 0, max_model_len=MAX_LEN, weight_format="fp8")
    sd = fp8_checkpoint(tiny)  # o_lora_rank 64: an output group splits a 128-row weight block
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(ValueError, match=r"wo_a.weight: weight_format='fp8' cannot keep it in FP8: o_lora_rank 64"):
        tiny.load_state_dict(sd)
    # the failed load changed nothing: same tensors, same formats, and the layer still runs
    after = tiny.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert tiny.wq_a.weight.dtype == torch.bfloat16 and tiny.x_proj_fp8 is None
    mgr = KVCacheManager(tiny.config, [0], CC)
    mgr.add_request("a")
    y = tiny(torch.randn(3, tiny.config.hidden_size).bfloat16(), StepMetadataBuilder(mgr).build([("a", 3)]),
             mgr.caches[0])
    assert y.isfinite().all()
    fp8, _, sd = layers(0)
    bad = dict(sd)
    bad["wq_b.scale"] = bad["wq_b.scale"][:1]
    with pytest.raises(ValueError, match="wq_b.scale: the block scale of a"):
        fp8.load_state_dict(bad)
    bad = dict(sd)
    del bad["wo_b.scale"]
    with pytest.raises(ValueError, match="wo_b.weight is float8_e4m3fn but the state dict has no block scale"):
        fp8.load_state_dict(bad)


def test_wq_a_rows_not_whole_blocks_are_not_kept_fp8():
    """wq_a / wkv share one FP8 GEMM with their block scales stacked: a q_lora_rank that is not a
    multiple of 128 would misalign wkv's scales, so "fp8" refuses it (naming the key) and "auto"
    dequantizes it (as the other weights the FP8 GEMM cannot take)."""
    cfg = dataclasses.replace(CFG, q_lora_rank=192)
    torch.manual_seed(0)
    sd = fp8_checkpoint(DeepseekV4Attention(cfg, 1, max_model_len=MAX_LEN))
    strict = DeepseekV4Attention(cfg, 1, max_model_len=MAX_LEN, weight_format="fp8")
    with pytest.raises(ValueError, match=r"wq_a.weight: weight_format='fp8' cannot keep it in FP8: its output width 192"):
        strict.load_state_dict(sd)


def test_q_proj_unfused_when_the_indexer_rows_are_not_whole_heads():
    """index_n_heads = 2 gives the indexer's wq_b 256 rows, not whole 512-wide main heads: wq_b and the
    indexer's wq_b stay two GEMMs, and the layer matches the dequantized bf16 layer as with 4 heads."""
    cfg = dataclasses.replace(CFG, index_n_heads=2)
    torch.manual_seed(1)
    src = DeepseekV4Attention(cfg, 1, max_model_len=MAX_LEN)
    sd = fp8_checkpoint(src)
    fp8 = DeepseekV4Attention(cfg, 1, max_model_len=MAX_LEN, weight_format="fp8")
    fp8.load_state_dict(sd)
    assert fp8.q_proj is None and fp8.q_proj_scale is None
    outs = []
    for layer in (fp8, src):
        mgr = KVCacheManager(cfg, [1], CC)
        mgr.add_request("a")
        x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
        outs.append(layer(x, StepMetadataBuilder(mgr).build([("a", 7)]), mgr.caches[0]).float())
    assert (outs[0] - outs[1]).norm() <= 0.1 * outs[1].norm()


def test_fused_output_quant_feeds_wo_a_without_a_copy(no_compile_cache):
    """The output-path fusion's FP8 o is group-major and its scales MN-major; the grouped wo_a GEMM
    reads them through their strides. The passes point every dsv4 call's recorded eager inputs at
    its current ones, so Inductor does not copy o back to the traced token-major layout."""
    fp8, _, _ = layers(1)
    _, _, _, gm = compiled_run(fp8)
    checked = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("dsv4.") and "eager_input_vals" in n.meta:
            eager = n.meta["eager_input_vals"][0]
            for a, e in zip(n.args, eager):
                if isinstance(a, torch.fx.Node) and isinstance(e, torch.Tensor):
                    assert str(a.meta["val"].stride()) == str(e.stride()), (n.name, a.name)
                    checked += 1
    assert checked > 10
    gemm = [n for n in gm.graph.nodes if n.target is torch.ops.dsv4.fp8_block_gemm.default]
    fed = [g for g in gemm if any(getattr(a, "args", (None,))[0] is not None and
                                  getattr(a.args[0], "target", None) is torch.ops.dsv4.inv_rope_fp8_quant.default
                                  for a in g.args[:1] if isinstance(a, torch.fx.Node))]
    assert len(fed) == 1  # wo_a reads the fused quant's output directly

"""DeepseekV4Attention on the GPU (``cuda`` marker): FULL_DECODE_ONLY graph replay == the compiled
step bit for bit over 200 random decode steps (all three layer types in one step), no host sync in a
warmed-up decode step, no recompiles, and a full-size V4-Flash CSA layer through the runner. Each
runs with bf16 weights and with an FP8 checkpoint kept FP8 (``weight_format="fp8"``)."""

import dataclasses
import random

import pytest
import torch
from torch._dynamo.utils import counters

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.model.attention import FP8_LINEARS
from dsv4_compile.model.fp8 import fp8_checkpoint
from dsv4_compile.runtime import CacheConfig, DecodeGraphRunner, KVCacheManager, StepMetadataBuilder, compile_step

from test_model_runtime import CFG, MAX_LEN, Twin

pytestmark = pytest.mark.cuda
DEV = "cuda"
CC = CacheConfig(max_num_seqs=8, max_model_len=MAX_LEN, max_num_batched_tokens=160, token_budget=4096)


def all_types_step(layers, caches):
    def step(x, meta):  # every layer type in one graph
        return sum(layer(x, meta, cache) for layer, cache in zip(layers, caches))
    return step


def make_layer(cfg, idx, weight_format, max_model_len=MAX_LEN):
    """A layer on the GPU; with ``weight_format="fp8"`` its bf16 init is quantized into an FP8
    checkpoint (e4m3 + fp32 128x128 block scales) and loaded, so the projections run FP8 GEMMs."""
    layer = DeepseekV4Attention(cfg, idx, max_model_len=max_model_len, device=DEV, weight_format=weight_format)
    if weight_format == "fp8":
        layer.load_state_dict(fp8_checkpoint(layer.state_dict(), FP8_LINEARS))
        assert layer.wq_b.weight.dtype == torch.float8_e4m3fn
    return layer


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def twin(request):
    torch.manual_seed(0)
    # FP8: o_lora_rank 128 so each wo_a output group is whole 128-row weight blocks
    cfg = CFG if request.param == "bf16" else dataclasses.replace(CFG, o_lora_rank=128)
    layers = [make_layer(cfg, i, request.param) for i in range(3)]
    mgr, mgr_b = (KVCacheManager(cfg, [0, 1, 2], CC, device=DEV) for _ in range(2))
    builder, builder_b = StepMetadataBuilder(mgr, DEV), StepMetadataBuilder(mgr_b, DEV)
    runner = DecodeGraphRunner(compile_step(all_types_step(layers, mgr.caches)), builder, cfg.hidden_size,
                               capture_sizes=(1, 2, 4, 8))
    t = Twin(runner, compile_step(all_types_step(layers, mgr_b.caches)), builder_b, device=DEV)
    return t


def test_graph_replay_equals_compiled_step_200_decode_steps(twin):
    rng = random.Random(1)
    for _ in range(6):
        twin.admit(rng, max_prefill=150)
    runner = twin.runner
    before = [t.clone() for c in runner.builder.manager.caches for t in vars(c).values() if t is not None]
    runner.capture()  # padding-only warm-up and capture never change a cache byte
    after = [t.clone() for c in runner.builder.manager.caches for t in vars(c).values() if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    counters.clear()
    for i in range(200):
        if i % 25 == 24:
            twin.retire(rng)
            twin.admit(rng, max_prefill=150)
        twin.decode(rng)
    assert runner.stats["replays"] == 200
    assert counters["stats"]["unique_graphs"] == 0, "a step recompiled"
    twin.assert_caches_equal()


def test_no_host_sync_in_a_warm_decode_step(twin):
    rng = random.Random(2)
    if len(twin.live) < 2:
        twin.admit(rng)
        twin.admit(rng)
    batch = [(r, 1) for r in twin.live[:3]]
    x = torch.randn(len(batch), CFG.hidden_size, device=DEV).bfloat16()
    twin.runner(x, batch)  # warm (captured)
    step_b = twin.ref_step
    meta = twin.builder_b.build(batch, pad_to=twin.runner.padded_size(len(batch)))
    xp = torch.zeros(meta.num_tokens, CFG.hidden_size, device=DEV, dtype=torch.bfloat16)
    step_b(xp, meta)  # warm (compiled)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        twin.runner(x, batch)  # metadata build + copies + replay
        step_b(xp, meta)  # the compiled step without a graph
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_auto_weight_format_keeps_fp8_on_the_gpu():
    """``weight_format="auto"`` (the default) on an FP8-capable GPU keeps the FP8 projections FP8; a
    weight the FP8 GEMM cannot take (the tiny config's o_lora_rank 64 splits a 128-row block of
    ``wo_a`` / ``wo_b``) is dequantized there instead of raising as ``"fp8"`` does."""
    torch.manual_seed(0)
    src = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, device=DEV)
    sd = fp8_checkpoint(src.state_dict(), FP8_LINEARS)
    auto = DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, device=DEV)
    auto.load_state_dict(sd)
    assert auto.wq_b.weight.dtype == auto.wkv.weight.dtype == torch.float8_e4m3fn
    assert auto.wo_a.weight.dtype == auto.wo_b.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot keep it in FP8"):
        DeepseekV4Attention(CFG, 1, max_model_len=MAX_LEN, device=DEV, weight_format="fp8").load_state_dict(sd)


@pytest.mark.parametrize("weight_format", ["bf16", "fp8"])
def test_flash_csa_layer_through_the_runner(weight_format):
    cfg = DSv4AttentionConfig.flash()
    layer_idx = cfg.compress_ratios.index(4)
    torch.manual_seed(0)
    layer = make_layer(cfg, layer_idx, weight_format, max_model_len=8192)
    cc = CacheConfig(max_num_seqs=4, max_model_len=8192, max_num_batched_tokens=2048, token_budget=16384)
    mgr = KVCacheManager(cfg, [layer_idx], cc, device=DEV)
    builder = StepMetadataBuilder(mgr, DEV)
    runner = DecodeGraphRunner(compile_step(lambda x, meta: layer(x, meta, mgr.caches[0])), builder,
                               cfg.hidden_size, capture_sizes=(1, 2, 4))
    mgr_e = KVCacheManager(cfg, [layer_idx], cc, device=DEV)
    builder_e = StepMetadataBuilder(mgr_e, DEV)
    for r, n in (("a", 2048), ("b", 700)):
        for m in (mgr, mgr_e):
            m.add_request(r)
        x = torch.randn(n, cfg.hidden_size, device=DEV).bfloat16()
        y, ref = runner(x, [(r, n)]), layer(x, builder_e.build([(r, n)]), mgr_e.caches[0])
        assert (y.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max()
    for _ in range(5):
        batch = [("a", 1), ("b", 1)]
        x = torch.randn(2, cfg.hidden_size, device=DEV).bfloat16()
        y = runner(x, batch).clone()
        ref = layer(x, builder_e.build(batch), mgr_e.caches[0])
        assert torch.isfinite(y).all()
        assert (y.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max()
    assert runner.stats["replays"] == 5

"""A zero-token step (an idle data-parallel attention rank) returns ``[0, hidden]`` and changes no
cache byte, in eager, compiled and runner paths, for every layer type (issue 12, item 4)."""

import pytest
import torch

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import (CacheConfig, DecodeGraphRunner, KVCacheManager, StepMetadataBuilder,
                                  compile_step)

CFG = DSv4AttentionConfig.tiny()
CC = CacheConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64, token_budget=1024)
LAYERS = {0: "swa", 1: "csa", 2: "hca"}


def _bytes(mgr):
    return [t.clone() for c in mgr.caches for t in c.tensors()]


@pytest.mark.parametrize("idx", sorted(LAYERS), ids=LAYERS.get)
def test_zero_token_step_eager_compiled_and_runner(idx):
    torch.manual_seed(0)
    layer = DeepseekV4Attention(CFG, idx, max_model_len=256)
    mgr = KVCacheManager(CFG, [idx], CC)
    b = StepMetadataBuilder(mgr)
    mgr.add_request("a")
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runner = DecodeGraphRunner(step, b, CFG.hidden_size)  # compiles on its padding-only probe step
    runner(torch.randn(9, CFG.hidden_size).bfloat16(), [("a", 9)])  # some cache content to keep
    before = _bytes(mgr)
    empty = torch.empty(0, CFG.hidden_size, dtype=torch.bfloat16)
    outs = [layer(empty, b.view(0), mgr.caches[0]), step(empty, b.build([])), runner(empty, [])]
    for y in outs:
        assert y.shape == (0, CFG.hidden_size) and y.dtype == torch.bfloat16
    for w, g in zip(before, _bytes(mgr), strict=True):
        assert torch.equal(w, g)
    # the step keeps working after an empty one, and T = 0 did not cost a second compile of T > 0
    y = runner(torch.randn(1, CFG.hidden_size).bfloat16(), [("a", 1)])
    assert y.shape == (1, CFG.hidden_size) and torch.isfinite(y.float()).all()
    assert counters["stats"]["unique_graphs"] == 1  # the probe's graph serves T = 9, 0 and 1


def test_missing_metadata_or_cache_is_a_value_error():
    layer = DeepseekV4Attention(CFG, 1, max_model_len=256)
    mgr = KVCacheManager(CFG, [1], CC)
    b = StepMetadataBuilder(mgr)
    x = torch.randn(2, CFG.hidden_size).bfloat16()
    with pytest.raises(ValueError, match="meta must be the StepMetadata"):
        layer(x, None, None)
    with pytest.raises(ValueError, match="cache must be this layer's LayerCache"):
        layer(x, b.view(2), None)
    swa_only = KVCacheManager(CFG, [0], CC).caches[0]
    with pytest.raises(ValueError, match=r"lacks \['compressed', 'compressor_state', 'indexer', 'indexer_state'\]"):
        layer(x, b.view(2), swa_only)


def test_dsv4_compile_of_a_layer_is_one_graph_for_every_token_count():
    """``dsv4_compile.compile(layer)`` traces token dims like ``compile_step`` (plain torch.compile
    compiled 3 graphs for T = 7, 1, 3), T = 0 included, and matches eager."""
    import dsv4_compile
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = DeepseekV4Attention(CFG, 2, max_model_len=256)
    mgr = KVCacheManager(CFG, [2], CC)
    twin = KVCacheManager(CFG, [2], CC)
    b, tb = StepMetadataBuilder(mgr), StepMetadataBuilder(twin)
    compiled = dsv4_compile.compile(layer)
    torch._dynamo.reset()
    counters.clear()
    for m in (mgr, twin):
        m.add_request("a")
    for t in (7, 1, 3, 0):
        x = torch.randn(t, CFG.hidden_size).bfloat16()
        batch = [("a", t)] if t else []
        assert torch.equal(compiled(x, b.build(batch), mgr.caches[0]), layer(x, tb.build(batch), twin.caches[0]))
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match="meta must be the StepMetadata"):  # a ValueError, not a graph break
        compiled(torch.randn(2, CFG.hidden_size).bfloat16(), None, mgr.caches[0])


def test_value_errors_raised_while_tracing_reach_the_caller():
    """Both kinds: a raise in the traced Python, and an op's own check on fake tensors."""
    import dsv4_compile
    from dsv4_compile.rope import cos_sin_cache

    cs = cos_sin_cache(64, 16, 1e4)

    def user_check(x, pos):
        if x.shape[-1] != 128:
            raise ValueError("x must be [..., 128]")
        return torch.ops.dsv4.rope(x, pos, cs)

    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\]"):
        dsv4_compile.compile(user_check)(torch.randn(2, 2, 64).bfloat16(), torch.arange(2))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="positions must be one of"):
        dsv4_compile.compile(user_check)(torch.randn(2, 2, 128).bfloat16(), torch.arange(2).float())

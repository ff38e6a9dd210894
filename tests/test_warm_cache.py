"""The fusion report and the graph checks work on a warm Inductor cache (issue 12, item 6): each
check runs twice, the second time against the cache the first one filled."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.lowerings.checks import assert_graph_ok, capture_final_graphs
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

CFG = DSv4AttentionConfig.tiny()
CC = CacheConfig(max_num_seqs=2, max_model_len=128, max_num_batched_tokens=32, token_budget=256)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A fresh on-disk Inductor cache, caches on (whatever the session set)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    prev = torch.compiler.config.force_disable_caches
    torch.compiler.config.force_disable_caches = False
    yield tmp_path
    torch.compiler.config.force_disable_caches = prev
    torch._dynamo.reset()


def _compile_once(record: bool, capture: bool):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = DeepseekV4Attention(CFG, 1, max_model_len=128)
    mgr = KVCacheManager(CFG, [1], CC)
    b = StepMetadataBuilder(mgr)
    pm = DSV4PassManager(record=record)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]), options={"post_grad_custom_post_pass": pm})
    mgr.add_request("a")
    x, meta = torch.randn(9, CFG.hidden_size).bfloat16(), b.build([("a", 9)])
    if not capture:
        step(x, meta)
        return pm, None
    with capture_final_graphs() as graphs:
        step(x, meta)
    return pm, graphs


@pytest.mark.parametrize("record", [True, False], ids=["recording", "plain"])
def test_report_and_graph_checks_hold_on_a_warm_cache(inductor_cache, record):
    from torch._dynamo.utils import counters

    _compile_once(record, capture=False)  # cold: fills the cache
    counters.clear()
    pm, _ = _compile_once(record, capture=False)  # warm
    if record:  # the recording pass manager opts out of the cache: its report is there on a warm one
        assert pm.snapshots and pm.snapshots[-1].matches["compressor"] == 2
        assert counters["inductor"]["fxgraph_cache_hit"] == 0
    else:  # the situation that emptied the report and the checks: a hit, the passes did not run
        assert counters["inductor"]["fxgraph_cache_hit"] > 0 and not pm.snapshots
    _, graphs = _compile_once(record, capture=True)  # the checks, with that warm cache in place
    assert graphs
    for gm in graphs:
        assert_graph_ok(gm.graph)
    assert any(inductor_cache.iterdir())


def test_capture_of_nothing_is_loud():
    f = torch.compile(lambda x: x + 1)
    f(torch.ones(2))
    with pytest.raises(AssertionError, match="no graph was lowered"):
        with capture_final_graphs():
            f(torch.ones(2))  # served by Dynamo's cache: nothing lowered


def test_indexer_q_example_runs_twice_on_one_cache(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, str(REPO / "examples" / "indexer_q.py")], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "indexer_q_rope_fp8" in out.stdout

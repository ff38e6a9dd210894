"""``CUDAGraphRunner`` in vLLM's ``FULL`` mode (issue 16): every batch — prefill chunks, mixed prefill +
decode, decode — padded to a token bucket and (on CUDA) replayed from a graph; padding rows write
nothing. On CPU the padded path runs without graphs (``cuda_graphs=False``), which tests the bucketing
and padding logic; the ``cuda`` tests replay graphs in both modes."""

import random

import pytest
import torch
from torch._dynamo.utils import counters

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import (CacheConfig, CUDAGraphRunner, KVCacheManager, StepMetadataBuilder, compile_step,
                                  default_token_buckets)

CFG = DSv4AttentionConfig.tiny()
CC = CacheConfig(max_num_seqs=6, max_model_len=512, max_num_batched_tokens=96, token_budget=2048,
                 max_chunk_tokens=48)


def test_default_token_buckets_cover_every_admitted_step():
    assert default_token_buckets(96) == [1, 2, 4, 8, 16, 32, 64, 96]
    assert default_token_buckets(2048) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert default_token_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_mode_and_sizes_are_checked():
    mgr = KVCacheManager(CFG, [0], CC)
    b = StepMetadataBuilder(mgr)
    with pytest.raises(ValueError, match="mode must be one of"):
        CUDAGraphRunner(lambda x, m: x, b, CFG.hidden_size, mode="PIECEWISE")
    with pytest.raises(ValueError, match=r"capture_sizes must be in \[1, 96\] \(max_num_batched_tokens\)"):
        CUDAGraphRunner(lambda x, m: x, b, CFG.hidden_size, mode="FULL", capture_sizes=(8, 128))
    r = CUDAGraphRunner(lambda x, m: x, b, CFG.hidden_size, mode="FULL", capture_sizes=(16, 4))
    mgr.add_request("a")
    assert r.bucket([("a", 3)]) == 4 and r.bucket([("a", 16)]) == 16 and r.bucket([("a", 17)]) is None
    assert r.bucket([]) is None


class Twin:
    """The runner vs the same compiled step called directly on a twin cache manager with the same
    padded rows: outputs and every cache byte must agree bit for bit."""

    def __init__(self, runner, ref_step, builder_b, device):
        self.runner, self.ref_step, self.builder_b, self.device = runner, ref_step, builder_b, device
        self.live, self.fresh, self.next_id = [], [], 0

    def managers(self):
        return self.runner.builder.manager, self.builder_b.manager

    def step(self, batch):
        n = sum(k for _, k in batch)
        x = torch.randn(n, CFG.hidden_size, device=self.device).bfloat16()
        rows = self.runner.bucket(batch, self.builder_b.is_decode(batch))  # before either manager moves
        y = self.runner(x, batch)
        if rows is None:
            ref = self.ref_step(x, self.builder_b.build(batch))
        else:
            xp = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
            xp[:n] = x
            ref = self.ref_step(xp, self.builder_b.build(batch, pad_to=rows))[:n]
        assert torch.equal(y, ref), f"{batch}: max |diff| {(y.float() - ref.float()).abs().max()}"

    def random_step(self, rng):
        """Admit or retire now and then; otherwise a batch of prefill chunks of new requests and
        decodes of old ones, within max_num_batched_tokens and max_chunk_tokens."""
        if self.live and rng.random() < 0.08:
            rid = self.live.pop(rng.randrange(len(self.live)))
            for m in self.managers():
                m.free_request(rid)
            return
        if len(self.live) + len(self.fresh) < CC.max_num_seqs and rng.random() < 0.3:
            rid, self.next_id = f"r{self.next_id}", self.next_id + 1
            for m in self.managers():
                m.add_request(rid)
            self.fresh.append(rid)
        budget, batch = CC.max_num_batched_tokens, []
        for rid in rng.sample(self.live, rng.randint(0, len(self.live))):
            batch.append((rid, 1))
            budget -= 1
        for rid in list(self.fresh):
            n = min(rng.randint(1, CC.max_chunk_tokens), budget)
            if n < 1:
                break
            batch.append((rid, n))
            budget -= n
            if rng.random() < 0.6:  # its prompt is done: decodes from now on (else another chunk)
                self.fresh.remove(rid)
                self.live.append(rid)
        if batch:
            self.step(batch)

    def assert_caches_equal(self):
        a, b = self.managers()
        for x, y in zip((t for c in a.caches for t in c.tensors()), (t for c in b.caches for t in c.tensors())):
            assert torch.equal(x, y)


def _twin(idx, device, mode, cuda_graphs, seed=0):
    torch.manual_seed(seed)
    layer = DeepseekV4Attention(CFG, idx, max_model_len=512, device=device)
    mgr, mgr_b = KVCacheManager(CFG, [idx], CC, device=device), KVCacheManager(CFG, [idx], CC, device=device)
    b, b_b = StepMetadataBuilder(mgr, device), StepMetadataBuilder(mgr_b, device)
    runner = CUDAGraphRunner(compile_step(lambda x, meta: layer(x, meta, mgr.caches[0])), b, CFG.hidden_size,
                             mode=mode, cuda_graphs=cuda_graphs)
    return Twin(runner, compile_step(lambda x, meta: layer(x, meta, mgr_b.caches[0])), b_b, device)


@pytest.mark.parametrize("idx", [0, 1, 2], ids=["swa", "csa", "hca"])
def test_full_mode_padded_mixed_schedules_bit_exact_no_recompile(idx):
    torch._dynamo.reset()
    counters.clear()
    twin = _twin(idx, "cpu", "FULL", cuda_graphs=False, seed=idx)
    rng = random.Random(idx)
    for _ in range(40):
        twin.random_step(rng)
    assert counters["stats"]["unique_graphs"] <= 2  # the runner's step and the twin's, nothing more
    stats = twin.runner.stats
    assert stats["ungraphed_prefill_or_mixed_steps"] > 5 and stats["ungraphed_decode_steps"] > 0
    twin.assert_caches_equal()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["FULL_DECODE_ONLY", "FULL"])
def test_cuda_graph_replay_matches_direct_step_over_200_mixed_schedules(mode):
    twin = _twin(1, "cuda", mode, cuda_graphs=True, seed=5)
    rng = random.Random(5)
    for _ in range(200):
        twin.random_step(rng)
    twin.assert_caches_equal()
    assert twin.runner.stats["replays"] > 0
    if mode == "FULL":
        assert twin.runner.stats["ungraphed_prefill_or_mixed_steps"] == 0  # every step had a bucket
        assert twin.runner.graph_memory_bytes > 0


@pytest.mark.cuda
def test_no_host_sync_or_recompile_in_a_warm_full_mode_mixed_step():
    """FULL mode: a mixed step (a prefill chunk of a new request + decodes of live ones) replays with no
    host sync (``set_sync_debug_mode("error")``) and no new graph once its bucket is captured."""
    torch._dynamo.reset()
    counters.clear()
    twin = _twin(1, "cuda", "FULL", cuda_graphs=True, seed=7)
    mgr_a, mgr_b = twin.managers()
    for rid, n in (("a", 40), ("b", 24)):
        for m in (mgr_a, mgr_b):
            m.add_request(rid)
        twin.step([(rid, n)])
    for m in (mgr_a, mgr_b):
        m.add_request("c")
    batch = [("a", 1), ("b", 1), ("c", 30)]
    x = torch.randn(32, CFG.hidden_size, device="cuda").bfloat16()
    twin.runner(x, batch)  # the 32-token bucket (captured by b's 24-token chunk): warm
    graphs = counters["stats"]["unique_graphs"]
    batch = [("a", 1), ("b", 1), ("c", 18)]  # the next chunk of c: 20 tokens, same 32-token bucket
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        twin.runner(x[:20], batch)  # metadata build + copies + replay
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] == graphs, "a warm FULL-mode step recompiled"
    assert twin.runner.stats["ungraphed_prefill_or_mixed_steps"] == 0

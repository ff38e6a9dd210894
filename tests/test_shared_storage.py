"""Caches carved out of one storage (vLLM's layout) compile with no clone or copy-back of any cache
byte, give the bytes and outputs of separate caches, and overlapping caches are refused (issue 12,
item 5). The check runs on the final post-grad graph and on the generated code, cold and warm."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.lowerings import DSV4PassManager
from dsv4_compile.lowerings.checks import assert_graph_ok, capture_final_graphs
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

CFG = DSv4AttentionConfig.tiny()
CC = CacheConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64, token_budget=1024)
LAYERS = {0: "swa", 1: "csa", 2: "hca"}
DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.cuda)]


def _interleave(mgr, device):
    """Re-lay every cache of the manager as a column block of one ``[pages, Σ page_bytes]`` pool:
    page ``p`` of every cache side by side (non-contiguous views, disjoint bytes)."""
    tensors = [(c, f, t) for c in mgr.caches for f, t in vars(c).items() if t is not None]
    rows = max(t.shape[0] for *_, t in tensors)
    pool = torch.zeros(rows, sum(-(-t.shape[1] // 16) * 16 for *_, t in tensors), dtype=torch.uint8, device=device)
    col = 0
    for c, f, t in tensors:
        setattr(c, f, pool[: t.shape[0], col: col + t.shape[1]])
        col += -(-t.shape[1] // 16) * 16
    return pool


def _runtime(idx, layout, device="cpu"):
    mgr = KVCacheManager(CFG, [idx], CC, device=device, single_pool=layout == "pool")
    if layout == "interleaved":
        _interleave(mgr, device)
    return mgr, StepMetadataBuilder(mgr, device)


def _steps(n_decode=3, device="cpu"):
    g = torch.Generator().manual_seed(7)
    x = lambda t: torch.randn(t, CFG.hidden_size, generator=g).bfloat16().to(device)  # noqa: E731
    yield x(21), [("a", 13), ("b", 8)]
    for _ in range(n_decode):
        yield x(2), [("a", 1), ("b", 1)]


def _cache_bytes(mgr):
    return [t.clone() for c in mgr.caches for t in vars(c).values() if t is not None]


@pytest.mark.filterwarnings("error:dsv4")  # no declined rewrite
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["pool", "interleaved"])
@pytest.mark.parametrize("idx", sorted(LAYERS), ids=LAYERS.get)
def test_shared_storage_caches_compile_in_place(idx, layout, device, no_compile_cache):
    torch.manual_seed(0)
    layer = DeepseekV4Attention(CFG, idx, max_model_len=256, device=device)
    ref_mgr, ref_b = _runtime(idx, "separate", device)
    mgr, b = _runtime(idx, layout, device)
    assert len({t.untyped_storage().data_ptr() for c in mgr.caches for t in vars(c).values() if t is not None}) == 1
    pm = DSV4PassManager(record=True)
    step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]), options={"post_grad_custom_post_pass": pm})
    for r in ("a", "b"):
        mgr.add_request(r)
        ref_mgr.add_request(r)
    for i, (x, batch) in enumerate(_steps(device=device)):
        want = layer(x, ref_b.build(batch), ref_mgr.caches[0])  # eager, separate caches
        with capture_final_graphs(require=i == 0) as graphs:  # later steps reuse the graph
            got, code = run_and_get_code(step, x, b.build(batch))
        assert torch.equal(got, want)
        for w, g in zip(_cache_bytes(ref_mgr), _cache_bytes(mgr), strict=True):
            assert torch.equal(w, g)
        for gm in graphs:
            assert_graph_ok(gm.graph)
        for src in code:  # no clone of a cache region, no copy back into one
            assert "as_strided_clone" not in src and ".copy_(" not in src, src
    if idx:  # the layers whose ops write two caches in one call (compressor_insert)
        assert sum(s.inplaced for s in pm.snapshots) > 0


def test_shared_storage_warm_cache_has_no_copies(tmp_path, monkeypatch):
    """A warm Inductor cache returns the artifact compiled with the rewrite: still no copies."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    layer = DeepseekV4Attention(CFG, 1, max_model_len=256)
    for run in range(2):
        torch._dynamo.reset()
        mgr, b = _runtime(1, "pool")
        step = compile_step(lambda x, meta: layer(x, meta, mgr.caches[0]))
        mgr.add_request("a")
        x, _ = next(_steps())
        _, code = run_and_get_code(step, x[:5], b.build([("a", 5)]))
        for src in code:
            assert "as_strided_clone" not in src and ".copy_(" not in src
    torch._dynamo.reset()


def test_overlapping_caches_are_refused_naming_them():
    mgr = KVCacheManager(CFG, [1, 2], CC, single_pool=True)
    c0, c1 = mgr.caches
    c1.swa = c0.compressed[: c1.swa.shape[0], : c1.swa.shape[1]]  # same bytes as layer 1's compressed cache
    with pytest.raises(ValueError, match="caches layer 1 compressed .* and layer 2 swa .* overlap"):
        StepMetadataBuilder(mgr)
    with pytest.raises(ValueError, match="overlap"):
        mgr.check_layout()


def test_single_pool_is_one_allocation_with_aligned_disjoint_caches():
    mgr = KVCacheManager(CFG, [0, 1, 2], CC, single_pool=True)
    sep = KVCacheManager(CFG, [0, 1, 2], CC)
    assert mgr.cache_bytes() == sep.cache_bytes() <= mgr.pool.numel()
    for c in mgr.caches:
        for t in vars(c).values():
            if t is not None:
                assert t.untyped_storage().data_ptr() == mgr.pool.untyped_storage().data_ptr()
                assert t.storage_offset() % KVCacheManager.POOL_ALIGN == 0 and t.is_contiguous()
    mgr.check_layout()


def test_a_rewrite_it_cannot_prove_legal_is_not_silent(no_compile_cache):
    """A mutation of a *view* of a pooled cache (sliced inside the compiled function) is left to
    Inductor, which copies: the pass says so with a warning naming the op."""
    import dsv4_compile
    from dsv4_compile import layouts

    page = layouts.page_bytes("fp8_ds_mla", 64)
    pool = torch.zeros(2 * 4 * page, dtype=torch.uint8)
    a, b = pool[: 4 * page].view(4, page), pool[4 * page:].view(4, page)

    def fn(kv, slots):
        torch.ops.dsv4.kv_insert(kv, a[1:], slots, 64)
        torch.ops.dsv4.kv_insert(kv, b, slots, 64)

    kv = torch.randn(3, 512).bfloat16()
    with pytest.warns(UserWarning, match="dsv4: dsv4.kv_insert.default writes caches that share a storage"):
        dsv4_compile.compile(fn)(kv, torch.tensor([0, 5, 70]))

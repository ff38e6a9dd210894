"""Tensor parallelism over gloo (issue 17, the CPU part): 2 ranks launched with ``torchrun`` on the
tiny config.

Each rank builds every layer type with ``tp=TensorParallel()`` (2 of the 4 heads, one output group)
and loads the *full* checkpoint of a TP=1 layer (slicing on load does the sharding), then runs a
two-request prefill, three decode steps and an empty step, eagerly for every layer type and compiled
(``compile_step``: fullgraph, the dsv4 passes) for the CSA layer, next to the TP=1 layer on the same
inputs. Checked: TP=2 == TP=1 within bf16 reduction noise, compiled == eager bit for bit, the same
output on both ranks, one Dynamo graph whose final graph holds exactly one bf16 all-reduce (and no
host sync or cache copy), and ``ValueError`` on every rank for bad configurations.

The bound. Everything before ``wo_b`` is the same computation at TP=1 and TP=2 (the replicated parts
are replicated; a head's attention does not depend on the other heads; each rank holds whole output
groups of ``wo_a``). Only ``wo_b`` differs: TP=1 rounds one fp32-accumulated sum ``y`` to bf16; TP=2
rounds each rank's half sum ``p_r`` to bf16, then their sum again (gloo and NCCL add two bf16 values
in fp32 and round once). With bf16's unit roundoff u = 2^-8, elementwise
``|y_tp2 - y_tp1| <= u·(|p_0| + |p_1| + |y_tp1| + |y_tp2|)``. Statistically: a round-to-nearest error
of a value with a uniform mantissa has a relative RMS of u/√6, so the difference of the three TP=2
roundings and the one TP=1 rounding has an RMS of (u/√6)·sqrt(|p_0|² + |p_1|² + 2|y|²); with
independent halves (|p_r|² ≈ |y|²/2) that is a relative RMS of u/√2 ≈ 0.0028 (measured: 0.0025 to
0.0031). ``REL_RMS_BOUND = 1e-2`` (~3.6× that) is far below what a sharding mistake gives: without the
all-reduce the error is 0.75; a wrong slice or a doubled sum is of order 1 too.

Run by hand: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_tensor_parallel.py OUT_DIR``
(each rank writes ``OUT_DIR/rank<r>.json``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.distributed import TensorParallel, head_shard

REPO = Path(__file__).resolve().parents[1]
CFG = DSv4AttentionConfig.tiny()
MAX_LEN = 256
REL_RMS_BOUND = 1e-2  # bf16 reduction noise is ~u = 2^-8 relative RMS (module doc)
LAYERS = {0: "swa", 1: "csa", 2: "hca"}
COMPILED = (1,)  # compiled on gloo too: the CSA layer (every op of the layer; the all-reduce is the same for all)
SCHEDULE = [[("a", 40), ("b", 25)], [("a", 1), ("b", 1)], [("a", 1), ("b", 1)], [], [("a", 1), ("b", 1)]]
BAD_CASES = {  # name: the message every rank must raise (a substring)
    "groups_split": "not a whole number of output groups",
    "heads_not_divisible": "num_attention_heads (3) divisible by 2",
    "config_differs": "config.sliding_window differs across ranks (rank 0: 16, rank 1: 32)",
    "layer_differs": "layer_idx differs across ranks (rank 0: 1, rank 1: 2)",
    "explicit_offset_wrong": "rank 1: n_local_heads=None, head_offset=0 are not rank 1's shard",
    "weight_format_differs": "weight_format differs across ranks (rank 0: 'fp8', rank 1: 'FP8')",
}


# --- the worker (one per rank, under torchrun) ----------------------------------------------------
def _rel_rms(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)) if ref.numel() else 0.0


def _same_on_every_rank(y) -> bool:
    import torch.distributed as dist

    ys = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(ys, y.contiguous())
    return all(torch.equal(ys[0], other) for other in ys[1:])


def _numerics(tp, idx: int, compiled: bool) -> dict:
    from torch._dynamo.utils import counters

    from dsv4_compile.lowerings.checks import capture_final_graphs, cache_copies, host_syncs
    from dsv4_compile.model import DeepseekV4Attention
    from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

    torch.manual_seed(0)  # the same full checkpoint on every rank
    full = DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN)
    shard = DeepseekV4Attention(CFG, idx, max_model_len=MAX_LEN, tp=tp)
    shard.load_state_dict(full.state_dict())  # sliced to this rank's heads on load
    cc = CacheConfig(max_num_seqs=2, max_model_len=MAX_LEN, max_num_batched_tokens=80, token_budget=512)
    runs = {"tp1": full, "eager": shard} | ({"compiled": shard} if compiled else {})
    mgrs = {k: KVCacheManager(CFG, [idx], cc) for k in runs}
    builders = {k: StepMetadataBuilder(m) for k, m in mgrs.items()}
    fns = {k: (lambda x, meta, layer=layer, m=mgrs[k]: layer(x, meta, m.caches[0])) for k, layer in runs.items()}
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        fns["compiled"] = compile_step(fns["compiled"])
    for m in mgrs.values():
        m.add_request("a"), m.add_request("b")
    torch.manual_seed(1)  # the same activations on every rank
    out = {"heads": [shard.n_heads, shard.head_offset], "steps": []}
    for i, batch in enumerate(SCHEDULE):
        x = torch.randn(sum(n for _, n in batch), CFG.hidden_size).bfloat16()
        ys = {}
        for k, fn in fns.items():
            if k == "compiled" and i == 0:  # the first call compiles: keep its final graph
                with capture_final_graphs() as graphs:
                    ys[k] = fn(x, builders[k].build(batch))
                ars = [n for gm in graphs for n in gm.graph.nodes if "_c10d_functional.all_reduce" in str(n.target)]
                out["graph"] = {"graphs": len(graphs), "all_reduce": len(ars),
                                "all_reduce_dtypes": [str(n.args[0].meta["val"].dtype) for n in ars],
                                "problems": [p for gm in graphs for p in cache_copies(gm.graph) + host_syncs(gm.graph)]}
            else:
                ys[k] = fn(x, builders[k].build(batch))
        step = {"tokens": x.shape[0], "shape": list(ys["eager"].shape), "dtype": str(ys["eager"].dtype),
                "eager_rel": _rel_rms(ys["eager"], ys["tp1"]), "eager_same_on_ranks": _same_on_every_rank(ys["eager"]),
                "max_abs_tp1": float(ys["tp1"].float().abs().max()) if x.shape[0] else 0.0}
        if compiled:
            step |= {"compiled_rel": _rel_rms(ys["compiled"], ys["tp1"]),
                     "compiled_equals_eager": torch.equal(ys["compiled"], ys["eager"])}
        out["steps"].append(step)
    if compiled:
        out["unique_graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
    return out


def _bad_configurations(tp) -> dict:
    """Each case on every rank: the message of the ValueError it raised (None: it did not raise)."""
    import dataclasses

    from dsv4_compile.model import DeepseekV4Attention

    r = tp.rank
    cases = {
        "groups_split": lambda: DeepseekV4Attention(dataclasses.replace(CFG, o_groups=1), 0, max_model_len=MAX_LEN,
                                                    tp=tp),
        "heads_not_divisible": lambda: DeepseekV4Attention(
            dataclasses.replace(CFG, num_attention_heads=3, o_groups=3), 0, max_model_len=MAX_LEN, tp=tp),
        "config_differs": lambda: DeepseekV4Attention(dataclasses.replace(CFG, sliding_window=16 * (r + 1)), 0,
                                                      max_model_len=MAX_LEN, tp=tp),
        "layer_differs": lambda: DeepseekV4Attention(CFG, 1 + r, max_model_len=MAX_LEN, tp=tp),
        "explicit_offset_wrong": lambda: DeepseekV4Attention(CFG, 0, head_offset=0, max_model_len=MAX_LEN, tp=tp),
        # a bad value on one rank only: every rank raises (the check runs after the ranks agree)
        "weight_format_differs": lambda: DeepseekV4Attention(CFG, 0, max_model_len=MAX_LEN, tp=tp,
                                                             weight_format="FP8" if r else "fp8"),
    }
    out = {}
    for name, build in cases.items():
        try:
            build()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def worker(out_dir: str) -> None:
    import copy
    import datetime

    import torch.distributed as dist

    from dsv4_compile.model import DeepseekV4Attention

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)  # two ranks on a small CI machine
    tp = TensorParallel()
    res = {"rank": tp.rank, "world_size": tp.world_size, "layers": {}}
    for idx, name in LAYERS.items():
        res["layers"][name] = _numerics(tp, idx, idx in COMPILED)
    res["bad"] = _bad_configurations(tp)
    res["deepcopy_shares_group"] = copy.deepcopy(DeepseekV4Attention(CFG, 0, max_model_len=MAX_LEN, tp=tp)).tp is tp
    # the checks kept the ranks in step: a collective after them still pairs up
    res["in_step_after_errors"] = _same_on_every_rank(torch.arange(4))
    Path(out_dir, f"rank{tp.rank}.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()
    # no interpreter teardown: gloo's C++ threads occasionally abort there (SIGABRT, "terminate called
    # without an active exception") after all work is done; examples/tp_layer.py does the same
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


# --- the tests (pytest process) -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script *args`` on 127.0.0.1 (a free port; gloo on the loopback
    interface); ``AssertionError`` with the ranks' tracebacks when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU: reference ops only
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on the loopback interface too
    for attempt in range(2):  # the free port may be taken between our probe and torchrun's bind: retry once
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(script), *map(str, args)]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0 or "EADDRINUSE" not in res.stderr + res.stdout:
            break
    # the ranks' own tracebacks (torchrun prefixes their lines with [rankN]), not only its summary
    ranks_said = "\n".join(line for line in res.stderr.splitlines() if line.startswith("[rank"))
    assert res.returncode == 0, f"exit status {res.returncode}\nstdout: {res.stdout[-3000:]}\nstderr: " + (
        ranks_said or res.stderr)[-6000:]
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of one ``torchrun --nproc_per_node 2`` launch of ``worker``."""
    out = tmp_path_factory.mktemp("tp")
    torchrun(Path(__file__).resolve(), out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_tp2_matches_tp1_eager_and_compiled(ranks):
    for res in ranks:
        r = res["rank"]
        assert res["world_size"] == 2
        for name, layer in res["layers"].items():
            assert layer["heads"] == [2, 2 * r], name  # 2 of the 4 heads: output group r
            for i, step in enumerate(layer["steps"]):
                where = f"rank {r}, {name}, step {i}"
                assert step["shape"] == [step["tokens"], CFG.hidden_size] and step["dtype"] == "torch.bfloat16", where
                assert step["eager_rel"] < REL_RMS_BOUND, (where, step)
                assert step["eager_same_on_ranks"], where
                if "compiled_rel" in step:
                    assert step["compiled_equals_eager"], where
                    assert step["compiled_rel"] < REL_RMS_BOUND, (where, step)
            # not vacuous: the steps with tokens had a non-trivial output and some rounding difference
            assert any(s["max_abs_tp1"] > 0.05 for s in layer["steps"]), name
    assert [s["tokens"] for s in ranks[0]["layers"]["csa"]["steps"]] == [65, 2, 2, 0, 2]


def test_one_bf16_all_reduce_in_the_compiled_graph(ranks):
    for res in ranks:
        csa = res["layers"]["csa"]
        assert csa["unique_graphs"] == 1 and csa["graph_breaks"] == 0
        g = csa["graph"]
        assert g["graphs"] == 1 and g["all_reduce"] == 1, g
        assert g["all_reduce_dtypes"] == ["torch.bfloat16"], g
        assert g["problems"] == [], g  # no host sync, no cache copy with the collective in the graph


def test_bad_configurations_raise_on_every_rank(ranks):
    for name, want in BAD_CASES.items():
        msgs = [res["bad"][name] for res in ranks]
        for r, msg in enumerate(msgs):
            assert msg is not None, f"{name}: rank {r} did not raise"
            assert want in msg, (name, r, msg)
        # one message naming every rank's problem, the same up to the "rank r of group" prefix
        assert msgs[0].split("): ", 1)[1] == msgs[1].split("): ", 1)[1], msgs
    assert all(res["in_step_after_errors"] for res in ranks)


def test_deepcopy_keeps_the_group(ranks):
    assert all(res["deepcopy_shares_group"] for res in ranks)


def test_example_runs_with_two_gloo_ranks():
    """``torchrun --nproc_per_node 2 examples/tp_layer.py`` (CPU, gloo, tiny CSA layer): both ranks
    check TP=2 against TP=1 and print their step times."""
    out = torchrun(REPO / "examples" / "tp_layer.py", "--prefill", 20, "--decode", 3).stdout
    lines = sorted(re.findall(r"\[rank \d/2 gloo\][^\n]*? s(?=\n|\[|$)", out))
    assert len(lines) == 2, out
    for r, line in enumerate(lines):
        assert line.startswith(f"[rank {r}/2 gloo] CSA layer 1 of tiny, heads {2 * r}..{2 * r + 1} of 4"), line
        assert ": OK;" in line and "TP=2" in line and "ms" in line, line


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_example_nccl_graph_replay_on_two_gpus():
    """The same check with NCCL (NVLink multicast off) and CUDA-graph replay: V4-Flash CSA layer, B=8
    decode steps replayed from the runner's graphs, the all-reduce captured in them."""
    out = torchrun(REPO / "examples" / "tp_layer.py", "--device", "cuda", "--requests", 8, "--decode", 5,
                   timeout=600).stdout
    lines = sorted(re.findall(r"\[rank \d/2 nccl\][^\n]*? s(?=\n|\[|$)", out))
    assert len(lines) == 2, out
    for r, line in enumerate(lines):
        assert line.startswith(f"[rank {r}/2 nccl] CSA layer 2 of flash, heads {32 * r}..{32 * r + 31} of 64"), line
        assert ": OK;" in line and "CUDA-graph replay" in line, line


# --- single-process checks ------------------------------------------------------------------------
def test_head_shard():
    flash, pro = DSv4AttentionConfig.flash(), DSv4AttentionConfig.pro()  # 64 heads / 8 groups, 128 / 16
    assert [head_shard(flash, 8, r) for r in range(8)] == [(8, 8 * r) for r in range(8)]
    assert head_shard(flash, 2, 1) == (32, 32) and head_shard(flash, 1) == (64, 0)
    assert head_shard(pro, 16, 15) == (8, 120)
    assert head_shard(CFG, 2, 1) == (2, 2)
    with pytest.raises(ValueError, match=r"6 ranks needs num_attention_heads \(64\) divisible by 6; this config "
                                         r"allows tp in \[1, 2, 4, 8\]"):
        head_shard(flash, 6)
    with pytest.raises(ValueError, match=r"give each rank 4 heads, not a whole number of output groups \(8 heads"):
        head_shard(flash, 16)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        head_shard(flash, 2, 2)
    with pytest.raises(ValueError, match="positive int"):
        head_shard(flash, 0)


def test_tensor_parallel_needs_an_initialized_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        TensorParallel()


def test_tp_must_be_a_tensor_parallel():
    from dsv4_compile.model import DeepseekV4Attention

    with pytest.raises(ValueError, match="TensorParallel"):
        DeepseekV4Attention(CFG, 0, tp=2)


if __name__ == "__main__":
    worker(sys.argv[1])

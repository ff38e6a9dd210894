"""Every Triton and CuTe-DSL kernel compiles for Hopper (sm_90) and Blackwell (sm_100) without a GPU;
the hardware E2M1 conversion appears in exactly the sm_100 MXFP4 kernels."""

import os
import subprocess
import sys

import pytest


def test_triton_kernels_compile_for_sm90_and_sm100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "dsv4_compile.kernels.triton.compile_check", "90", "100"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.split()
    sm90 = [n for n in lines if "@sm_90" in n and not n.endswith("+ones")]
    sm100 = [n for n in lines if "@sm_100" in n and not n.endswith("+ones")]
    # each kernel once more with every integer argument 1 (what Triton specializes at launch: k = 1)
    ones = [n.split("@")[0] for n in lines if n.endswith("+ones") and "@sm_90" in n]
    assert sorted(ones) == sorted({n.split("@")[0] for n in sm90}), ones
    # 9 q-path + 8 cache + 9 compressor (2 norm + quant) + 6 index + 17 attention (6 logits: FP8 with one head
    # block pipelined and not, with many; MXFP4 with one / many and byte-permute decode, one with the arithmetic
    # decode; 4 + 2 looped top-k rounds, 3 sparse, 2 combine) + 4 output (bf16 / fp32 o) + 4 FP8 GEMM + 4 GEMV
    # (FP8, quant fused, bf16)
    assert len(sm90) == len(sm100) == 61
    assert not any("e2m1x2" in n for n in sm90)  # Hopper: software E2M1 only
    # mxfp4_quant, the two MXFP4 indexer-q variants, the MXFP4 indexer-K insert and compressor insert
    assert sum("e2m1x2" in n for n in sm100) == 5


def test_cute_kernels_compile_for_sm90a_and_sm100a():
    from dsv4_compile.kernels.cute import HAVE_CUTE

    if not HAVE_CUTE:
        pytest.skip("CuTe DSL not installed (pip install 'dsv4-compile[cute]': nvidia-cutlass-dsl, apache-tvm-ffi)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV4_E2M1")}
    out = subprocess.run(
        [sys.executable, "-m", "dsv4_compile.kernels.cute.compile_check", "sm_90a", "sm_100a"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.split()
    sm90 = [n for n in lines if n.split("@")[1].startswith("sm_90a")]
    sm100 = [n for n in lines if n.split("@")[1].startswith("sm_100a")]
    # indexer-q: FP8 / MXFP4 x Hadamard off / on, + 2 dtype variants; kv insert: no RoPE, RoPE at 3 block
    # sizes / dtype combinations; top-k: 5 round variants, 5 one-kernel plans and 4 cluster (distributed
    # shared memory) ones; sparse attention
    # (wgmma: sm_90a only): CSA split (partials; merged in clusters of 2; clusters of 5 merged into
    # partials; four value-dim groups a split), SWA only split in clusters of 10 and in eight value-dim groups,
    # SWA only unsplit in eight value-dim groups and split in eight merged in clusters of its two splits,
    # CSA in two value-dim groups whose clusters of 5 merge into partials,
    # HCA's C128 pages unsplit, SWA only; FP8 and MXFP4 indexer logits
    # (wgmma: sm_90a only): 64- and 128-entry pages; the decode FP8 GEMM (wgmma: sm_90a only): 3 variants
    assert len(sm90) == 42 and len(sm100) == 24
    assert sum(n.startswith("topk_dsmem") for n in sm90) == 4 and sum(n.startswith("topk_dsmem") for n in sm100) == 4
    assert sum(n.startswith("fp8_gemm_") for n in sm90) == 3
    assert sum(n.startswith("sparse_attn_") for n in sm90) == 11
    assert sum("_cluster" in n for n in sm90) == 5 and sum("_part" in n for n in sm90) == 2
    assert sum(n.startswith("indexer_logits_") for n in sm90) == 4
    assert not any(n.startswith(("sparse_attn_", "indexer_logits_")) for n in sm100)
    assert sum(n.startswith("topk_") for n in sm90) == sum(n.startswith("topk_") for n in sm100) == 14
    assert sum(n.startswith("topk_fused_") for n in sm90) == sum(n.startswith("topk_fused_") for n in sm100) == 5
    assert sum(n.startswith("kv_") for n in sm90) == sum(n.startswith("kv_") for n in sm100) == 4
    assert not any("e2m1x2" in n for n in sm90)  # Hopper: software E2M1, checked in the PTX
    assert sum("e2m1x2" in n for n in sm100) == 3  # every MXFP4 variant uses the hardware conversion

"""The examples' and benchmarks' command lines behave (issue 12, item 7)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("decode", [0, 1])
def test_run_layer_short_decodes(decode):
    out = _run(REPO / "examples" / "run_layer.py", "--decode", decode, "--prefill", 20)
    assert out.returncode == 0, out.stderr[-2000:]
    if decode == 0:
        assert "prefill only" in out.stdout and "last output (prefill of req0): (20, 256)" in out.stdout
    else:
        assert "last output (decode step 1): (1, 256)" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_decode_step_benchmark_without_a_gpu_says_so():
    out = _run(REPO / "benchmarks" / "decode_step.py", timeout=120)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_stack_step_benchmark_tiny_cpu(tmp_path):
    """``benchmarks/stack_step.py`` on the CPU (tiny dims, V4-Flash's 43-layer mix, compiled steps
    without graphs, wall clock): prints the table and writes it with its JSON rows."""
    out = tmp_path / "stack_step.md"
    res = _run(REPO / "benchmarks" / "stack_step.py", "--preset", "tiny", "--device", "cpu", "--batches", 1, 2,
               "--context", 64, "--iters", 1, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| **stack / Σ single** |" in res.stdout
    for b in (1, 2):
        assert f"| flash (tiny, 43 layers) | bf16 | 1 | {b} | 64 | **" in res.stdout
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["tp"], r["B"], r["layers"]) for r in rows] == [(1, 1, 43), (1, 2, 43)]
    assert all(r["finite"] and r["count"] == {"swa": 2, "csa": 21, "hca": 20} for r in rows)
    assert "stack / Σ single" in out.read_text()

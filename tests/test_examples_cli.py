"""The examples' and benchmarks' command lines behave (issue 12, item 7)."""

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

"""Compile every CuTe-DSL kernel variant for sm_90a and sm_100a without a GPU (fake tensors).

Beyond "it compiles", the PTX is checked for what the numerics and the target rely on:

* no ``fma`` anywhere: the reference rounds every fp32 product and sum separately;
* sm_90a: no ``e2m1x2`` conversion (it does not exist there) and no 256-bit global accesses;
* sm_100a: the MXFP4 variants use the hardware ``cvt.rn.satfinite.e2m1x2.f32``.

    python -m dsv4_compile.kernels.cute.compile_check [sm_90a sm_100a]

prints one ``name@arch[+e2m1x2]`` line per compiled kernel.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

from cutlass import BFloat16, Float32, Int32, Int64

from . import indexer_q
from ._common import use_hw_e2m1

ARCHS = ("sm_90a", "sm_100a")

# 256-bit vector accesses (sm_100+): .v8 of 32-bit or .v4 of 64-bit elements
_WIDE_ACCESS = re.compile(r"\b(ld|st)\.global(\.[a-z_:0-9]+)*\.(v8\.(b|f|u|s)32|v4\.(b|f|u|s)64)\b")
_FMA = re.compile(r"\bfma\.")


def _indexer_q_cases():
    for mxfp4 in (False, True):
        for hadamard in (False, True):
            yield dict(q=BFloat16, pos=Int64, cs=Float32, w=BFloat16, heads=64, mxfp4=mxfp4, hadamard=hadamard)
    # the other operand dtypes the op accepts (int32 positions, bf16 table, fp32 q and weights) and a
    # head count that leaves a partial head block
    yield dict(q=BFloat16, pos=Int32, cs=BFloat16, w=Float32, heads=64, mxfp4=False, hadamard=True)
    yield dict(q=Float32, pos=Int64, cs=Float32, w=Float32, heads=20, mxfp4=True, hadamard=False)


def _ptx_text(compiled, dump_dir: str) -> str:
    ptx = getattr(compiled, "__ptx__", None)
    if ptx and os.path.isfile(ptx):
        with open(ptx) as f:
            return f.read()
    if ptx and ".entry" in ptx:
        return ptx
    raise RuntimeError(f"no PTX came back from the CuTe DSL compiler (dump dir {dump_dir})")


def _check_ptx(name: str, arch: str, ptx: str, expect_hw_e2m1: bool) -> str:
    if _FMA.search(ptx):
        raise AssertionError(f"{name}@{arch}: fma in the PTX (the reference rounds products and sums separately)")
    hw = "e2m1x2" in ptx
    if arch == "sm_90a":
        if hw:
            raise AssertionError(f"{name}@{arch}: e2m1x2 conversion does not exist on sm_90a")
        wide = _WIDE_ACCESS.search(ptx)
        if wide:
            raise AssertionError(f"{name}@{arch}: 256-bit access {wide.group(0)!r} is sm_100+ only")
    if hw != expect_hw_e2m1:
        raise AssertionError(f"{name}@{arch}: hardware E2M1 expected {expect_hw_e2m1}, PTX has it: {hw}")
    return f"{name}@{arch}" + ("+e2m1x2" if hw else "")


def compile_all(arch: str) -> list[str]:
    """Compile every variant for ``arch``; returns ``name@arch[+e2m1x2]`` per kernel."""
    names = []
    with tempfile.TemporaryDirectory(prefix="dsv4_cute_ptx_") as dump_dir:
        for case in _indexer_q_cases():
            hw = case["mxfp4"] and use_hw_e2m1(arch)
            compiled = indexer_q.IndexerQKernel.compile(
                case["q"], case["pos"], case["cs"], case["w"], case["heads"], 128, 64, case["mxfp4"], case["hadamard"],
                arch, hw,
                extra_options=f"--keep-ptx --dump-dir {dump_dir}",
            )
            name = "indexer_q_rope_{}{}_h{}_q{}_cs{}_pos{}_w{}".format(
                "mxfp4" if case["mxfp4"] else "fp8", "_hadamard" if case["hadamard"] else "", case["heads"],
                *(case[k].__name__.lower() for k in ("q", "cs", "pos", "w")),
            )
            names.append(_check_ptx(name, arch, _ptx_text(compiled, dump_dir), hw))
    return names


if __name__ == "__main__":
    for a in sys.argv[1:] or ARCHS:
        for n in compile_all(a):
            print(n)

"""Compile every dsv4 Triton kernel for a GPU architecture without a GPU (Triton's bundled ptxas).

CPU CI runs the kernels under ``TRITON_INTERPRET=1``, which never lowers them to PTX; this module
catches what only the real compiler sees (constexpr rules, layouts, inline PTX such as the sm_100
E2M1 conversion). Run in a process without ``TRITON_INTERPRET``:

    python -m dsv4_compile.kernels.triton.compile_check 90 100
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import indexer_q, primitives

_OPTS = {"enable_fp_fusion": False}


def _cases(arch: int):
    hw = arch >= 100
    yield primitives._rope_kernel, dict(
        x_ptr="*bf16", out_ptr="*bf16", pos_ptr="*i64", cs_ptr="*fp32", n_rows="i32", rows_per_token="i32",
        max_pos="i32", cs_stride="i32"), dict(D=128, ROT=64, INVERSE=True, BLOCK_R=64, BLOCK_P=64)
    yield primitives._rope_kernel, dict(
        x_ptr="*fp32", out_ptr="*fp32", pos_ptr="*i32", cs_ptr="*bf16", n_rows="i32", rows_per_token="i32",
        max_pos="i32", cs_stride="i32"), dict(D=576, ROT=64, INVERSE=False, BLOCK_R=8, BLOCK_P=512)
    yield primitives._hadamard_kernel, dict(x_ptr="*bf16", out_ptr="*bf16", n_rows="i32", scale="fp32"), dict(
        D=128, LOG2_D=7, BLOCK_R=16)
    yield primitives._fp8_block_quant_kernel, dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", n_groups="i32",
                                                    amax_floor="fp32"), dict(BLOCK=64, BLOCK_B=64, BLOCK_G=64)
    yield primitives._mxfp4_quant_kernel, dict(x_ptr="*bf16", p_ptr="*u8", s_ptr="*u8", n_groups="i32"), dict(
        BLOCK_G=64, HW_E2M1=hw)
    scalars = dict(H="i32", max_pos="i32", cs_stride="i32", q_stride_t="i32", q_stride_h="i32", w_stride_t="i32",
                   w_stride_h="i32", weight_scale="fp32", hadamard_scale="fp32")
    for mxfp4 in (False, True):
        for had in (False, True):
            ptrs = dict(q_ptr="*bf16", pos_ptr="*i64", cs_ptr="*fp32", w_ptr="*bf16",
                        out_ptr="*u8" if mxfp4 else "*fp8e4nv", scale_ptr="*u8" if mxfp4 else "*fp32",
                        w_out_ptr="*fp32")
            yield indexer_q._indexer_q_kernel, {**ptrs, **scalars}, dict(
                D=128, ROT=64, BLOCK_H=16, HADAMARD=had, LOG2_D=7, MXFP4=mxfp4, HW_E2M1=hw and mxfp4)


def compile_all(arch: int) -> list[str]:
    """Compile every kernel variant for ``sm_<arch>``; returns ``name@sm_<arch>[+e2m1x2]`` per kernel
    (``+e2m1x2`` when its PTX uses the hardware E2M1 conversion)."""
    target = GPUTarget("cuda", arch, 32)
    names = []
    for fn, sig, constexprs in _cases(arch):
        signature = {**sig, **{k: "constexpr" for k in constexprs}}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                                options=_OPTS)
        hw = "+e2m1x2" if "e2m1x2" in kernel.asm["ptx"] else ""
        names.append(f"{kernel.metadata.name}@sm_{arch}{hw}")
    return names


if __name__ == "__main__":
    for a in sys.argv[1:] or ["90"]:
        for n in compile_all(int(a)):
            print(n)

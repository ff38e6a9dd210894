"""Compile every dsv4 Triton kernel for a GPU architecture without a GPU (Triton's bundled ptxas).

CPU CI runs the kernels under ``TRITON_INTERPRET=1``, which never lowers them to PTX; this module
catches what only the real compiler sees (constexpr rules, layouts, inline PTX such as the sm_100
E2M1 conversion). Run in a process without ``TRITON_INTERPRET``:

    python -m dsv4_compile.kernels.triton.compile_check 90 100
"""

from __future__ import annotations

import itertools

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, cache, compressor, gemm, indexer_q, indices, output, primitives, topk

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
    yield from _cache_cases(hw)
    yield from _compressor_cases(hw)
    yield from indices.compile_cases(arch)
    yield from _attention_cases()
    for (bt, bh), (o_dtype, round_bf16) in itertools.product(((1, 8), (4, 2)), (("*bf16", True), ("*fp32", False))):
        yield output._inv_rope_fp8_quant_kernel, dict(
            o_ptr=o_dtype, pos_ptr="*i64", cs_ptr="*fp32", q_ptr="*fp8e4nv", s_ptr="*fp32", T="i32", T_AL="i32",
            H="i32", max_pos="i32", cs_stride="i32", o_stride_t="i32", o_stride_h="i32"), dict(
            HPG=8, BT=bt, BLOCK_H=bh, ROUND_BF16=round_bf16)


def _cache_cases(hw: bool):
    for rope, bt in ((False, 1), (True, 2)):
        yield cache._kv_insert_kernel, dict(
            kv_ptr="*bf16", pos_ptr="*i64", cs_ptr="*fp32", cache_ptr="*u8", slot_ptr="*i64", T="i32",
            kv_stride="i32", max_pos="i32", cs_stride="i32", page_stride="i32", capacity="i64"), dict(
            BS=64, ROPE=rope, BT=bt)
    for mxfp4 in (False, True):
        yield cache._indexer_k_insert_kernel, dict(
            k_ptr="*bf16", cache_ptr="*u8", slot_ptr="*i32", T="i32", k_stride="i32", page_stride="i32",
            capacity="i64"), dict(BS=16, MXFP4=mxfp4, HW_E2M1=hw and mxfp4, BT=4)
    for fmt, out in ((0, "*bf16"), (1, "*fp32"), (2, "*fp32")):
        yield cache._gather_kernel, dict(cache_ptr="*u8", slot_ptr="*i64", out_ptr=out, N="i32", page_stride="i32",
                                         capacity="i64"), dict(BS=64, FMT=fmt, BT=4)


def _compressor_cases(hw: bool):
    yield compressor._rms_norm_kernel, dict(x_ptr="*fp32", w_ptr="*bf16", out_ptr="*fp32", n_rows="i32",
                                            eps="fp32"), dict(D=512, BD=512, LOG2_BD=9, BR=4)
    for d, bd, br in ((1024, 1024, 2), (1536, 2048, 1)):  # q_norm → FP8 wq_b: V4-Flash / V4-Pro q_lora_rank
        yield compressor._rms_norm_fp8_quant_kernel, dict(
            x_ptr="*bf16", w_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", n_rows="i32", x_stride="i32", eps="fp32",
            amax_floor="fp32"), dict(D=d, BD=bd, LOG2_BD=bd.bit_length() - 1, BLOCK=128, BR=br)
    yield compressor._state_save_kernel, dict(ks_ptr="*fp32", pos_ptr="*i64", ape_ptr="*fp32", state_ptr="*fp32",
                                              slot_ptr="*i64", ks_stride="i32", page_stride="i32",
                                              capacity="i64"), dict(R=4, W=1024, SBS=4)
    for r, coff, d, bc in ((4, 2, 512, 128), (128, 1, 512, 32), (4, 2, 128, 128)):
        yield compressor._pool_kernel, dict(
            state_ptr="*fp32", pos_ptr="*i64", bt_ptr="*i32", req_ptr="*i64", slot_ptr="*i64", out_ptr="*fp32",
            T="i32", page_stride="i32", n_pages="i32", bt_stride="i32", n_bt_cols="i32", n_reqs="i32",
            slot_capacity="i64"), dict(R=r, COFF=coff, D=d, SBS=4, BC=bc, FUSED=True)
    for fmt, d, had in ((0, 512, False), (1, 128, True), (2, 128, True)):
        yield compressor._norm_rope_insert_kernel, dict(
            pooled_ptr="*fp32", pos_ptr="*i64", w_ptr="*bf16", cs_ptr="*fp32", cache_ptr="*u8", slot_ptr="*i64",
            T="i32", eps="fp32", max_pos="i32", cs_stride="i32", page_stride="i32", capacity="i64",
            hadamard_scale="fp32"), dict(R=4, D=d, LOG2_D=d.bit_length() - 1, BS=64, FMT=fmt, HADAMARD=had,
                                         HW_E2M1=hw and fmt == 2)


def _attention_cases():
    for mxfp4, one, prmt, stages in ((False, True, False, attention.FP8_STAGES), (False, True, False, 1),
                                     (False, False, False, 1), (True, True, True, 1), (True, False, True, 1),
                                     (True, True, False, 1)):
        yield attention._indexer_logits_kernel, dict(
            q_ptr="*u8", qs_ptr="*u8", w_ptr="*fp32", cache_ptr="*u8", bt_ptr="*i32", req_ptr="*i64", pos_ptr="*i64",
            out_ptr="*fp32", H="i32", n_req="i32", num_pages="i32", page_stride="i32", L="i32", ratio="i32",
            q_stride_t="i32", q_stride_h="i32", w_stride_t="i32", bt_stride="i32", out_stride="i32"), dict(
            BS=64, BN=64 if (stages == 1 and not mxfp4) else 128, BH=64, MXFP4=mxfp4, ONE_HB=one,
            PREFETCH=not mxfp4, PRMT=prmt,
            STAGES=stages), dict(
            num_warps=4, **({"maxnreg": attention.MX_MAX_REGS} if mxfp4 else {}))
    for ch, first, final in ((16384, True, True), (4096, True, False), (8192, False, True), (1024, False, False)):
        yield topk._topk_round_kernel, dict(
            src_ptr="*fp32" if first else "*i32", src_idx_ptr="*fp32" if first else "*i32", n_ptr="*i64" if first
            else "*i32", pos_ptr="*i64", req_ptr="*i64", out_key_ptr="*i32", out_idx_ptr="*i32", n_out_ptr="*i32",
            n_req="i32", ratio="i32", L="i32", src_stride="i32", K="i32", out_stride="i32"), dict(
            CH=ch, KB=512, FROM_LOGITS=first, FINAL=final, LOOPED=False, SUB=1024), dict(num_warps=topk._warps(ch))
    for first, final in ((True, True), (False, False)):
        yield topk._topk_round_kernel, dict(
            src_ptr="*fp32" if first else "*i32", src_idx_ptr="*fp32" if first else "*i32", n_ptr="*i64" if first
            else "*i32", pos_ptr="*i64", req_ptr="*i64", out_key_ptr="*i32", out_idx_ptr="*i32", n_out_ptr="*i32",
            n_req="i32", ratio="i32", L="i32", src_stride="i32", K="i32", out_stride="i32"), dict(
            CH=16384, KB=512, FROM_LOGITS=first, FINAL=final, LOOPED=True, SUB=1024), dict(num_warps=4)
    for split, comp, bh, warps in ((False, True, 64, 8), (True, True, 64, 8), (False, False, 16, 4)):
        yield attention._sparse_attn_kernel, dict(
            q_ptr="*bf16", swa_ptr="*u8", swa_idx_ptr="*i32", comp_ptr="*u8", comp_idx_ptr="*i32", sink_ptr="*fp32",
            o_ptr="*bf16", part_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", H="i32", W="i32", K="i32",
            per_split="i32", q_stride_t="i32", q_stride_h="i32", o_stride_t="i32", o_stride_h="i32",
            swa_idx_stride="i32", comp_idx_stride="i32", swa_page_stride="i32", comp_page_stride="i32",
            swa_cap="i64", comp_cap="i64", qk_scale="fp32"), dict(
            SWA_BS=64, COMP_BS=2 if split else 64, BH=bh, BN=32, DV=256 if split else 512, SPLIT=split,
            HAS_COMP=comp), dict(num_warps=warps)
    for bm, bn, split, out, quant in ((16, 64, True, "*bf16", False), (64, 64, True, "*fp32", False),
                                      (128, 128, False, "*bf16", False), (16, 64, True, "*bf16", True)):
        yield gemm._fp8_block_gemm_kernel, dict(
            x_ptr="*bf16" if quant else "*fp8e4nv", xs_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32", out_ptr=out,
            part_ptr="*fp32", cnt_ptr="*i32", q_tmp_ptr="*fp8e4nv", q_tmp_u8_ptr="*u8", M="i32", N="i32", KB="i32",
            kb_per_split="i32", n_per_group="i32", x_stride_m="i32", x_stride_g="i32", xs_stride_m="i32",
            xs_stride_g="i32", xs_stride_k="i32", w_stride="i32", ws_stride="i32", out_stride="i32",
            amax_floor="fp32"), dict(BM=bm, BN=bn, STAGES=4 if bm < 128 else 3, SPLIT=split, U8=False,
                                     QUANT_X=quant), dict(num_warps=8 if bm == 128 else 4)
    for r, kc, mb, split, out, mode in ((16, 1024, 1, False, "*bf16", 0), (4, 8192, 1, True, "*bf16", 1),
                                        (4, 256, 4, True, "*fp32", 0), (4, 4096, 1, False, "*fp32", 2)):
        yield gemm._gemv_kernel, dict(
            x_ptr="*fp8e4nv" if mode == 0 else "*bf16", xs_ptr="*fp32",
            w_ptr="*bf16" if mode == 2 else "*fp8e4nv", ws_ptr="*fp32", out_ptr=out,
            part_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", K="i32", n_per_group="i32", x_stride_m="i32",
            x_stride_g="i32", xs_stride_m="i32", xs_stride_g="i32", xs_stride_k="i32", w_stride="i32",
            ws_stride="i32", out_stride="i32", amax_floor="fp32"), dict(
            R=r, KC=kc, MB=mb, SPLIT=split, U8=False, X_MODE=mode), dict(num_warps=4)
    combine_sig = dict(part_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", sink_ptr="*fp32", o_ptr="*bf16", H="i32",
                       n_split="i32", o_stride_t="i32", o_stride_h="i32")
    yield attention._combine_kernel, combine_sig, dict(BH=16, DC=512)
    yield attention._combine_all_kernel, combine_sig, dict(NS=32, BH=2, DC=64)


def compile_all(arch: int) -> list[str]:
    """Compile every kernel variant for ``sm_<arch>``; returns ``name@sm_<arch>[+e2m1x2]`` per kernel
    (``+e2m1x2`` when its PTX uses the hardware E2M1 conversion)."""
    target = GPUTarget("cuda", arch, 32)
    names = []
    seen = set()
    for fn, sig, constexprs, *opts in _cases(arch):
        fn = getattr(fn, "jit_fn", fn)  # a _launch.PreBound kernel: the triton.jit function it wraps
        if "PDL" in fn.arg_names:  # as launched: with the grid-dependency wait from sm_90 (none below)
            constexprs = {**constexprs, "PDL": arch >= 90}
        variants = [(sig, constexprs, "")]
        if fn not in seen:
            # Triton turns an integer argument equal to 1 into a constexpr when it launches (k = 1, a
            # stride or count of 1): the first case of each kernel also compiles with all of them 1
            seen.add(fn)
            ints = {k for k, t in sig.items() if t in ("i32", "i64")}
            if ints:
                variants.append(({k: t for k, t in sig.items() if k not in ints},
                                 {**{k: 1 for k in ints}, **constexprs}, "+ones"))
        for sig_v, const_v, tag in variants:
            signature = {**sig_v, **{k: "constexpr" for k in const_v}}
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const_v), target=target,
                                    options={**_OPTS, **(opts[0] if opts else {})})
            if const_v.get("PDL") and "griddepcontrol.wait" not in kernel.asm["ptx"]:
                raise AssertionError(f"{kernel.metadata.name}: launched with PDL but has no griddepcontrol.wait")
            hw = "+e2m1x2" if "e2m1x2" in kernel.asm["ptx"] else ""
            names.append(f"{kernel.metadata.name}@sm_{arch}{hw}{tag}")
    return names


if __name__ == "__main__":
    for a in sys.argv[1:] or ["90"]:
        for n in compile_all(int(a)):
            print(n)

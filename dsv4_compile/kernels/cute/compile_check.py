"""Compile every CuTe-DSL kernel variant for sm_90a and sm_100a without a GPU (fake tensors).

Beyond "it compiles", the PTX is checked for what the numerics and the target rely on:

* no ``fma`` anywhere: the reference rounds every fp32 product and sum separately;
* sm_90a: no ``e2m1x2`` conversion (it does not exist there) and no 256-bit global accesses;
* sm_100a: the MXFP4 variants use the hardware ``cvt.rn.satfinite.e2m1x2.f32``;
* the top-k rounds count digits with shared-memory atomics and place kept entries by a block-wide
  prefix sum (warp shuffles); the one-kernel selections meet at a global ticket between GPU-scope
  fences;
* the cache inserts read kv rows with 128-bit loads and write the record with 128-bit stores (the
  e4m3 bytes, the bf16 rope bytes) and one 64-bit store (the scale record), never byte by byte;
* sparse attention (sm_90a only: wgmma does not exist on sm_100a, where the op keeps the Triton
  kernel) multiplies with ``wgmma`` (per tile, K tile buffer and warpgroup: 32 m64n32k16 for Q·Kᵀ
  of its half of the candidates, 4 m64n256k16 for P·V, or m64n(256/G)k16 with G value-dim groups),
  loads the queries with 16-byte ``cp.async`` and the records into registers with 16-byte loads. It
  is not bit-exact by design (a softmax), so the no-``fma`` rule does not apply to it;
* the indexer logits (sm_90a only, for the same reason) load each 64-entry tile's scales with one
  bulk copy and its keys with one TMA tensor copy (FP8) or one bulk copy decoded by byte permutes
  (MXFP4), multiply with ``wgmma`` (four m64n64k32 e4m3 per tile; MXFP4 also two m64n32k32 per
  32-block, one per half of the heads, for rows that do not fold) and keep NaN through the ReLU
  (``max.NaN``). Their head sums are not bit-exact either (the tensor cores' accumulation is not fp32
  summation, docs/numerics.md §7.2), so they may contract into ``fma``;
* the decode FP8 GEMM (sm_90a only) loads weight halves (2-D) and activation blocks (3-D, the group
  a coordinate) with TMA tensor copies, multiplies with four chained ``wgmma`` m64nMBk32 e4m3 per K
  block, and a split-K variant meets at a global ticket between GPU-scope fences. Its per-block
  products are the tensor cores' (not fp32 summation), so it may contract into ``fma``.

    python -m dsv4_compile.kernels.cute.compile_check [sm_90a sm_100a]

prints one ``name@arch[+e2m1x2]`` line per compiled kernel.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile

from cutlass import BFloat16, Float32, Int32, Int64

from . import cache, gemm, indexer_logits, indexer_q, sparse_attn, topk
from ._common import use_hw_e2m1

ARCHS = ("sm_90a", "sm_100a")

# 256-bit vector accesses (sm_100+): .v8 of 32-bit or .v4 of 64-bit elements
_WIDE_ACCESS = re.compile(r"\b(ld|st)\.global(\.[a-z_:0-9]+)*\.(v8\.(b|f|u|s)32|v4\.(b|f|u|s)64)\b")
_FMA = re.compile(r"\bfma\.")
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global(\.[a-z_:0-9]+)*\.(v[248]\.)?[bfus](8|16|32|64)\b")


def _indexer_q_cases():
    for mxfp4 in (False, True):
        for hadamard in (False, True):
            yield dict(q=BFloat16, pos=Int64, cs=Float32, w=BFloat16, heads=64, mxfp4=mxfp4, hadamard=hadamard)
    # the other operand dtypes the op accepts (int32 positions, bf16 table, fp32 q and weights) and a
    # head count that leaves a partial head block
    yield dict(q=BFloat16, pos=Int32, cs=BFloat16, w=Float32, heads=64, mxfp4=False, hadamard=True)
    yield dict(q=Float32, pos=Int64, cs=Float32, w=Float32, heads=20, mxfp4=True, hadamard=False)


def _kv_insert_cases():
    # kv_insert / kv_rope_insert at the SWA / C4 page size, the C128 page size (2 entries) and the
    # other operand dtypes the op accepts (int32 slots and positions, bf16 table)
    yield dict(bs=64, rope=False, slot=Int64, pos=None, cs=None)
    yield dict(bs=64, rope=True, slot=Int64, pos=Int64, cs=Float32)
    yield dict(bs=2, rope=True, slot=Int64, pos=Int64, cs=Float32)
    yield dict(bs=16, rope=True, slot=Int32, pos=Int32, cs=BFloat16)


def _topk_cases():
    # the selection rounds the plans use (first round over the logits, later rounds over candidates,
    # final or not) at the largest chunk and small ones, both position / request dtypes, PDL on and off
    yield dict(chunk=16384, logits=True, final=True, pos=Int64, req=Int64, pdl=True)
    yield dict(chunk=16384, logits=True, final=False, pos=Int64, req=Int64, pdl=True)
    yield dict(chunk=8192, logits=False, final=True, pos=Int64, req=Int64, pdl=True)
    yield dict(chunk=32, logits=False, final=False, pos=Int64, req=Int64, pdl=False)
    yield dict(chunk=64, logits=True, final=True, pos=Int32, req=Int32, pdl=False)


def _sparse_attn_cases():
    # V4 CSA (SWA + C4 pages, split into partials; split and merged within the cluster; split into
    # clusters of 5 that merge into partials), HCA's C128 pages with int64 indices written unsplit, the
    # SWA-only layer; CSA's splits as four CTAs each, one quarter of the value dims apiece; SWA-only's split or
    # unsplit as eight, and split as eight merged within clusters of its two splits; CSA's as two groups
    # whose runs of five splits merge into partials in clusters
    yield dict(swa_bs=64, comp_bs=64, comp=True, split=True, idx=Int32, pdl=True, cluster=0, part=False)
    yield dict(swa_bs=64, comp_bs=64, comp=True, split=True, idx=Int32, pdl=True, cluster=2, part=False)
    yield dict(swa_bs=64, comp_bs=64, comp=True, split=True, idx=Int32, pdl=True, cluster=5, part=True)
    yield dict(swa_bs=64, comp_bs=64, comp=False, split=True, idx=Int32, pdl=True, cluster=10, part=False)
    yield dict(swa_bs=64, comp_bs=2, comp=True, split=False, idx=Int64, pdl=False, cluster=0, part=False)
    yield dict(swa_bs=64, comp_bs=64, comp=False, split=False, idx=Int32, pdl=True, cluster=0, part=False)
    yield dict(swa_bs=64, comp_bs=64, comp=True, split=True, idx=Int32, pdl=True, cluster=0, part=False, groups=4)
    yield dict(swa_bs=64, comp_bs=64, comp=False, split=True, idx=Int32, pdl=True, cluster=0, part=False, groups=8)
    yield dict(swa_bs=64, comp_bs=64, comp=False, split=False, idx=Int32, pdl=True, cluster=0, part=False, groups=8)
    yield dict(swa_bs=64, comp_bs=64, comp=False, split=True, idx=Int32, pdl=True, cluster=2, part=False, groups=8)
    yield dict(swa_bs=64, comp_bs=64, comp=True, split=True, idx=Int32, pdl=True, cluster=5, part=True, groups=2)


def _check_sparse_attn_ptx(name: str, arch: str, ptx: str, cluster: bool = False, part: bool = False,
                           groups: int = 1) -> None:
    # per tile and warpgroup: Q·Kᵀ of its 32 candidates over 512 dims, P·V of the 64 over its 256 / groups
    # value dims (with 8 groups the same m64n32k16 shape as Q·Kᵀ), each once per K tile buffer (two)
    wants = {"m64n32k16": 2 * 32}
    wants[f"m64n{256 // groups}k16"] = wants.get(f"m64n{256 // groups}k16", 0) + 2 * 4
    for shape, want in wants.items():
        n = len(re.findall(rf"\bwgmma\.mma_async\.sync\.aligned\.{shape}\.f32\.bf16\.bf16", ptx))
        if n != want:
            raise AssertionError(f"{name}@{arch}: {n} bf16 {shape} wgmma in the PTX, want {want}")
    if "cp.async.cg.shared.global" not in ptx:
        raise AssertionError(f"{name}@{arch}: the queries are not loaded with 16-byte cp.async")
    if "ld.global.nc.L1::no_allocate.v4.u32" not in ptx:
        raise AssertionError(f"{name}@{arch}: the records are not loaded into registers 16 bytes at a time")
    # the cluster merge: two cluster barriers, the accumulators read 16 bytes at a time from the
    # cluster's shared memory, no per-CTA fp32 partials to global memory; a run's merged partial is
    # written 16 bytes at a time
    merged = (len(re.findall(r"\bbarrier\.cluster\.wait\b", ptx)) == 2 and "ld.shared::cluster.v4.f32" in ptx
              and "st.global.v2.f32" not in ptx)
    if merged != cluster:
        raise AssertionError(f"{name}@{arch}: the splits are {'not ' if cluster else ''}merged within the cluster")
    if cluster and ("st.global.v4.f32" in ptx) != part:
        raise AssertionError(f"{name}@{arch}: the cluster's merge is {'not ' if part else ''}written as a partial")


def _indexer_logits_cases():
    # the V4 page size (one tile per page) with int64 positions / requests, two consumer warpgroups and
    # PDL; 128-entry pages (two tiles per page) with int32 ones, one consumer warpgroup
    yield dict(bs=64, stages=4, consumers=2, req=Int64, pos=Int64, pdl=True)
    yield dict(bs=128, stages=2, consumers=1, req=Int32, pos=Int32, pdl=False)


def _gemm_cases():
    # 8 activation rows, fp32 out, split-K, no PDL; 64 rows, bf16 out, unsplit, PDL; 16 rows split, PDL
    yield dict(mb=8, stages=6, out=Float32, split=True, pdl=False)
    yield dict(mb=64, stages=4, out=BFloat16, split=False, pdl=True)
    yield dict(mb=16, stages=6, out=BFloat16, split=True, pdl=True)


def _check_gemm_ptx(name: str, arch: str, ptx: str, mb: int, split: bool) -> None:
    n = len(re.findall(rf"\bwgmma\.mma_async\.sync\.aligned\.m64n{mb}k32\.f32\.e4m3\.e4m3\b", ptx))
    if n != 4:
        raise AssertionError(f"{name}@{arch}: {n} e4m3 m64n{mb}k32 wgmma in the PTX, want 4 (one K block)")
    for op, what in (("cp.async.bulk.tensor.2d.shared::cta.global.tile", "the weight halves by TMA"),
                     ("cp.async.bulk.tensor.3d.shared::cta.global.tile", "the activation blocks by TMA")):
        if op not in ptx:
            raise AssertionError(f"{name}@{arch}: no {op} in the PTX ({what})")
    if split != ("fence.acq_rel.gpu" in ptx and "atom.global.add" in ptx):
        state = "missing" if split else "there"
        raise AssertionError(f"{name}@{arch}: split {split}, but the split-K ticket is {state}")


def _check_indexer_logits_ptx(name: str, arch: str, ptx: str, fmt: str, pdl: bool) -> None:
    # one tile = 4 chained m64n64k32 wgmma; MXFP4 also 2 head halves x 4 single m64n32k32 (per 32-block)
    for shape, want in (("m64n64k32", 4), ("m64n32k32", 0 if fmt == "fp8" else 8)):
        n = len(re.findall(rf"\bwgmma\.mma_async\.sync\.aligned\.{shape}\.f32\.e4m3\.e4m3\b", ptx))
        if n != want:
            raise AssertionError(f"{name}@{arch}: {n} e4m3 {shape} wgmma in the PTX, want {want}")
    ops = [("cp.async.bulk.shared::cluster.global", "the scales by a bulk copy"),
           ("max.NaN.f32", "a NaN-keeping ReLU")]
    ops += ([("cp.async.bulk.tensor.3d.shared::cta.global.tile", "the keys by a TMA tensor copy")] if fmt == "fp8"
            else [("prmt.b32", "the E2M1 decode by byte permutes")])
    for op, what in ops:
        if op not in ptx:
            raise AssertionError(f"{name}@{arch}: no {op} in the PTX ({what})")
    # under PDL the request, the position and the producer's first page are read before the wait
    wait = ptx.find("griddepcontrol.wait")
    early = re.findall(r"\bld\.global(?:\.nc)?\.(?:b64|s32|b32|u32|s64|u64)\b", ptx[:max(wait, 0)])
    if pdl and (wait < 0 or len(early) < 3):
        raise AssertionError(f"{name}@{arch}: {len(early)} global loads before the grid-dependency wait, want 3 "
                             "(request, position, first page)")


def _topk_fused_cases():
    # one-kernel selections (TopkFusedKernel): a 64k row split four ways (two levels), the plans of a
    # 1M-token table at B <= 4 (three) and B = 8-16 (two, a 16,384-entry merge), k = 1024, and the most
    # levels (four)
    yield dict(chunks=(4096, 2048), groups=(4,), pdl=True)
    yield dict(chunks=(4096, 4096, 4096), groups=(8, 8), pdl=True)
    yield dict(chunks=(8192, 16384), groups=(32,), pdl=True)
    yield dict(chunks=(4096, 8192, 8192), groups=(8, 8), pdl=False)
    yield dict(chunks=(4096, 8192, 16384, 4096), groups=(16, 32, 8), pdl=True)


def _topk_cluster_cases():
    # one-round selections by a cluster (TopkClusterKernel): a 64k-context row (16,384 entries) over 4 / 8 /
    # 16 CTAs, a 256k one over 16 CTAs of 4,096 entries, PDL on and off
    yield dict(chunk=4096, cl=4, pdl=True)
    yield dict(chunk=2048, cl=8, pdl=True)
    yield dict(chunk=1024, cl=16, pdl=False)
    yield dict(chunk=4096, cl=16, pdl=True)


def _check_topk_ptx(name: str, arch: str, ptx: str, fused: bool = False, cluster: bool = False) -> None:
    # the histograms are shared-memory atomics; the output positions come from a block-wide prefix sum
    # (warp shuffles up); a fused selection's groups meet at a global ticket between two GPU-scope fences;
    # a cluster sums its CTAs' histograms with remote shared-memory loads between cluster barriers
    extra = ("atom.global.add", "fence.acq_rel.gpu") if fused else ()
    extra += ("mapa.shared::cluster", "ld.shared::cluster", "barrier.cluster.arrive", "barrier.cluster.wait") \
        if cluster else ()
    for op in ("atom.shared", "shfl.sync.up") + extra:
        if op not in ptx:
            raise AssertionError(f"{name}@{arch}: no {op} in the PTX")


def _global_accesses(ptx: str) -> list[str]:
    """``ld.global.v4.b32``-style mnemonics of every global load and store, in order."""
    return [m.group(0) for m in _GLOBAL_ACCESS.finditer(ptx)]


def _bits(access: str) -> int:
    """Width of one ``ld/st.global[.vN].tW`` access in bits."""
    m = re.search(r"(?:\.v([248]))?\.[bfus](8|16|32|64)$", access)
    return int(m.group(1) or 1) * int(m.group(2))


def _check_kv_insert_ptx(name: str, arch: str, ptx: str, rope: bool) -> None:
    acc = _global_accesses(ptx)
    stores = [a for a in acc if a.startswith("st.")]
    wide_loads = sum(a.startswith("ld.") and _bits(a) == 128 for a in acc)
    # kv: 2 per lane (+ cos, sin: 2 each for fp32, 1 each for bf16 tables)
    if wide_loads < 2 + (2 if rope else 0):
        raise AssertionError(f"{name}@{arch}: kv / table rows not read with 128-bit loads: {acc}")
    # nope e4m3 (1) + rope bf16 (2) 128-bit stores, the scale record as one 64-bit store, nothing else
    if sorted(_bits(a) for a in stores) != [64, 128, 128, 128]:
        raise AssertionError(f"{name}@{arch}: record stores {stores}, want 3 x 128-bit + 1 x 64-bit")


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


def _case_ptx(dump_dir: str, compile_fn, *args) -> str:
    """The PTX of ``compile_fn(*args, extra_options=...)`` dumped into a directory of its own under
    ``dump_dir`` (one PTX file per variant)."""
    with tempfile.TemporaryDirectory(dir=dump_dir) as case_dir:
        return _ptx_text(compile_fn(*args, extra_options=f"--keep-ptx --dump-dir {case_dir}"), case_dir)


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
        for case in _kv_insert_cases():
            ptx = _case_ptx(dump_dir, cache.KVInsertKernel.compile, case["bs"], case["rope"], case["slot"],
                            case["pos"], case["cs"], arch)
            name = "kv_rope_insert" if case["rope"] else "kv_insert"
            name += f"_bs{case['bs']}_slot{case['slot'].__name__.lower()}"
            if case["rope"]:
                name += f"_pos{case['pos'].__name__.lower()}_cs{case['cs'].__name__.lower()}"
            _check_kv_insert_ptx(name, arch, ptx, case["rope"])
            names.append(_check_ptx(name, arch, ptx, False))
        for case in _topk_cases():
            ptx = _case_ptx(dump_dir, topk.TopkRoundKernel.compile, case["chunk"], case["logits"], case["final"],
                            case["pos"], case["req"], case["pdl"], arch)
            name = "topk_{}_{}_c{}_pos{}_req{}{}".format(
                "logits" if case["logits"] else "candidates", "final" if case["final"] else "round", case["chunk"],
                case["pos"].__name__.lower(), case["req"].__name__.lower(), "_pdl" if case["pdl"] else "")
            _check_topk_ptx(name, arch, ptx)
            names.append(_check_ptx(name, arch, ptx, False))
        for case in _topk_fused_cases():
            ptx = _case_ptx(dump_dir, topk.TopkFusedKernel.compile, case["chunks"], case["groups"], Int64, Int64,
                            case["pdl"], arch)
            name = "topk_fused_c{}{}".format("_".join(map(str, case["chunks"])), "_pdl" if case["pdl"] else "")
            _check_topk_ptx(name, arch, ptx, fused=True)
            names.append(_check_ptx(name, arch, ptx, False))
        for case in _topk_cluster_cases():
            ptx = _case_ptx(dump_dir, topk.TopkClusterKernel.compile, case["chunk"], case["cl"], Int64, Int64,
                            case["pdl"], arch)
            name = "topk_dsmem{}_c{}{}".format(case["cl"], case["chunk"], "_pdl" if case["pdl"] else "")
            _check_topk_ptx(name, arch, ptx, cluster=True)
            names.append(_check_ptx(name, arch, ptx, False))
        for case in _sparse_attn_cases() if arch == "sm_90a" else ():
            groups = case.get("groups", 1)
            compile_fn = functools.partial(sparse_attn.SparseAttnKernel.compile, cluster=case["cluster"],
                                           cluster_part=case["part"], groups=groups)
            ptx = _case_ptx(dump_dir, compile_fn, case["swa_bs"], case["comp_bs"], case["comp"], case["split"],
                            case["idx"], case["pdl"], arch)
            name = "sparse_attn_swa{}_{}_idx{}{}{}".format(
                case["swa_bs"], f"comp{case['comp_bs']}" if case["comp"] else "swa_only", case["idx"].__name__.lower(),
                ((f"_cluster{case['cluster']}" + ("_part" if case["part"] else "")) if case["cluster"] else "_split")
                if case["split"] else "",
                "_pdl" if case["pdl"] else "") + (f"_groups{groups}" if groups > 1 else "")
            _check_sparse_attn_ptx(name, arch, ptx, case["cluster"] > 0, case["part"], groups)
            names.append(f"{name}@{arch}")
        for case in _indexer_logits_cases() if arch == "sm_90a" else ():
            for fmt, kernel in (("fp8", indexer_logits.IndexerLogitsKernel),
                                ("mxfp4", indexer_logits.IndexerLogitsMxfp4Kernel)):
                ptx = _case_ptx(dump_dir, kernel.compile, case["bs"], case["stages"], case["consumers"], case["req"],
                                case["pos"], case["pdl"], arch)
                name = "indexer_logits_{}_bs{}_s{}_w{}_req{}_pos{}{}".format(
                    fmt, case["bs"], case["stages"], case["consumers"], case["req"].__name__.lower(),
                    case["pos"].__name__.lower(), "_pdl" if case["pdl"] else "")
                _check_indexer_logits_ptx(name, arch, ptx, fmt, case["pdl"])
                names.append(f"{name}@{arch}")
        for case in _gemm_cases() if arch == "sm_90a" else ():
            ptx = _case_ptx(dump_dir, gemm.Fp8GemmKernel.compile, case["mb"], case["stages"], case["out"],
                            case["split"], case["pdl"], arch)
            name = "fp8_gemm_mb{}_s{}_{}{}{}".format(case["mb"], case["stages"], case["out"].__name__.lower(),
                                                    "_split" if case["split"] else "", "_pdl" if case["pdl"] else "")
            _check_gemm_ptx(name, arch, ptx, case["mb"], case["split"])
            names.append(f"{name}@{arch}")
    return names


if __name__ == "__main__":
    for a in sys.argv[1:] or ARCHS:
        for n in compile_all(a):
            print(n)

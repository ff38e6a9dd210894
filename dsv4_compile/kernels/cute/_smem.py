"""Memory-access helpers of the CuTe-DSL kernels (trace-time, inlined): 32-bit loads of one to four
words in one instruction (also from another CTA's shared memory in the cluster), fp32 stores of one to
four values, bf16 global stores, 16-byte shared stores, and byte offsets in the 128-byte swizzled K-major tile
layout wgmma reads."""

from __future__ import annotations

import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Uint32

_PTX_TYPE = {Float32: "f32", Int32: "s32", Uint32: "u32"}


def ld(space: str, addr, dtype, n: int = 1, nc: bool = False, cg: bool = False, rank=None):
    """``n`` (1, 2 or 4) 32-bit ``dtype`` values (``Float32`` / ``Int32`` / ``Uint32``) at ``addr`` in
    state space ``space`` (``"global"`` / ``"shared"``; aligned to ``4·n`` bytes) in one load; ``nc``:
    through the non-coherent read-only path (global data no kernel running alongside writes); ``cg``:
    from L2, not L1 (data another CTA wrote, seen after an acquire); ``rank`` (shared only): from the
    shared memory of that CTA of the cluster (``mapa``, then a ``shared::cluster`` load; the reader
    orders it after the owner's stores with a cluster barrier). One value, or a tuple of ``n``."""
    regs = ", ".join(f"{{$w{i}}}" for i in range(n))
    dst = regs if n == 1 else f"{{ {regs} }}"
    vec = "" if n == 1 else f".v{n}"
    path = (".nc" if nc else "") + (".cg" if cg else "")
    if rank is not None:
        assert space == "shared" and not (nc or cg), "a remote load reads another CTA's shared memory"
        return cute.arch.inline_ptx(
            f"{{ .reg .u32 ra; mapa.shared::cluster.u32 ra, {{$r0}}, {{$r1}}; ld.shared::cluster{vec}."
            f"{_PTX_TYPE[dtype]} {dst}, [ra]; }}", write_only_types=[dtype] * n, read_only_args=[addr, Int32(rank)])
    return cute.arch.inline_ptx(f"ld.{space}{path}{vec}.{_PTX_TYPE[dtype]} {dst}, [{{$r0}}];",
                                write_only_types=[dtype] * n, read_only_args=[addr])


def st_f32(space: str, addr, *vals):
    """One, two or four fp32 ``vals`` at ``addr`` in state space ``space`` (``"global"`` / ``"shared"``;
    aligned to their size) in one store."""
    n = len(vals)
    src = "{$r1}" if n == 1 else "{ " + ", ".join(f"{{$r{i + 1}}}" for i in range(n)) + " }"
    cute.arch.inline_ptx(f"st.{space}{'' if n == 1 else f'.v{n}'}.f32 [{{$r0}}], {src};",
                         read_only_args=[addr, *vals])


def st_global(addr, v, dtype=Float32):
    """The fp32 ``v`` stored at global ``addr`` as ``dtype``: ``Float32``, or ``BFloat16`` (rounded to
    nearest even)."""
    if dtype is BFloat16:
        cute.arch.inline_ptx("{ .reg .b16 h; cvt.rn.bf16.f32 h, {$r1}; st.global.b16 [{$r0}], h; }",
                             read_only_args=[addr, v])
    else:
        st_f32("global", addr, v)


def st_shared_v4(addr, a, b, c, d):
    """Four 32-bit words to shared memory at ``addr`` (16-byte aligned) in one store."""
    cute.arch.inline_ptx("st.shared.v4.b32 [{$r0}], { {$r1}, {$r2}, {$r3}, {$r4} };", read_only_args=[addr, a, b, c, d])


def sw128_offset(row, chunk):
    """Byte offset of 16-byte ``chunk`` of ``row`` (0..63) in a 64-row tile laid out as the 128-byte
    swizzled K-major wgmma layout (``make_smem_layout_a/b`` of a 64-row tile): 128-byte column blocks
    of 8 KB (chunks 8c .. 8c + 7), 128-byte rows, the chunk index within its block XOR the row's low
    three bits (the tile starts 1,024-byte aligned). A bf16 ``[64, 512]`` tile has 64 chunks per row
    (dims 8·chunk ..), an e4m3 ``[64, 128]`` tile 8 (dims 16·chunk ..)."""
    return (chunk // 8) * 8192 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16)

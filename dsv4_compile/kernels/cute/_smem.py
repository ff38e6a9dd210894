"""Shared-memory helpers of the CuTe-DSL wgmma kernels (trace-time, inlined): 16-byte stores and
byte offsets in the 128-byte swizzled K-major tile layout wgmma reads."""

from __future__ import annotations

import cutlass.cute as cute


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

"""Every block size, record size and page size of DSv4 attention (docs/numerics.md §4, §5), defined once.

Kernels, references, ops and tests import these names; no other module spells these numbers.
"""

from __future__ import annotations

# --- main attention head (K == V, one head) -------------------------------------------------
KV_HEAD_DIM = 512  # d
ROPE_DIM = 64  # d_r: RoPE on the *last* 64 dims of every rotated vector
KV_NOPE_DIM = KV_HEAD_DIM - ROPE_DIM  # 448

# --- FP8 e4m3 with UE8M0 power-of-two scales (numerics.md §4.2) ------------------------------
FP8_E4M3_MAX = 448.0
UE8M0_BIAS = 127  # stored exponent byte = e + 127; decode 2^(byte - 127)
FP8_AMAX_FLOOR = 1e-4  # KV nope, indexer q / K: amax is floored at 1e-4 before the scale
INV_ROPE_AMAX_FLOOR = 1e-10  # output-projection activation quant (numerics.md §8.3)
KV_QUANT_BLOCK = 64  # KV nope is quantized in 64-element blocks
KV_NOPE_BLOCKS = KV_NOPE_DIM // KV_QUANT_BLOCK  # 7
O_PROJ_QUANT_BLOCK = 128  # 4 blocks per 512-d head for the grouped output projection
WEIGHT_BLOCK = 128  # FP8 checkpoint weights: one UE8M0 scale per 128x128 block (numerics.md §1.3); FP8 GEMMs
#                    quantize their activations in 1 x WEIGHT_BLOCK blocks to match (§4.5)
O_PROJ_SCALE_T_ALIGN = 4  # the MN-major o-proj scale's token dim is padded to a multiple of 4 (16-byte rows)

# --- fp8_ds_mla paged record (SWA cache and compressed caches, numerics.md §5.2) -------------
FP8_DS_MLA_TOKEN_BYTES = KV_NOPE_DIM + 2 * ROPE_DIM  # 448 B e4m3 nope + 128 B bf16 rope = 576
FP8_DS_MLA_SCALE_BYTES = KV_NOPE_BLOCKS + 1  # 7 UE8M0 exponents + 1 zero pad byte = 8
FP8_DS_MLA_RECORD_BYTES = FP8_DS_MLA_TOKEN_BYTES + FP8_DS_MLA_SCALE_BYTES  # 584
FP8_DS_MLA_PAGE_ALIGN = 576  # FlashMLA: page size is a multiple of 576 B
SWA_BLOCK_SIZE = 64  # tokens per SWA page (vLLM)
C4_BLOCK_SIZE = 64  # compressed entries per C4 page (256 tokens / 4)
C128_BLOCK_SIZE = 2  # compressed entries per C128 page (256 tokens / 128)

# --- indexer (numerics.md §7, §5.3, §5.4) ------------------------------------------------------
INDEXER_HEAD_DIM = 128
INDEXER_FP8_VALUE_BYTES = INDEXER_HEAD_DIM  # 128 B e4m3
INDEXER_FP8_SCALE_BYTES = 4  # one fp32 power-of-two scale per token
INDEXER_FP8_RECORD_BYTES = INDEXER_FP8_VALUE_BYTES + INDEXER_FP8_SCALE_BYTES  # 132
INDEXER_BLOCK_SIZE = 64  # compressed entries per indexer K page

# --- MXFP4 (E2M1 values, UE8M0 scale per 32 elements, numerics.md §4.3) -----------------------
MXFP4_BLOCK = 32
E2M1_MAX = 6.0
MXFP4_AMAX_FLOOR = 6.0 * 2.0**-126
MXFP4_EXP_MIN = -127
MXFP4_EXP_MAX = 127
INDEXER_MXFP4_VALUE_BYTES = INDEXER_HEAD_DIM // 2  # 64 B packed nibbles
INDEXER_MXFP4_SCALE_BYTES = INDEXER_HEAD_DIM // MXFP4_BLOCK  # 4 UE8M0 bytes
INDEXER_MXFP4_RECORD_BYTES = INDEXER_MXFP4_VALUE_BYTES + INDEXER_MXFP4_SCALE_BYTES  # 68

# --- compressor state cache (numerics.md §5.5) -------------------------------------------------
C4_STATE_BLOCK_SIZE = 4  # state rows per page (C4)
C128_STATE_BLOCK_SIZE = 8  # state rows per page (C128)


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def fp8_ds_mla_page_bytes(block_size: int) -> int:
    """Bytes of one fp8_ds_mla page: token region, scale region, padded to a multiple of 576.

    64 tokens -> 37440 (65·576); 2 entries -> 1728 (3·576).
    """
    return page_bytes("fp8_ds_mla", block_size)


def fp8_ds_mla_scale_offset(block_size: int) -> int:
    """Byte offset of the scale region inside an fp8_ds_mla page."""
    return block_size * FP8_DS_MLA_TOKEN_BYTES


def indexer_page_bytes(block_size: int, fmt: str) -> int:
    """Bytes of one indexer K page (values region then scales region), padded to 576 like vLLM."""
    if fmt not in INDEXER_FORMATS:
        raise ValueError(f"indexer cache fmt must be 'fp8' or 'mxfp4', got {fmt!r}")
    return page_bytes(fmt, block_size)


def compressor_state_row_floats(compress_ratio: int, head_dim: int) -> int:
    """fp32 values per compressor state row: [kv (coff·d) | score + ape (coff·d)]."""
    return 2 * compress_overlap(compress_ratio) * head_dim


# --- paged record formats: one name per cache kind ---------------------------------------------
# fmt -> (value bytes per slot, scale bytes per slot). A page of ``bs`` slots holds the value
# region ``[0, bs·V)`` (slot k at ``k·V``), then the scale region ``[bs·V, bs·(V+S))`` (slot k at
# ``bs·V + k·S``), padded up to a multiple of 576 B. Bytes past ``bs·(V+S)`` are never touched.
RECORD_FORMATS = {
    "fp8_ds_mla": (FP8_DS_MLA_TOKEN_BYTES, FP8_DS_MLA_SCALE_BYTES),  # main KV (SWA, C4, C128)
    "fp8": (INDEXER_FP8_VALUE_BYTES, INDEXER_FP8_SCALE_BYTES),  # indexer K, FP8
    "mxfp4": (INDEXER_MXFP4_VALUE_BYTES, INDEXER_MXFP4_SCALE_BYTES),  # indexer K, MXFP4
}
INDEXER_FORMATS = ("fp8", "mxfp4")


def record_bytes(fmt: str) -> tuple[int, int]:
    """(value bytes, scale bytes) of one slot of a paged cache in format ``fmt``."""
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"cache format must be one of {sorted(RECORD_FORMATS)}, got {fmt!r}")
    return RECORD_FORMATS[fmt]


def page_bytes(fmt: str, block_size: int) -> int:
    """Allocated bytes of one page of ``block_size`` slots (padded to a multiple of 576 B)."""
    v, s = record_bytes(fmt)
    return round_up(block_size * (v + s), FP8_DS_MLA_PAGE_ALIGN)


def compress_overlap(compress_ratio: int) -> int:
    """coff: 2 for the overlapping C4 compressor, 1 for C128."""
    if compress_ratio not in (4, 128):
        raise ValueError(f"compress_ratio must be 4 or 128, got {compress_ratio}")
    return 2 if compress_ratio == 4 else 1


def compressor_state_page_bytes(compress_ratio: int, head_dim: int, block_size: int) -> int:
    """Bytes of one compressor state page: ``block_size`` fp32 rows, padded to 576 (C4 main, 4 rows:
    32768 -> 32832)."""
    return round_up(block_size * 4 * compressor_state_row_floats(compress_ratio, head_dim), FP8_DS_MLA_PAGE_ALIGN)

"""Pure-PyTorch, bit-exact semantics of every dsv4 op (docs/numerics.md §3-§8).

These functions are the CPU implementation behind every ``torch.ops.dsv4.*`` op and the oracle every
GPU kernel is tested against. They import nothing of ours but ``layouts`` (and validate nothing:
the ops validate before calling them).
"""

from .quant import (  # noqa: F401
    ceil_log2_ratio,
    e2m1_codes,
    fp8_block_quant,
    mxfp4_dequant,
    mxfp4_quant,
    pow2,
    pow2_split,
)
from .rope import hadamard, rope  # noqa: F401
from .gemm import fp8_block_gemm, fp8_linear  # noqa: F401
from .indexer_q import indexer_q_rope_fp8, indexer_q_rope_mxfp4  # noqa: F401
from .output import fp8_dequant_grouped, grouped_o_proj, inv_rope_fp8_quant  # noqa: F401
from . import attention, cache, compressor, indices  # noqa: F401,E402  (caches, compressor, indices, attention core)

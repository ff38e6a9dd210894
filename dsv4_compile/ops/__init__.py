"""The dsv4 custom ops. Importing this package registers ``torch.ops.dsv4.*``.

Every op: an explicit schema (inferred from the annotations), the reference as the default kernel
(CPU and any device), the Triton kernel for CUDA, a fake with exact shapes/strides, validation that
raises ``ValueError``. This package never imports ``torch._inductor``.
"""

from . import attention, cache, compressor, gemm, indexer_q, indices, output, quant, rope  # noqa: F401
from .indexer_q import indexer_q_rope_fp8, indexer_q_rope_mxfp4  # noqa: F401
from .quant import fp8_block_quant, mxfp4_quant, rms_norm_fp8_quant  # noqa: F401
from .rope import hadamard, rope as rope_op  # noqa: F401

"""DSv4 attention written in the plain form: readable PyTorch over the primitive dsv4 ops."""

from .attention import Compressor, DeepseekV4Attention, Indexer, RMSNorm, dequant_fp8_weight  # noqa: F401
from .indexer import IndexerQ  # noqa: F401
from .stack import DeepseekV4AttentionStack, compile_layer  # noqa: F401

"""Runtime for DSv4 attention layers: paged caches, step metadata in persistent buffers, and the
FULL_DECODE_ONLY CUDA-graph runner."""

from .builder import StepMetadataBuilder  # noqa: F401
from .cache import CacheConfig, KVCacheManager, LayerCache  # noqa: F401
from .metadata import CompressedMetadata, StepMetadata  # noqa: F401
from .runner import (CUDAGRAPH_MODES, DEFAULT_CAPTURE_SIZES, CUDAGraphRunner, DecodeGraphRunner,  # noqa: F401
                     compile_step, default_token_buckets)

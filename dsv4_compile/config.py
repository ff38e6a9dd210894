"""DSv4 attention configuration: the released V4-Flash / V4-Pro numbers (docs/numerics.md §1.3) and a tiny preset.

Every attention-relevant number of ``config.json`` lives here, plus the derived scales the kernels
use (softmax scale 512^-0.5, indexer 128^-0.5 · 64^-0.5) and the per-layer compress ratios.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from . import layouts


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """``rope_scaling`` of the released checkpoints (mscale is 1: magnitudes are untouched)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def _flash_ratios() -> tuple[int, ...]:
    # layers 0-1 SWA-only; 2..42 alternate 4 (even) / 128 (odd); MTP layer 43 is SWA-only.
    return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43)) + (0,)


def _pro_ratios() -> tuple[int, ...]:
    # layers 0-1 HCA; 2..60 alternate 4 (even) / 128 (odd); MTP layer 61 is SWA-only.
    return (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 61)) + (0,)


@dataclasses.dataclass(frozen=True)
class DSv4AttentionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    index_n_heads: int
    index_topk: int
    compress_ratios: tuple[int, ...]  # one entry per layer + the MTP layer
    head_dim: int = layouts.KV_HEAD_DIM
    qk_rope_head_dim: int = layouts.ROPE_DIM
    index_head_dim: int = layouts.INDEXER_HEAD_DIM
    num_key_value_heads: int = 1
    sliding_window: int = 128  # includes the current token
    rope_theta: float = 10000.0  # SWA-only layers (no YaRN, as the reference)
    compress_rope_theta: float = 160000.0  # compressed layers (with YaRN)
    rope_scaling: Optional[YarnConfig] = YarnConfig()
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if len(self.compress_ratios) != self.num_hidden_layers + 1:
            raise ValueError(
                f"compress_ratios needs num_hidden_layers + 1 = {self.num_hidden_layers + 1} entries "
                f"(one per layer plus the MTP layer), got {len(self.compress_ratios)}"
            )
        bad = sorted({r for r in self.compress_ratios if r not in (0, 4, 128)})
        if bad:
            raise ValueError(f"compress_ratios may only hold 0, 4 or 128, got {bad}")
        if self.num_attention_heads % self.o_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of o_groups ({self.o_groups})"
            )
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ValueError("qk_rope_head_dim must be even and at most head_dim")

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def flash(cls) -> "DSv4AttentionConfig":
        return cls(
            hidden_size=4096,
            num_hidden_layers=43,
            num_attention_heads=64,
            q_lora_rank=1024,
            o_groups=8,
            o_lora_rank=1024,
            index_n_heads=64,
            index_topk=512,
            compress_ratios=_flash_ratios(),
        )

    @classmethod
    def pro(cls) -> "DSv4AttentionConfig":
        return cls(
            hidden_size=7168,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
            index_n_heads=64,
            index_topk=1024,
            compress_ratios=_pro_ratios(),
        )

    @classmethod
    def tiny(cls) -> "DSv4AttentionConfig":
        """CPU-test sized: real head dims (the byte layouts depend on them), few heads, short window,
        one layer of each type (SWA-only, CSA, HCA) plus the MTP layer."""
        return cls(
            hidden_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            q_lora_rank=128,
            o_groups=2,
            o_lora_rank=64,
            index_n_heads=4,
            index_topk=16,
            compress_ratios=(0, 4, 128, 0),
            sliding_window=16,
            max_position_embeddings=8192,
        )

    # --- derived numbers -----------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Main attention: head_dim^-0.5 (512^-0.5 = 0.044194173824159)."""
        return self.head_dim**-0.5

    @property
    def indexer_softmax_scale(self) -> float:
        """index_head_dim^-0.5 (128^-0.5)."""
        return self.index_head_dim**-0.5

    @property
    def indexer_head_scale(self) -> float:
        """index_n_heads^-0.5 (64^-0.5 = 0.125)."""
        return self.index_n_heads**-0.5

    @property
    def indexer_weight_scale(self) -> float:
        """The constant folded into the indexer weights: softmax_scale · head_scale."""
        return self.indexer_softmax_scale * self.indexer_head_scale

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def layer_rope(self, layer: int) -> tuple[float, Optional[YarnConfig]]:
        """(theta, yarn) of a layer's RoPE table: SWA-only layers use plain theta (no YaRN, as the
        reference); compressed layers use compress_rope_theta with YaRN."""
        if self.compress_ratios[layer] == 0:
            return self.rope_theta, None
        return self.compress_rope_theta, self.rope_scaling

    @property
    def indexer_hadamard_scale(self) -> float:
        return 1.0 / math.sqrt(self.index_head_dim)

import math

import pytest
import torch

from dsv4_compile import DSv4AttentionConfig, layouts
from dsv4_compile.config import YarnConfig
from dsv4_compile.rope import cos_sin_cache, inv_freq, layer_cos_sin_cache, yarn_correction_range


def test_flash_and_pro_presets_match_config_json():
    f = DSv4AttentionConfig.flash()
    assert (f.hidden_size, f.num_hidden_layers, f.num_attention_heads, f.q_lora_rank) == (4096, 43, 64, 1024)
    assert (f.o_groups, f.o_lora_rank, f.index_n_heads, f.index_topk) == (8, 1024, 64, 512)
    assert len(f.compress_ratios) == 44 and f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-2:] == (4, 0)
    assert f.compress_ratios.count(4) == 21 and f.compress_ratios.count(128) == 20
    p = DSv4AttentionConfig.pro()
    assert (p.hidden_size, p.num_attention_heads, p.q_lora_rank, p.o_groups, p.index_topk) == (7168, 128, 1536, 16, 1024)
    assert len(p.compress_ratios) == 62 and p.compress_ratios[:3] == (128, 128, 4) and p.compress_ratios[-1] == 0
    assert p.compress_ratios.count(128) == 31 and p.compress_ratios.count(4) == 30
    assert p.heads_per_group == f.heads_per_group == 8


def test_scales_are_the_spec_constants():
    f = DSv4AttentionConfig.flash()
    assert f.softmax_scale == pytest.approx(0.044194173824159, abs=1e-15)
    assert f.indexer_softmax_scale == pytest.approx(0.08838834764831845, abs=1e-17)
    assert f.indexer_head_scale == 0.125
    assert f.indexer_weight_scale == pytest.approx(0.011048543456039806, abs=1e-17)
    assert (f.rope_theta, f.compress_rope_theta, f.max_position_embeddings, f.rms_norm_eps) == (10000.0, 160000.0, 1048576, 1e-6)
    assert f.rope_scaling == YarnConfig(16.0, 65536, 32.0, 1.0)


def test_layer_rope_choice_follows_the_reference():
    f = DSv4AttentionConfig.flash()
    assert f.layer_rope(0) == (10000.0, None)  # SWA-only: no YaRN
    assert f.layer_rope(2) == (160000.0, f.rope_scaling)
    assert f.layer_rope(3) == (160000.0, f.rope_scaling)


def test_tiny_config_and_bad_configs():
    t = DSv4AttentionConfig.tiny()
    assert set(t.compress_ratios) == {0, 4, 128}
    with pytest.raises(ValueError, match="compress_ratios"):
        DSv4AttentionConfig(64, 1, 4, 32, 2, 16, 4, 8, compress_ratios=(0, 8))
    with pytest.raises(ValueError, match="entries"):
        DSv4AttentionConfig(64, 2, 4, 32, 2, 16, 4, 8, compress_ratios=(0, 4))


def test_yarn_ramp_indices():
    y = YarnConfig()
    assert yarn_correction_range(64, 160000.0, y) == (15, 25)
    assert yarn_correction_range(64, 10000.0, y) == (20, 33)


def test_yarn_frequencies_closed_form():
    f = inv_freq(64, 160000.0, YarnConfig())
    plain = inv_freq(64, 160000.0)
    for i in range(32):
        base = 160000.0 ** (-2 * i / 64)
        assert plain[i].item() == pytest.approx(base, rel=1e-15)
        ramp = min(max((i - 15) / 10, 0.0), 1.0)
        assert f[i].item() == pytest.approx(base / 16 * ramp + base * (1 - ramp), rel=1e-15)
    assert torch.equal(f[:16], plain[:16])  # pairs below the ramp keep their frequency
    assert torch.allclose(f[25:], plain[25:] / 16, rtol=1e-15, atol=0)  # pairs >= 25 fully divided


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_layout_is_cos_then_sin(dtype):
    tab = cos_sin_cache(64, 1000, 10000.0, dtype=dtype)
    assert tab.shape == (1000, 64) and tab.dtype == dtype
    assert torch.equal(tab[0, :32].float(), torch.ones(32)) and torch.equal(tab[0, 32:].float(), torch.zeros(32))
    for p, i in [(1, 0), (999, 0), (777, 5), (500, 31)]:
        ang = p * 10000.0 ** (-2 * i / 64)
        assert tab[p, i].item() == pytest.approx(math.cos(ang), abs=1e-6 if dtype == torch.float32 else 4e-3)
        assert tab[p, 32 + i].item() == pytest.approx(math.sin(ang), abs=1e-6 if dtype == torch.float32 else 4e-3)


def test_layer_table_and_validation():
    c = DSv4AttentionConfig.tiny()
    tab = layer_cos_sin_cache(c, 1, max_pos=300)
    assert torch.equal(tab, cos_sin_cache(64, 300, 160000.0, YarnConfig()))
    with pytest.raises(ValueError, match="fp32 or bf16"):
        cos_sin_cache(64, 10, 1e4, dtype=torch.float16)
    with pytest.raises(ValueError, match="even"):
        cos_sin_cache(63, 10, 1e4)


def test_layouts_page_sizes():
    assert layouts.FP8_DS_MLA_RECORD_BYTES == 584 and layouts.FP8_DS_MLA_TOKEN_BYTES == 576
    assert layouts.fp8_ds_mla_page_bytes(64) == 37440
    assert layouts.fp8_ds_mla_page_bytes(2) == 1728
    assert layouts.fp8_ds_mla_scale_offset(64) == 64 * 576
    assert layouts.INDEXER_FP8_RECORD_BYTES == 132 and layouts.INDEXER_MXFP4_RECORD_BYTES == 68
    assert layouts.indexer_page_bytes(64, "fp8") == 8640
    assert layouts.compressor_state_row_floats(4, 512) == 2048 and layouts.compressor_state_row_floats(128, 512) == 1024
    assert layouts.compressor_state_row_floats(4, 128) == 512

"""Configs from transformers: the config.json it writes, its DeepseekV4Config object, and what cannot
be mapped (refused with the key named, never dropped)."""

import json

import pytest
from transformers import DeepseekV4Config

from hybrid_attention import AttentionConfig, ModelConfig

TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1}


def hf_config(**changes) -> DeepseekV4Config:
    values = dict(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4,
                  num_attention_heads=4, head_dim=80, q_lora_rank=16, qk_rope_head_dim=16,
                  n_routed_experts=4, num_experts_per_tok=2, o_groups=2, o_lora_rank=8, index_n_heads=2,
                  index_head_dim=32, index_topk=3, sliding_window=8, layer_types=TYPES + [TYPES[1]],
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                  hc_mult=2, rope_parameters=dict(YARN), max_position_embeddings=128)
    return DeepseekV4Config(**{**values, **changes})


def test_a_transformers_config_object_its_json_and_deepseeks_format_read_the_same(tmp_path):
    config = hf_config()
    cfg = AttentionConfig.from_hf_config(config, quant="none")
    assert cfg.compress_ratios == [0, 4, 8, 4] and cfg.csa_ratio == 4 and cfg.n_layers == 4
    assert [cfg.layer_kind(i) for i in range(4)] == ["window", "csa", "hca", "csa"]
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.window_size) == (32, 4, 80, 16, 8)
    assert (cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow) == (4.0, 32, 32.0, 1.0)
    assert (cfg.rope_theta, cfg.compress_rope_theta) == (10000.0, 160000.0)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "compress_ratios" not in saved  # what transformers writes
    assert AttentionConfig.from_hf_config(tmp_path, quant="none") == cfg
    transformers_only = ("layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor")
    deepseek = {k: v for k, v in saved.items() if k not in transformers_only}
    deepseek.update(compress_ratios=[0, 4, 8, 4], rope_scaling={**YARN, "type": "yarn"})
    assert AttentionConfig.from_hf_config(deepseek, quant="none") == cfg
    # compress_ratios with YaRN only under rope_parameters: YaRN is read, not lost
    mixed = {**{k: v for k, v in saved.items() if k != "layer_types"}, "compress_ratios": [0, 4, 8, 4]}
    assert AttentionConfig.from_hf_config(mixed, quant="none") == cfg
    # the official default quant for checkpoints
    assert AttentionConfig.from_hf_config(config).quant == "official"
    model = ModelConfig.from_hf_config(config, quant="none", ffn_hidden=24)
    assert model.attention == cfg and model.vocab_size == 64 and model.ffn_hidden == 24
    assert ModelConfig.from_hf_config(config, quant="none").ffn_hidden == 16  # one shared expert


def test_transformers_defaults_and_plain_rope():
    cfg = AttentionConfig.from_hf_config(hf_config(rope_parameters=None, compress_rates=None,
                                                   layer_types=[TYPES[2]] * 4), quant="none")
    assert cfg.compress_ratios == [128] * 4 and cfg.original_seq_len == 0 and cfg.rope_factor == 1.0


@pytest.mark.parametrize("changes, key", [
    (dict(layer_types=[TYPES[0], "full_attention", TYPES[2], TYPES[1]]), "'layer_types' entry 1"),
    (dict(layer_types=TYPES), "'layer_types' has 3 entries"),
    (dict(compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 4}),
     "'compress_rates'"),
    (dict(compress_rates={"sliding_attention": 2}), "'compress_rates' has the layer type"),
    (dict(compress_ratios=[0, 4, 4, 4]), "'compress_ratios' .* and 'layer_types' .* disagree"),
    (dict(rope_parameters={"main": {"rope_type": "yarn", "factor": 2.0}, "compress": {}}),
     "'rope_parameters.main.rope_type'"),
    (dict(rope_parameters={"main": {}, "compress": {**YARN}}), "'rope_parameters.compress.attention_factor'"),
    (dict(rope_parameters={"main": {}, "compress": {**YARN, "attention_factor": 1.5}}),
     "'rope_parameters.compress.attention_factor' must be 1.0"),
    (dict(rope_parameters={"main": {}, "compress": {**YARN, "attention_factor": 1.0, "low_freq_factor": 1}}),
     "'rope_parameters.compress.low_freq_factor'"),
    (dict(rope_parameters={"main": {}, "compress": {"rope_type": "linear", "factor": 2.0}}),
     "'rope_parameters.compress.rope_type'"),
    (dict(rope_parameters={"main": {}}), "'rope_parameters' must hold both"),
    (dict(rope_scaling={**YARN, "factor": 8.0}), "'rope_scaling.factor' = 8.0 and .* disagree"),
    (dict(partial_rotary_factor=0.5), "'qk_rope_head_dim' gives 16 rotary dims, 'partial_rotary_factor'"),
    (dict(partial_rotary_factor=0.33), "'partial_rotary_factor' = 0.33 must be"),
    (dict(rope_theta=500.0), "'rope_theta' = 500.0 and 'rope_parameters.main.rope_theta'"),
    (dict(attention_bias=True), "'attention_bias'"),
    (dict(num_key_value_heads=2), "'num_key_value_heads'"),
], ids=lambda v: str(v)[:40])
def test_what_cannot_be_mapped_is_refused_by_key(changes, key):
    saved = json.loads(hf_config().to_json_string())
    with pytest.raises(ValueError, match=f"^config.json: .*{key}"):
        AttentionConfig.from_hf_config({**saved, **changes}, quant="none")


def test_a_flat_rope_parameters_dict_is_the_compressed_layers_yarn():
    saved = json.loads(hf_config().to_json_string())
    flat = {**saved, "rope_parameters": dict(YARN)}
    read = AttentionConfig.from_hf_config(flat, quant="none")
    assert read == AttentionConfig.from_hf_config(saved, quant="none") and read.rope_factor == 4.0


def test_an_object_that_is_no_config_is_refused():
    with pytest.raises(TypeError, match="a path or a dict, got list"):
        AttentionConfig.from_hf_config([1, 2])

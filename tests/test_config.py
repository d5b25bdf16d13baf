import json

import pytest

from hybrid_attention import AttentionConfig


def test_presets_have_the_real_shapes():
    pro = AttentionConfig.preset("v4-pro")
    assert (pro.dim, pro.n_heads, pro.head_dim, pro.q_lora_rank, pro.o_groups, pro.index_topk) == \
        (7168, 128, 512, 1536, 16, 1024)
    assert len(pro.compress_ratios) == 62 and pro.n_layers == 61
    kinds = [pro.layer_kind(i) for i in range(61)]
    assert kinds.count("csa") == 30 and kinds.count("hca") == 31 and kinds.count("window") == 0
    assert pro.layer_kind(61) == "window"  # the MTP block
    flash = AttentionConfig.preset("v4-flash")
    kinds = [flash.layer_kind(i) for i in range(43)]
    assert kinds[:2] == ["window", "window"] and kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert pro.quant == flash.quant == "official"
    small = AttentionConfig.preset("small")
    assert [small.layer_kind(i) for i in range(5)] == ["hca", "csa", "hca", "csa", "window"]
    assert small.quant == "none" and AttentionConfig.preset("tiny").quant == "none"


def test_full_kind_and_any_ratio():
    cfg = AttentionConfig.preset("tiny", compress_ratios=[16, 4, 0, "full", 3])
    assert [cfg.layer_kind(i) for i in range(5)] == ["hca", "csa", "window", "full", "hca"]
    assert cfg.compress_ratio(3) == 0 and cfg.compress_ratio(4) == 3


HF_V4 = {
    "hidden_size": 4096, "num_hidden_layers": 43, "num_nextn_predict_layers": 1,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "rope_theta": 10000,
    "compress_rope_theta": 160000, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1, "type": "yarn"},
}


def test_from_hf_config_matches_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_V4))
    assert AttentionConfig.from_hf_config(path) == AttentionConfig.preset("v4-flash")
    assert AttentionConfig.from_hf_config(tmp_path) == AttentionConfig.preset("v4-flash")


def test_from_hf_config_names_the_missing_key():
    broken = {k: v for k, v in HF_V4.items() if k != "qk_rope_head_dim"}
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        AttentionConfig.from_hf_config(broken)


@pytest.mark.parametrize("changes, field", [
    (dict(head_dim=33, rope_head_dim=16), "head_dim"),
    (dict(rope_head_dim=64), "rope_head_dim"),
    (dict(index_head_dim=48), "index_head_dim"),
    (dict(index_topk=0), "index_topk"),
    (dict(o_groups=3), "o_groups"),
    (dict(quant="fp8"), "quant"),
    (dict(compress_ratios=[4, 1]), "compress_ratios"),
    (dict(compress_ratios=["dense"]), "compress_ratios"),
    (dict(window_size=0), "window_size"),
    (dict(query_block_size=-1), "query_block_size"),
], ids=lambda v: str(v))
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        AttentionConfig.preset("tiny", **changes)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'v5'"):
        AttentionConfig.preset("v5")


def test_hadamard_off_allows_other_index_dims():
    cfg = AttentionConfig.preset("tiny", index_head_dim=48, hadamard=False)
    assert cfg.index_head_dim == 48

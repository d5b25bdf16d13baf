import json
import re
from dataclasses import fields

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hybrid_attention import AttentionConfig, ModelConfig
from hybrid_attention.config import ConfigError
from hybrid_attention.rope import layer_rope_frequencies


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


# Field validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("rope_theta", -1.0), ("rope_theta", 0.0), ("rope_theta", 1.0), ("rope_theta", float("nan")),
    ("rope_theta", float("inf")), ("rope_theta", "10000"), ("rope_theta", True),
    ("compress_rope_theta", 0), ("compress_rope_theta", -160000.0),
    ("rope_factor", 0.5), ("rope_factor", float("nan")),
    ("beta_fast", 1.0), ("beta_fast", 0.5), ("beta_fast", float("inf")), ("beta_slow", 0.0),
    ("norm_eps", 0.0), ("norm_eps", -1e-6), ("norm_eps", float("nan")),
    ("original_seq_len", -1), ("original_seq_len", 64.0), ("original_seq_len", 2**60),
    ("dim", True), ("dim", 64.0), ("n_heads", "4"), ("head_dim", None), ("window_size", 8.5),
    ("index_topk", True), ("index_topk", 0), ("csa_ratio", True), ("csa_ratio", 4.0),
    ("n_layers", True), ("n_layers", 9), ("max_seq_len", 0), ("query_block_size", False),
    ("hadamard", 1), ("fp8_gemm_inputs", "yes"), ("quant", None), ("quant", ["none"]),
    ("compress_ratios", 5), ("compress_ratios", "4804"), ("compress_ratios", [4, True]),
    ("compress_ratios", [4, 8.0]), ("rope_head_dim", 15), ("o_groups", 3),
], ids=lambda v: repr(v))
def test_bad_field_values_are_refused_by_name_and_value(field, value):
    with pytest.raises(ValueError, match=rf"AttentionConfig\.{field}: ") as info:
        AttentionConfig.preset("tiny", **{field: value})
    assert info.value.field == field
    if not isinstance(value, list):
        assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_ints_where_floats_belong_are_accepted():
    cfg = AttentionConfig.preset("tiny", rope_theta=500, compress_rope_theta=160000, rope_factor=4,
                                 beta_fast=32, beta_slow=1)
    assert cfg.rope_theta == 500


@pytest.mark.parametrize("changes, field", [
    (dict(attention={"dim": 64}), "attention"), (dict(vocab_size=True), "vocab_size"),
    (dict(vocab_size=0), "vocab_size"), (dict(ffn_hidden=128.0), "ffn_hidden"),
])
def test_bad_model_config_values_are_refused_by_name(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: "):
        ModelConfig.preset("tiny", **changes)


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="AttentionConfig has no field 'windw_size'"):
        AttentionConfig.preset("tiny", windw_size=4)
    with pytest.raises(ValueError, match="has no field 'dims'"):
        AttentionConfig.preset("tiny").replace(dims=4)
    with pytest.raises(ValueError, match="ModelConfig has no field 'vocab'"):
        ModelConfig.preset("tiny", vocab=3)
    with pytest.raises(ValueError, match="unknown preset"):
        AttentionConfig.preset(["tiny"])


def test_layer_kind_wants_an_int_in_range():
    cfg = AttentionConfig.preset("tiny")
    with pytest.raises(TypeError, match="layer_id must be an int, got '0'"):
        cfg.layer_kind("0")
    with pytest.raises(TypeError, match="layer_id"):
        cfg.compress_ratio(True)
    with pytest.raises(ValueError, match="layer_id 4 is outside"):
        cfg.layer_kind(4)


FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3), st.lists(st.integers(-1, 9), max_size=3),
    st.sampled_from(["full", "none", "official"]),
)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(f.name for f in fields(AttentionConfig))),
                               FIELD_VALUES, min_size=1, max_size=3))
@example(changes={"rope_factor": 2**64})  # an int past int64 reached a torch op (OverflowError)
@example(changes={"compress_rope_theta": 2**64})
def test_any_field_values_give_a_usable_config_or_a_value_error(changes):
    """Random values (of any type) for a few fields: a ValueError naming a field, or a config whose
    RoPE tables are finite and whose fingerprint can be written; never another exception."""
    try:
        cfg = AttentionConfig.preset("tiny", **changes)
    except ValueError as err:
        assert isinstance(err, ConfigError) and err.field in AttentionConfig.__dataclass_fields__
        return
    for compressed in (False, True):
        assert torch.isfinite(layer_rope_frequencies(cfg, compressed)).all()
    json.loads(cfg.fingerprint())
    assert [cfg.layer_kind(i) for i in range(cfg.n_total_layers)]


# config.json files ---------------------------------------------------------------------------


def write(tmp_path, text: str, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("changes, key, message", [
    (dict(hidden_size="abc"), "hidden_size", 'must be an integer, got "abc"'),
    (dict(hidden_size="4096"), "hidden_size", 'must be an integer, got "4096"'),  # no coercion
    (dict(hidden_size=None), "hidden_size", "must be an integer, got null"),
    (dict(hidden_size=4096.0), "hidden_size", "must be an integer, got 4096.0"),
    (dict(num_attention_heads=True), "num_attention_heads", "must be an integer, got true"),
    (dict(num_hidden_layers=0), "num_hidden_layers", "must be an integer >= 1, got 0"),
    (dict(num_hidden_layers="43"), "num_hidden_layers", "must be an integer"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers", "must be an integer >= 0"),
    (dict(num_key_value_heads=8), "num_key_value_heads", "must be 1"),
    (dict(num_key_value_heads="1"), "num_key_value_heads", "must be an integer"),
    (dict(rope_theta=None), "rope_theta", "must be a finite number, got null"),
    (dict(rope_theta="1e4"), "rope_theta", 'must be a finite number, got "1e4"'),
    (dict(rope_theta=-1), "rope_theta", r"\(AttentionConfig.rope_theta\): must be a finite number > 1"),
    (dict(rms_norm_eps=[1e-6]), "rms_norm_eps", "must be a finite number"),
    (dict(rms_norm_eps=0), "rms_norm_eps", r"\(AttentionConfig.norm_eps\): must be a positive"),
    (dict(compress_rope_theta=10**400), "compress_rope_theta", "must be a finite number"),
    (dict(sliding_window=0), "sliding_window", r"\(AttentionConfig.window_size\)"),
    (dict(o_groups=7), "o_groups", "must divide n_heads=64"),
    (dict(rope_scaling=[16]), "rope_scaling", "must be an object, got \\[16\\]"),
    (dict(rope_scaling="yarn"), "rope_scaling", "must be an object"),
    (dict(rope_scaling={"factor": "16"}), "rope_scaling.factor", 'must be a finite number, got "16"'),
    (dict(rope_scaling={"factor": 0.5}), "rope_scaling.factor", r"\(AttentionConfig.rope_factor\)"),
    (dict(rope_scaling={"original_max_position_embeddings": 65536.5}),
     "rope_scaling.original_max_position_embeddings", "must be an integer, got 65536.5"),
    (dict(rope_scaling={"beta_fast": 1, "beta_slow": 32}), "rope_scaling.beta_fast", "beta_slow=32.0"),
    (dict(compress_ratios=None), "compress_ratios", "must be a list, got null"),
    (dict(compress_ratios={"0": 4}), "compress_ratios", "must be a list"),
    (dict(compress_ratios=[0, 0] + ["4", 128] * 20 + [4, 0]), "compress_ratios", "entry 2 must be"),
    (dict(compress_ratios=[0, 4]), "compress_ratios", "has 2 entries, 'num_hidden_layers' is 43"),
], ids=lambda v: str(v)[:40])
def test_bad_values_in_a_config_file_name_the_file_and_the_key(tmp_path, changes, key, message):
    path = write(tmp_path, json.dumps({**HF_V4, **changes}))
    with pytest.raises(ValueError) as info:
        AttentionConfig.from_hf_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and (f"'{key}'" in text or key in text), text
    assert re.search(message, text), text
    with pytest.raises(ValueError, match=f"^config.json: .*{key}"):  # a parsed dict: the same, as config.json
        AttentionConfig.from_hf_config({**HF_V4, **changes})


@pytest.mark.parametrize("text, message", [
    ("[1, 2, 3]", r"must hold a JSON object, got \[1, 2, 3\]"),
    ('"config"', "must hold a JSON object"),
    ("null", "must hold a JSON object, got null"),
    ('{"hidden_size": 4096,', "not valid JSON .*line 1, column"),
    ("", "not valid JSON"),
])
def test_malformed_config_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
        AttentionConfig.from_hf_config(path)


def test_missing_unreadable_and_binary_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'nope.json'))}: cannot read"):
        AttentionConfig.from_hf_config(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"config.json: cannot read"):  # a folder without a config.json
        AttentionConfig.from_hf_config(tmp_path)
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="binary.json: the config file is not UTF-8"):
        AttentionConfig.from_hf_config(path)
    with pytest.raises(TypeError, match="a path or a dict, got int"):
        AttentionConfig.from_hf_config(3)


def test_missing_keys_and_null_rope_scaling(tmp_path):
    for key in ("hidden_size", "compress_ratios", "num_hidden_layers", "index_topk"):
        path = write(tmp_path, json.dumps({k: v for k, v in HF_V4.items() if k != key}))
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is missing the key '{key}'"):
            AttentionConfig.from_hf_config(path)
    plain = AttentionConfig.from_hf_config({**HF_V4, "rope_scaling": None})  # HF writes null: no YaRN
    assert plain.rope_factor == 1.0 and plain.original_seq_len == 0
    with pytest.raises(ValueError, match="has no field 'windows'"):
        AttentionConfig.from_hf_config(HF_V4, windows=3)
    # An override that is bad is blamed on the override, not on the file.
    with pytest.raises(ValueError, match=r"^AttentionConfig.window_size: "):
        AttentionConfig.from_hf_config(HF_V4, window_size=0)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4)
HF_KEY_NAMES = sorted(set(HF_V4) | {"num_key_value_heads"})
ROPE_KEY_NAMES = ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow"]


@settings(max_examples=300, deadline=None)
@given(top=st.dictionaries(st.sampled_from(HF_KEY_NAMES), JSON_VALUES, max_size=2),
       rope=st.dictionaries(st.sampled_from(ROPE_KEY_NAMES), JSON_VALUES, max_size=2))
def test_any_config_json_values_give_a_config_or_a_value_error_naming_a_key(top, rope):
    hf = {**HF_V4, **top}
    if rope and isinstance(hf.get("rope_scaling"), dict):
        hf["rope_scaling"] = {**hf["rope_scaling"], **rope}
    try:
        cfg = AttentionConfig.from_hf_config(hf)
    except ValueError as err:
        assert str(err).startswith("config.json")
        assert any(key in str(err) for key in [*HF_KEY_NAMES, *ROPE_KEY_NAMES]), err
        return
    assert torch.isfinite(layer_rope_frequencies(cfg, compressed=True)).all()

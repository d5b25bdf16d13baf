"""The planner: formulas against hand counts, against the bytes of real LayerState tensors, against
DeepSeek's published ratios, and every bad-input path of `hybrid-attention plan`."""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention import AttentionConfig, HybridAttention, HybridTransformer, ModelConfig
from hybrid_attention import planner as P
from hybrid_attention.cli import main

M = 1 << 20

# A config small enough to count by hand: layer 0 CSA (r=4), 1 HCA (r=8), 2 window, 3 full.
# A KV row is 64 non-rope + 16 rope dims: FP8 64 B + one ue8m0 scale + 32 B rope = 97 -> 100 B;
# bf16 160 B. An indexer key of 32 dims: FP4 16 B + one scale = 17 -> 20 B; bf16 64 B.
HAND = AttentionConfig(dim=64, n_heads=4, head_dim=80, rope_head_dim=16, q_lora_rank=32, o_groups=2,
                       o_lora_rank=32, window_size=8, index_n_heads=4, index_head_dim=32, index_topk=4,
                       compress_ratios=[4, 8, 0, "full"])
ROW, KEY = 100, 20
CSA_TAIL = 2 * (8 * 160) * 4 + 2 * (8 * 64) * 4  # kv + score of [2r, 2d] and of [2r, 2*index_dim], fp32
HCA_TAIL = 2 * (8 * 80) * 4  # kv + score of [r, d]


@pytest.fixture(scope="module")
def models():
    return {name: P.load_preset(name) for name in ("v4-pro", "v4-flash", "v3.2", "llama-3.1-70b")}


def run_cli(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# Storage formats --------------------------------------------------------------------------------


def test_row_bytes_match_the_published_layouts():
    assert P.FORMATS["fp8"].row_bytes(512, 64) == 584  # 448 FP8 + 7 scales + 128 rope bytes + 1 pad
    assert P.FORMATS["fp4"].row_bytes(128) == 68  # 64 packed bytes + 4 scales
    assert P.FORMATS["fp8-b128"].row_bytes(576, 64) == 656  # FlashMLA: 512 + 4 fp32 scales + 128
    assert P.FORMATS["fp8-b128"].row_bytes(128) == 132  # V3.2 indexer key
    assert P.FORMATS["bf16"].row_bytes(576, 64) == 1152
    assert P.FORMATS["fp8"].row_bytes(80, 16) == ROW and P.FORMATS["fp4"].row_bytes(32) == KEY


# KV cache: hand counts --------------------------------------------------------------------------


@pytest.mark.parametrize("context, expected", [
    # 10 tokens: longer than the window (8 rows kept), not a multiple of either ratio.
    pytest.param(10, [
        {"window": 8 * ROW, "csa_compressed": 2 * ROW, "csa_indexer_keys": 2 * KEY,
         "compressor_tail": CSA_TAIL},
        {"window": 8 * ROW, "hca_compressed": 1 * ROW, "compressor_tail": HCA_TAIL},
        {"window": 8 * ROW},
        {"full": 10 * ROW},
    ], id="L10"),
    # 5 tokens: shorter than the window, one CSA entry, no HCA entry yet.
    pytest.param(5, [
        {"window": 5 * ROW, "csa_compressed": ROW, "csa_indexer_keys": KEY, "compressor_tail": CSA_TAIL},
        {"window": 5 * ROW, "compressor_tail": HCA_TAIL},
        {"window": 5 * ROW},
        {"full": 5 * ROW},
    ], id="L5"),
    # 3 tokens: shorter than the CSA ratio, nothing compressed.
    pytest.param(3, [
        {"window": 3 * ROW, "compressor_tail": CSA_TAIL},
        {"window": 3 * ROW, "compressor_tail": HCA_TAIL},
        {"window": 3 * ROW},
        {"full": 3 * ROW},
    ], id="L3"),
])
def test_kv_per_layer_by_hand(context, expected):
    layers = P.kv_cache_bytes_per_layer(HAND, context, batch=2)
    assert [layer["kind"] for layer in layers] == ["csa", "hca", "window", "full"]
    assert [layer["bytes_by_type"] for layer in layers] == [{k: 2 * v for k, v in e.items()}
                                                            for e in expected]
    totals = P.kv_cache_bytes_by_type(HAND, context, batch=2)
    assert set(totals) == set(P.HYBRID_TYPES)
    hand_total = 2 * sum(sum(e.values()) for e in expected)
    assert sum(totals.values()) == P.kv_cache_bytes(HAND, context, 2) == hand_total


def test_precision_overrides():
    bf16 = P.kv_cache_bytes_by_type(HAND, 10, precisions={"all": "bf16"})
    assert bf16 == {"window": 3 * 8 * 160, "csa_compressed": 2 * 160, "csa_indexer_keys": 2 * 64,
                    "hca_compressed": 160, "compressor_tail": CSA_TAIL + HCA_TAIL, "full": 10 * 160}
    mixed = P.kv_cache_bytes_by_type(HAND, 10, precisions={"all": "bf16", "csa_indexer_keys": "fp4",
                                                           "compressor_tail": "bf16"})
    assert mixed["csa_indexer_keys"] == 2 * KEY and mixed["compressor_tail"] == (CSA_TAIL + HCA_TAIL) // 2
    assert mixed["window"] == bf16["window"]
    # Overrides for types a model lacks are ignored, so one set serves a model and its baseline.
    assert P.resolve_precisions(HAND, {"mla_latent": "bf16"}) == P.resolve_precisions(HAND)
    defaults = P.resolve_precisions(P.load_preset("v4-pro"))
    assert defaults == {"window": "fp8", "csa_compressed": "fp8", "csa_indexer_keys": "fp4",
                        "hca_compressed": "fp8", "compressor_tail": "fp32", "full": "fp8"}


def test_mla_and_gqa_by_hand(models):
    v32, llama = models["v3.2"], models["llama-3.1-70b"]
    assert P.kv_cache_bytes_by_type(v32, 1000) == {"mla_latent": 61 * 1000 * 656,
                                                   "mla_indexer_keys": 61 * 1000 * 132}
    assert P.kv_cache_bytes(v32, 1000, precisions={"all": "bf16"}) == 61 * 1000 * (1152 + 256)
    assert P.kv_cache_bytes(v32, 1000, include_mtp=True) == 62 * 1000 * (656 + 132)
    # 80 layers x K and V x 8 KV heads x 128 dims x 2 bytes = 320 KiB per token.
    assert P.kv_cache_bytes_by_type(llama, 3, batch=2) == {"kv": 2 * 3 * 80 * 2 * 8 * 128 * 2}
    mha = P.model_from_hf_config({"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4})
    assert mha.family == "mha" and P.kv_cache_bytes(mha, 7) == 2 * 7 * 2 * 4 * 64 * 2


# KV cache: the bytes of real tensors ------------------------------------------------------------


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_layer_state_bytes_match_real_tensors(dtype, name):
    """Stream chunks through every layer of the tiny preset and compare LayerState.nbytes_by_type()
    with the prediction after each chunk (lengths cross the window and both ratios)."""
    cfg = AttentionConfig.preset("tiny")
    batch, chunks = 2, [3, 1, 6, 1, 13, 1, 1, 7]
    torch.manual_seed(0)
    with torch.no_grad():
        for layer_id in range(cfg.n_total_layers):
            layer = HybridAttention(cfg, layer_id, dtype=dtype)
            state = layer.new_state(batch)
            assert state.nbytes_by_type() == P.layer_state_bytes_by_type(cfg, layer_id, 0, batch, name)
            for size in chunks:
                layer(torch.randn(batch, size, cfg.dim, dtype=dtype), state=state)
                predicted = P.layer_state_bytes_by_type(cfg, layer_id, state.pos, batch, name)
                assert state.nbytes_by_type() == predicted, (cfg.layer_kind(layer_id), state.pos)
    assert state.pos == sum(chunks)


def test_layer_state_and_cache_prediction_agree_past_the_window():
    """Once the ring is full, the bf16 LayerState holds exactly the planner's bf16 cache."""
    cfg = AttentionConfig.preset("tiny")
    for context in (cfg.window_size, 33, 100):
        state_total = sum(sum(P.layer_state_bytes_by_type(cfg, i, context, 3).values())
                          for i in range(cfg.n_total_layers))
        assert state_total == P.kv_cache_bytes(cfg, context, 3, precisions={"all": "bf16"})


# FLOPs ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), ratio=st.integers(1, 9), window=st.sampled_from([0, 1, 5, 16]),
       topk=st.sampled_from([0, 1, 3, 20]))
def test_key_count_sums_match_brute_force(n, ratio, window, topk):
    keys = P.KeyCount(ratio=ratio, window=window, topk=topk)
    assert keys.summed(n) == sum(keys.at(m) for m in range(1, n + 1))


def test_attention_flops_by_hand():
    c = HAND
    per_key = 4 * c.n_heads * c.head_dim  # q.k and p.v, 2 FLOPs per multiply-add
    # wq_a [32, 64], wq_b [4*80, 32], wkv [80, 64], wo_a 2 groups of [32, 2*80], wo_b [64, 2*32]
    projections = 2 * (64 * 32 + 32 * 4 * 80 + 64 * 80 + 2 * 32 * 2 * 80 + 64 * 2 * 32)
    at10 = P.decode_flops(c, 10)
    assert at10["projections"] == 4 * projections
    assert at10["window_attention"] == 3 * 8 * per_key  # three windowed layers, 8 rows each
    assert at10["full_attention"] == 10 * per_key
    assert at10["compressed_attention"] == 2 * per_key + 1 * per_key  # CSA: min(4, 10 // 4); HCA: 10 // 8
    assert at10["indexer_scoring"] == 2 * (2 * 4 * 32 + 2 * 4)  # 2 keys x (4 heads x 32 dims + weights)
    assert at10["topk"] == 2
    at5 = P.decode_flops(c, 5)  # shorter than the window
    assert at5["window_attention"] == 3 * 5 * per_key and at5["compressed_attention"] == per_key
    at30 = P.decode_flops(c, 30)  # the top-k cap binds: 7 entries visible, 4 used
    assert at30["compressed_attention"] == 4 * per_key + 3 * per_key


def test_prefill_is_the_sum_of_decode_steps(models):
    for model in (HAND, models["v4-flash"], models["v3.2"]):
        attention = lambda d: P.attention_only(d)
        tokens = 700
        steps = sum(attention(P.decode_flops(model, n)) for n in range(1, tokens + 1))
        assert attention(P.prefill_flops(model, tokens)) == steps
    flash = models["v4-flash"]
    head = 2 * flash.dim * flash.vocab_size
    whole = sum(sum(P.decode_flops(flash, n).values()) for n in range(1, 51))
    assert sum(P.prefill_flops(flash, 50).values()) == whole - 49 * head  # logits of the last token only


def test_whole_model_flops(models):
    pro = models["v4-pro"]
    flops = P.decode_flops(pro, 4096)
    assert flops["lm_head"] == 2 * 7168 * 129280
    assert flops["ffn"] == 61 * 2 * 3 * 7168 * 3072 * 7  # 6 routed + 1 shared expert per layer
    v32 = P.decode_flops(models["v3.2"], 4096)
    assert v32["ffn"] == 2 * 3 * 7168 * (3 * 18432 + 58 * 9 * 2048)  # 3 dense layers, then 8 + 1 experts
    assert P.decode_flops(HAND, 10).keys() <= set(P.ATTENTION_COMPONENTS)  # attention-only config
    weighted = P.decode_flops(pro, M, accounting="bf16-equivalent")
    plain = P.decode_flops(pro, M)
    assert weighted["compressed_attention"] == plain["compressed_attention"]  # bf16
    assert weighted["ffn"] == plain["ffn"] / 2  # FP8 activations x FP4 / FP8 weights: the FP8 rate


def test_decode_bytes_read_by_hand():
    # At 30 tokens: CSA reads 8 window rows, the top 4 of 7 entries, all 7 indexer keys and its tail;
    # HCA 8 rows, 3 entries and its tail; the window layer 8 rows; the full layer 30 rows.
    expected = (8 + 4) * ROW + 7 * KEY + CSA_TAIL + (8 + 3) * ROW + HCA_TAIL + 8 * ROW + 30 * ROW
    assert P.decode_bytes_read(HAND, 30) == expected


# Full models ------------------------------------------------------------------------------------


def test_shipped_v4_configs_match_the_attention_presets(models):
    for preset in ("v4-pro", "v4-flash"):
        assert asdict(models[preset].attention) == asdict(AttentionConfig.preset(preset))
        assert models[preset].n_mtp_layers == 1


def test_parameter_counts_match_the_published_sizes(models):
    """Total / activated parameters as DeepSeek and Meta state them: 1.6T / 49B, 284B / 13B,
    671B / 37B, 70B (activated counts include the embedding, so they land a little above)."""
    for name, total, activated in (("v4-pro", 1.6e12, 49e9), ("v4-flash", 284e9, 13e9),
                                   ("v3.2", 671e9, 37e9), ("llama-3.1-70b", 70.6e9, 70.6e9)):
        counts = P.parameter_counts(models[name])
        assert counts["total"] == pytest.approx(total, rel=0.02), name
        assert counts["activated"] == pytest.approx(activated, rel=0.07), name
    # The Flash checkpoint (with its MTP block) is about 160 GB on disk.
    assert P.weights_bytes(models["v4-flash"], include_mtp=True) == pytest.approx(160e9, rel=0.03)
    llama = models["llama-3.1-70b"]
    assert P.weights_bytes(llama) == 2 * P.parameter_counts(llama)["total"]  # all bf16


def test_deepseek_claims_at_one_million_tokens(models):
    """V4-Pro: ~10% of V3.2's KV cache and ~27% of its single-token FLOPs; V4-Flash: ~7% and ~10%
    (docs/planner.md explains the assumptions). FLOPs are bf16-equivalent; the plain count is
    recorded too."""
    pro, flash, v32 = models["v4-pro"], models["v4-flash"], models["v3.2"]
    ratio = lambda f, model: f(model) / f(v32)
    kv = lambda m, mtp=False: P.kv_cache_bytes(m, M, include_mtp=mtp)
    flops = lambda m, acc="bf16-equivalent": sum(P.decode_flops(m, M, accounting=acc).values())
    assert round(100 * ratio(flops, pro)) == 27 and round(100 * ratio(flops, flash)) == 10
    assert round(100 * ratio(kv, flash)) == 7
    assert 0.100 <= ratio(kv, pro) < 0.1055  # 10.51%: the main stacks alone sit on the rounding edge
    assert round(100 * ratio(lambda m: kv(m, True), pro)) == 10  # with the MTP blocks' caches: 10.3%
    plain = lambda m: flops(m, "plain")
    assert 0.255 < ratio(plain, pro) < 0.265 and 0.115 < ratio(plain, flash) < 0.125


# Parsing and the memory fit ---------------------------------------------------------------------


@pytest.mark.parametrize("text, tokens", [("128K", 131072), ("1M", M), ("1048576", M), ("1m", M),
                                          ("1.5K", 1536), (" 4096 ", 4096), (7, 7)])
def test_parse_context(text, tokens):
    assert P.parse_context(text) == tokens


@pytest.mark.parametrize("text", ["-5", "0", "abc", "1.2345K", "1T", "", "12 tokens"])
def test_parse_context_refuses(text):
    with pytest.raises(ValueError, match="context must be"):
        P.parse_context(text)


def test_memory_and_gpu_parsing():
    assert P.parse_memory("80GiB") == 80 * P.GiB and P.parse_memory("80GB") == 80 * 10**9
    assert P.parse_memory("1.5TiB") == 3 * P.TiB // 2 and P.parse_memory("1024") == 1024
    assert P.gpu_memory("h100-80gb") == ("H100-80GB", 80 * P.GiB)
    assert P.gpu_memory("8xH200-141GB") == ("8xH200-141GB", 8 * 141 * P.GiB)
    for bad in ("-3GB", "lots", "80 GiBs"):
        with pytest.raises(ValueError, match="memory must be"):
            P.parse_memory(bad)


def test_longest_context_is_the_boundary(models):
    llama = models["llama-3.1-70b"]
    fit = P.longest_context(llama, 2 * 80 * P.GiB, batch=2)
    n, free = fit["memory_limit_context"], 2 * 80 * P.GiB - P.weights_bytes(llama)
    assert P.kv_cache_bytes(llama, n, 2) <= free < P.kv_cache_bytes(llama, n + 1, 2)
    assert fit["longest_context"] == n < llama.max_position_embeddings
    assert P.longest_context(llama, 80 * P.GiB)["longest_context"] == 0  # 131 GiB of weights
    pro = P.longest_context(models["v4-pro"], 8 * 141 * P.GiB)
    assert pro["longest_context"] == M < pro["memory_limit_context"]  # capped at the trained context
    window_only = AttentionConfig.preset("tiny", compress_ratios=[0, 0])
    assert P.longest_context(P.as_model(window_only), P.GiB)["unbounded"]


# The command line -------------------------------------------------------------------------------


def test_cli_json_schema(capsys):
    code, out, _ = run_cli(capsys, "--preset", "v4-flash", "--baseline", "v3.2", "--context", "128K",
                           "--json", "--gpu", "B200-180GB")
    assert code == 0
    report = json.loads(out)
    flash, v32 = report["models"]
    for entry in (flash, v32):
        assert {"model", "context", "kv_cache_bytes", "kv_cache_bytes_by_type", "decode_flops_per_token",
                "attention_decode_flops_per_token", "prefill_flops", "decode_bytes_read_per_token",
                "weights_bytes"} <= set(entry)
        assert entry["context"] == 131072
        assert entry["kv_cache_bytes"] == sum(entry["kv_cache_bytes_by_type"].values())
    assert flash["model"] == "DeepSeek-V4-Flash" and v32["model"] == "DeepSeek-V3.2"
    assert set(report["ratio_to_baseline"]) >= {"kv_cache_bytes", "decode_flops_per_token", "prefill_flops"}
    assert report["ratio_to_baseline"]["kv_cache_bytes"] == flash["kv_cache_bytes"] / v32["kv_cache_bytes"]
    fits = {f["model"]: f for f in report["fit"]["models"]}
    assert fits["DeepSeek-V4-Flash"]["longest_context"] > 0 and fits["DeepSeek-V3.2"]["longest_context"] == 0


def test_cli_table_plot_and_config_file(capsys, tmp_path):
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(shipped("llama-3.1-70b.json")))
    png = tmp_path / "plan.png"
    code, out, _ = run_cli(capsys, "--config", str(path.parent), "--baseline", "tiny", "--context", "4096",
                           "--precision", "kv=fp8-tensor", "--plot", str(png), "--per-layer")
    assert code == 0 and png.stat().st_size > 10_000
    assert "model" in out.splitlines()[0] and "kv" in out and "layer  79" in out
    assert f"{80 * 4096 * 2 * 8 * 128 / P.MiB:.3g} MiB fp8-tensor" in out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "v9"], "argument --preset: invalid choice: 'v9'"),
    (["--preset", "v4-pro", "--context", "-5"], "argument --context: must be a positive whole number"),
    (["--preset", "v4-pro", "--context", "lots"], "argument --context: must be a positive whole number"),
    (["--preset", "v4-pro", "--gpu", "H900-1TB"], "unknown GPU 'H900-1TB'"),
    (["--preset", "v4-pro", "--memory", "big"], "memory must be"),
    (["--preset", "v4-pro", "--baseline", "v2"], "'v2' is neither a known preset"),
    (["--preset", "v4-pro", "--precision", "window"], "TYPE=FORMAT"),
    (["--preset", "v4-pro", "--precision", "window=fp6"], "unknown storage format 'fp6'"),
    (["--preset", "v4-pro", "--precision", "ring=fp8"], "unknown storage type 'ring'"),
    (["--preset", "v4-pro", "--precision", "compressor_tail=fp8"], "compressor_tail"),
    (["--preset", "v4-pro", "--batch", "0"], "argument --batch: must be an integer >= 1"),
    (["--config", "/nonexistent/config.json"], "no config file"),
])
def test_cli_refuses_bad_input(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and "hybrid-attention plan: error:" in err


@pytest.mark.parametrize("drop", ["index_topk", "hidden_size", "o_groups", "num_experts_per_tok",
                                  "vocab_size"])
def test_config_missing_a_key_names_it(capsys, tmp_path, drop):
    hf = shipped("deepseek-v4-flash.json")
    del hf[drop]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    code, _, err = run_cli(capsys, "--config", str(path))
    assert code == 2 and repr(drop) in err and "missing" in err


def shipped(name: str) -> dict:
    return json.loads(resources.files("hybrid_attention").joinpath("configs", name).read_text())


@pytest.mark.parametrize("name, drop", [
    ("deepseek-v4-pro.json", "compress_ratios"), ("deepseek-v3.2.json", "kv_lora_rank"),
    ("deepseek-v3.2.json", "v_head_dim"), ("deepseek-v3.2.json", "index_head_dim"),
    ("deepseek-v3.2.json", "intermediate_size"), ("llama-3.1-70b.json", "num_attention_heads"),
])
def test_every_family_names_a_missing_key(name, drop):
    hf = shipped(name)
    del hf[drop]
    with pytest.raises(ValueError, match=f"missing the key '{drop}'"):
        P.model_from_hf_config(hf)


def test_attention_only_config():
    hf = {k: v for k, v in shipped("deepseek-v4-flash.json").items()
          if k not in ("vocab_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")}
    model = P.model_from_hf_config(hf)
    assert not model.whole_model and P.plan(model, 4096)["decode_flops_per_token"] is None
    assert P.plan(model, 4096)["attention_decode_flops_per_token"] > 0


@pytest.mark.parametrize("key, value", [("hidden_size", "4096"), ("num_hidden_layers", 0),
                                        ("index_topk", -1), ("vocab_size", True), ("q_lora_rank", 1.5)])
def test_config_sizes_must_be_integers(capsys, tmp_path, key, value):
    hf = shipped("deepseek-v3.2.json")
    hf[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    code, out, err = run_cli(capsys, "--config", str(path))
    assert code == 2 and out == ""
    assert f"{path}: config.json: {key!r} must be an integer >= " in err


# Serving memory (what `hybrid-attention generate` checks) ---------------------------------------


def test_engine_memory_counts_the_module_and_its_step():
    cfg = ModelConfig.preset("tiny")
    est = P.engine_memory(cfg, context=100, batch=2, tokens_per_step=32, cache_bytes=M, score_values=1000)
    assert est["weights"] == 4 * sum(p.numel() for p in HybridTransformer(cfg).parameters())
    att = cfg.attention
    per_token = 4 * att.dim + 3 * att.n_heads * att.head_dim + 3 * cfg.ffn_hidden  # 1600 values
    assert est["activations"] == 32 * per_token * 4 + 1000 * 4
    assert est["total"] == est["weights"] + M + est["activations"]
    with torch.device("meta"):  # v4-flash: the ~56 GiB that `generate --preset v4-flash` would allocate
        flash = ModelConfig.preset("v4-flash")
        params = sum(p.numel() for p in HybridTransformer(flash).parameters())
    assert P.engine_memory(flash, 1, 1, 1, 1, 0)["weights"] == 4 * params > 56 * P.GiB


@pytest.mark.parametrize("quant", ["none", "official"])
def test_engine_memory_cache_against_the_engine(quant):
    from hybrid_attention.engine import Engine

    cfg = ModelConfig.preset("tiny", attention=AttentionConfig.preset("tiny", quant=quant))
    engine = Engine(HybridTransformer(cfg), cache_bytes=4 * M, max_batch=2, prefill_chunk=32)
    results = engine.generate([list(range(96)), list(range(100, 196))], max_new_tokens=4)
    measured = sum(results[0].cache_bytes.values())
    # The last token is sampled, never fed: 99 tokens are in the cache.
    predicted = P.engine_memory(cfg, 99, 1, 32, 4 * M, 0)["cache_needed"]
    assert predicted == measured  # with quant="official": FP8 rows whose rope dims stay fp32
    assert P.engine_memory(cfg, 99, 2, 32, 4 * M, 0)["cache_needed"] == 2 * predicted

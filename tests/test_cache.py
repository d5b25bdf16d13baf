"""The paged cache: real FP8 / FP4 bytes equal the fake-quant path, pools, accounting, refusals."""

import pytest
import torch
from conftest import assert_close

from hybrid_attention import AttentionConfig, HybridTransformer, ModelConfig
from hybrid_attention.cache import CacheFullError, Fp4Codec, Fp8KVCodec, PagedKVCache, PlainCodec
from hybrid_attention.planner import kv_cache_bytes_by_type
from hybrid_attention.quant import fake_quant_fp4, fake_quant_nope_fp8


def tiny_model(quant="none", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny", attention=AttentionConfig.preset("tiny", quant=quant))
    return HybridTransformer(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codecs_round_trip_grid_values_exactly(dtype):
    torch.manual_seed(0)
    rows = (torch.randn(10, 512) * 3).to(dtype)
    kv = Fp8KVCodec(512, 64, dtype)
    on_grid = fake_quant_nope_fp8(rows, 64)
    assert torch.equal(kv.decode(kv.encode(on_grid)), on_grid)
    assert kv.encode(on_grid).shape == (10, kv.nbytes)
    keys = Fp4Codec(128, dtype)
    on_grid = fake_quant_fp4(rows[:, :128])
    assert torch.equal(keys.decode(keys.encode(on_grid)), on_grid)
    plain = PlainCodec(512, dtype)
    assert torch.equal(plain.decode(plain.encode(rows)), rows)


def test_v4_entry_sizes():
    assert Fp8KVCodec(512, 64, torch.bfloat16).nbytes == 584  # 448 + 7 scales + 128 rope + 1 pad
    assert Fp4Codec(128, torch.bfloat16).nbytes == 68  # 64 packed + 4 scales


def run_stream(model, states, tokens, cuts):
    out, pos = [], 0
    with torch.no_grad():
        for n in cuts:
            out.append(model(tokens[:, pos:pos + n], states))
            pos += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("quant, dtype", [("none", torch.float32), ("official", torch.float32),
                                          ("official", torch.bfloat16)], ids=["fp32", "fp8-fp32", "fp8-bf16"])
def test_paged_states_give_bit_identical_logits(quant, dtype):
    model = tiny_model(quant, dtype)
    cache = PagedKVCache(model, 8 << 20, max_sequences=2, page_entries=8)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 61))
    cuts = [20, 1, 1, 13, 1, 25]
    seq = cache.allocate(61)
    paged = run_stream(model, cache.states(seq), tokens, cuts)
    plain = run_stream(model, model.new_states(1), tokens, cuts)
    assert torch.equal(paged, plain)
    with torch.no_grad():  # bf16 rounding compounds over four layers and the head: 5e-2 of the RMS
        assert_close("vs prefill", model(tokens), paged, 5e-2 if dtype == torch.bfloat16 else 1e-5)
    if quant == "official":
        assert cache.pools["compressed_kv"].codec.name.startswith("fp8")
        assert cache.pools["indexer_keys"].codec.name == "fp4-e2m1"


@pytest.mark.parametrize("quant, dtype, precisions", [
    ("official", torch.bfloat16, None),
    ("none", torch.float32, {"all": "fp32"}),
    ("none", torch.bfloat16, {"all": "bf16"}),
], ids=["fp8-fp4", "fp32", "bf16"])
@pytest.mark.parametrize("length", [3, 9, 37, 64])
def test_cache_bytes_equal_the_planner(quant, dtype, precisions, length):
    model = tiny_model(quant, dtype)
    cache = PagedKVCache(model, 8 << 20, max_sequences=1, page_entries=8)
    seq = cache.allocate(length)
    run_stream(model, cache.states(seq), torch.randint(0, 256, (1, length)), [length])
    predicted = kv_cache_bytes_by_type(model.cfg.attention, length, 1, precisions)
    assert cache.nbytes_by_type(seq) == {k: v for k, v in predicted.items() if v}


def test_out_of_pages_is_refused_and_allocates_nothing():
    model = tiny_model()
    cache = PagedKVCache(model, 2 << 20, max_sequences=2, page_entries=8)
    free_before = {name: pool.available() for name, pool in cache.pools.items()}
    with pytest.raises(CacheFullError, match="full_kv: needs"):
        cache.allocate(100_000)
    assert {name: pool.available() for name, pool in cache.pools.items()} == free_before
    a = cache.allocate(64)
    b = cache.allocate(64)
    with pytest.raises(CacheFullError, match="window: needs 3 pages, 0 free"):
        cache.allocate(8)  # two sequences use every window ring
    cache.free(a)
    cache.free(cache.allocate(8))
    cache.free(b)
    assert {name: pool.available() for name, pool in cache.pools.items()} == free_before


def test_a_too_small_budget_says_what_it_needs():
    with pytest.raises(ValueError, match="too small for 4 sequences"):
        PagedKVCache(tiny_model(), 10_000, max_sequences=4)


def test_small_model_cache_at_128k_is_below_an_eighth_of_full_attention():
    """With V4's storage (FP8 entries, FP4 keys) on both sides; the paged cache's bytes equal
    these predictions (test_cache_bytes_equal_the_planner, benchmarks/bench_engine.py)."""
    hybrid = AttentionConfig.preset("small", quant="official")
    full = hybrid.replace(compress_ratios=["full"] * hybrid.n_total_layers)
    ratio = (sum(kv_cache_bytes_by_type(hybrid, 131072).values())
             / sum(kv_cache_bytes_by_type(full, 131072).values()))
    assert ratio < 1 / 8

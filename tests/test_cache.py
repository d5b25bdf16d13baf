"""The paged cache: real FP8 / FP4 bytes equal the fake-quant path, pools, accounting, refusals,
and CSA decode reading only the entries it attends to."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch
from conftest import assert_close

from hybrid_attention import AttentionConfig, HybridAttention, HybridTransformer, ModelConfig
from hybrid_attention import cache as cache_module
from hybrid_attention.cache import (
    CacheFullError,
    Fp4Codec,
    Fp8KVCodec,
    PagedKVCache,
    PagedRows,
    PagedRowsView,
    PlainCodec,
    Pool,
)
from hybrid_attention.indexer import gather_rows
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


# CSA decode reads only its top-k compressed entries -----------------------------------------


def test_paged_rows_view_equals_the_dense_rows():
    torch.manual_seed(0)
    codec = Fp8KVCodec(128, 64, torch.bfloat16)
    rows = PagedRows(Pool("compressed_kv", codec, 8, 8), torch.bfloat16, lazy=True)
    rows.append(fake_quant_nope_fp8(torch.randn(1, 29, 128), 64).to(torch.bfloat16))
    new = fake_quant_nope_fp8(torch.randn(1, 3, 128), 64).to(torch.bfloat16)
    view = rows.with_appended(new)
    dense = torch.cat((rows.view(), new), dim=1)
    assert isinstance(view, PagedRowsView) and view.shape == (1, 32, 128) and view.size(1) == 32
    assert torch.equal(view.dense(), dense)
    narrow = view[:, :30]
    assert narrow.size(1) == 30 and torch.equal(narrow.dense(), dense[:, :30])
    # stored rows only, stored and new rows mixed, and more indices than rows (decodes them all)
    for picks in ([[3, 28, 0, 9]], [[31, 2, 29, 30], [8, 7, 30, 1]], [list(range(32)) * 2]):
        picks = torch.tensor([picks])
        fresh = rows.with_appended(new)
        assert torch.equal(gather_rows(fresh, picks), gather_rows(dense, picks))
    with pytest.raises(IndexError, match=r"\[:, :n\] only"):
        view[:, 2:5]
    assert torch.equal(PagedRows(rows.pool, torch.bfloat16).with_appended(new), new)  # not lazy: a tensor


class CountingCodec:
    """A pool's codec that counts the rows it decodes."""

    def __init__(self, codec) -> None:
        self.codec, self.decoded = codec, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def decode(self, data: torch.Tensor) -> torch.Tensor:
        self.decoded += data.size(0)
        return self.codec.decode(data)


def paged_csa_layer(prompt: int, backend: str = "auto"):
    """A tiny FP8 / bf16 model's CSA layer, and two paged sequences holding the same `prompt` tokens."""
    model = tiny_model("official", torch.bfloat16)
    layer = model.layers[0].attn
    assert layer.kind == "csa"
    if backend != "auto":
        layer = HybridAttention(layer.cfg, layer.layer_id, torch.bfloat16, backend).eval()
        layer.load_state_dict(model.layers[0].attn.state_dict())
    cache = PagedKVCache(model, 8 << 20, max_sequences=2, page_entries=8)
    states = []
    tokens = torch.randint(0, model.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        seq = cache.allocate(prompt + 8)
        with torch.no_grad():
            model(tokens, cache.states(seq))
        states.append(cache.states(seq)[0])
    return layer, cache, states


def test_csa_decode_on_lazy_rows_equals_the_dense_rows(monkeypatch):
    layer, _, (lazy, dense) = paged_csa_layer(90)
    dense.compressed.lazy = False  # the whole history decoded, as before
    assert lazy.compressed.lazy and lazy.compressed.length == 22 > layer.cfg.index_topk
    picked = []  # the largest entry each step gathers, and the entries stored before it
    real = PagedRowsView.gather_rows
    monkeypatch.setattr(PagedRowsView, "gather_rows", lambda view, indices: picked.append(
        (int(indices.max()), lazy.compressed.length)) or real(view, indices))
    x = torch.randn(1, 8, layer.cfg.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        for t in range(8):
            assert torch.equal(layer(x[:, t:t + 1], lazy), layer(x[:, t:t + 1], dense)), t
    assert len(picked) == 8
    assert any(last >= stored for last, stored in picked), "no step picked the entry it added"


def test_csa_decode_decodes_only_the_picked_entries():
    layer, cache, (lazy, dense) = paged_csa_layer(200)
    pool = cache.pools["compressed_kv"]
    pool.codec = spy = CountingCodec(pool.codec)
    x = torch.randn(1, 1, layer.cfg.dim, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x, lazy)
        lazy_decoded, spy.decoded = spy.decoded, 0
        dense.compressed.lazy = False
        assert torch.equal(layer(x, dense), out)
    assert lazy.compressed.length == 50  # entries in the history, 4 of them attended to
    assert 0 < lazy_decoded <= layer.cfg.index_topk
    assert spy.decoded == 50  # the dense path decodes the whole history


def test_kernel_path_decodes_on_lazy_rows():
    """The Triton path (here under its interpreter) takes the compressed entries as one buffer."""
    layer, _, (lazy, dense) = paged_csa_layer(40, backend="triton")
    dense.compressed.lazy = False
    x = torch.randn(1, 1, layer.cfg.dim, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x, lazy), layer(x, dense))


@pytest.mark.parametrize("keep", [True, False], ids=["decoded-copy", "decode-every-step"])
def test_steps_decode_only_new_indexer_keys_and_hca_entries(monkeypatch, keep):
    """The indexer keys and HCA's entries, read whole by every step, keep a decoded copy: after the
    prompt, a decode step decodes only the entries it adds (without the copy: the whole history),
    and the logits are the same either way, across a snapshot restored into a fresh sequence."""
    monkeypatch.setattr(cache_module, "KEEP_DECODED", keep)
    model = tiny_model("official", torch.bfloat16)
    cache = PagedKVCache(model, 8 << 20, max_sequences=2, page_entries=8)
    spy = cache.pools["indexer_keys"].codec = CountingCodec(cache.pools["indexer_keys"].codec)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 90))
    seq = cache.allocate(90)
    states = cache.states(seq)
    # The first step after a chunk decodes the chunk's entries (the copy catches up when read).
    logits = [run_stream(model, states, tokens[:, :80], [50, 29, 1])]
    stored = sum(state.index_keys.length for state in states if state.index_keys is not None)
    decoded = spy.decoded
    logits.append(run_stream(model, states, tokens[:, 80:84], [1, 1, 1, 1]))
    during = spy.decoded - decoded
    # A fresh sequence restored from a snapshot decodes its history once, then goes on.
    other = cache.allocate(90)
    for state, snapshot in zip(cache.states(other), [s.snapshot() for s in states], strict=True):
        state.restore(snapshot)
    resumed = run_stream(model, cache.states(other), tokens[:, 84:], [1] * 6)
    logits.append(run_stream(model, states, tokens[:, 84:], [1] * 6))
    assert torch.equal(resumed, logits[-1])
    with torch.no_grad():
        plain = run_stream(model, model.new_states(1), tokens, [50, 29] + [1] * 11)
        assert torch.equal(torch.cat(logits, 1), plain)
    # 4 steps: the CSA layer adds one indexer key per 4 tokens (its ratio).
    if keep:
        assert stored >= 20 and during <= 1
    else:
        assert during >= 4 * stored

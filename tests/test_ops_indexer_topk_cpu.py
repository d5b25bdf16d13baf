"""The CPU backend of indexer_topk: int8 scoring where it is exact, bit-identical to the fp32
reference (scores and picks); the reference path wherever exactness cannot be shown; the tiles'
fused (compiled) epilogue, bit-identical to the eager passes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention.attention import HybridAttention
from hybrid_attention.config import AttentionConfig
from hybrid_attention.ops import FP4Keys
from hybrid_attention.ops.indexer_topk import cpu
from hybrid_attention.ops.indexer_topk.reference import block_scores, head_sum, indexer_topk_reference
from hybrid_attention.quant import fake_quant_fp4


@pytest.fixture(autouse=True)
def every_call_may_take_int8(monkeypatch):
    """The route's own tests: small calls too (the layer keeps them on fp32 for speed), and the
    fused epilogue on every tile however small."""
    monkeypatch.setattr(cpu, "MIN_QUERY_ROWS", 0)
    monkeypatch.setattr(cpu, "USE_INT8", True)
    monkeypatch.setattr(cpu, "FUSE_EPILOGUE", True)
    monkeypatch.setattr(cpu, "FUSED_PRODUCTS", 0)


def official_inputs(b, s, heads, d, t, seed=0, spread=1):
    """Queries and keys as quant="official" has them (FP4 with a power-of-two scale per 32
    values), the blocks' sizes up to 2^spread apart; weights at full fp32 precision."""
    g = torch.Generator().manual_seed(seed)

    def rows(*shape):
        x = torch.randn(*shape, generator=g)
        sizes = torch.exp2(torch.randint(0, spread + 1, (*shape[:-1], d // 32), generator=g).float())
        return fake_quant_fp4(x * sizes.repeat_interleave(32, -1), block=32)

    q = rows(b, s, heads, d)
    keys = rows(b, t, d)
    weights = torch.randn(b, s, heads, generator=g) * 0.3
    return q, weights, keys


def causal(s, t, ratio=4):
    return ((torch.arange(s) + 1) // ratio).clamp_max(t)


@pytest.mark.parametrize("b, s, heads, d, t, k", [
    (1, 300, 8, 64, 75, 16),
    (2, 129, 4, 128, 40, 7),
    (1, 64, 3, 32, 16, 16),  # k = every entry
    (3, 50, 2, 64, 600, 5),  # more keys than one chunk of some tiles
])
def test_int8_picks_equal_the_reference(b, s, heads, d, t, k):
    q, weights, keys = official_inputs(b, s, heads, d, t)
    assert cpu.int8_operands(q, weights, keys) is not None  # the int8 route is the one tested
    visible = causal(s, t).expand(b, s).int()
    ref = indexer_topk_reference(q, weights, keys, k, visible)
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, k, visible), ref)
    fp4 = FP4Keys.quantize(keys)  # the engine's storage: the same values
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, fp4, k, visible), ref)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
def test_int8_scores_equal_the_reference_bit_for_bit(monkeypatch, fuse):
    monkeypatch.setattr(cpu, "FUSE_EPILOGUE", fuse)
    q, weights, keys = official_inputs(2, 40, 8, 64, 300, seed=3)
    q_ints, w, k_ints, k_scale = cpu.int8_operands(q, weights, keys)
    n = 2 * 40 * 8 * 300
    out = torch.empty(2, 40, 300)
    cpu.int8_block_scores(q_ints, w, k_ints, k_scale, torch.empty(n, dtype=torch.int32), torch.empty(n), out)
    ref = block_scores(q, weights, keys)
    assert torch.equal(out + 0.0, ref + 0.0)  # + 0.0: -0.0 and 0.0 are the same score


def test_ties_go_to_the_lower_id_on_both_routes():
    q, weights, keys = official_inputs(1, 200, 4, 64, 50, seed=1)
    keys[:, 1::2] = keys[:, 0::2]  # every entry has a twin: ties everywhere
    weights[:, 150] = 0.0  # a query (it sees 37 entries) whose scores are all 0
    visible = causal(200, 50)[None].int()
    ref = indexer_topk_reference(q, weights, keys, 6, visible)
    assert cpu.int8_operands(q, weights, keys) is not None
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, 6, visible), ref)
    assert (ref[0, 150] == torch.arange(6, dtype=torch.int32)).all()  # all tied: the lowest ids


@pytest.mark.parametrize("case", ["quant-none", "bf16", "wide-spread", "tiny-weights", "huge-dim"])
def test_the_reference_runs_where_int8_cannot_be_shown_exact(case):
    q, weights, keys = official_inputs(1, 64, 4, 64, 16, seed=2)
    if case == "quant-none":
        q = torch.randn_like(q)  # fp32 values with 24-bit mantissas
    elif case == "bf16":
        q, weights, keys = q.bfloat16(), weights.bfloat16(), keys.bfloat16()
    elif case == "wide-spread":
        q[..., :32] *= 2.0**6  # one block 2^6 above the other: the row needs more than 7 bits
    elif case == "tiny-weights":
        weights[0, 0, 0] = 2.0**-120  # products near fp32's subnormals
    elif case == "huge-dim":
        q, weights, keys = official_inputs(1, 4, 1, 1056, 4, seed=2)
    assert cpu.int8_operands(q, weights, keys) is None
    visible = causal(q.size(1), keys.size(1))[None].int()
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, 3, visible),
                       indexer_topk_reference(q, weights, keys, 3, visible))


@settings(max_examples=100, deadline=None)
@given(s=st.integers(1, 90), heads=st.integers(1, 5), d=st.sampled_from([32, 64, 96]), t=st.integers(1, 40),
       k=st.integers(0, 12), spread=st.integers(0, 6), seed=st.integers(0, 2**16), repeat=st.booleans())
def test_property_the_cpu_backend_always_equals_the_reference(s, heads, d, t, k, spread, seed, repeat):
    # Whichever route runs (spread > 3 usually sends it to the reference), the picks are the same.
    q, weights, keys = official_inputs(1, s, heads, d, t, seed=seed, spread=spread)
    if repeat and t > 1:
        keys[:, 1] = keys[:, 0]
    k = min(k, t)
    visible = causal(s, t, ratio=1)[None].int()
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, k, visible),
                       indexer_topk_reference(q, weights, keys, k, visible))


def test_a_csa_layer_with_official_quant_gives_the_same_output_either_route(monkeypatch):
    cfg = AttentionConfig.preset("tiny", compress_ratios=[4], quant="official")
    torch.manual_seed(0)
    layer = HybridAttention(cfg, 0).eval()
    x = torch.randn(1, 200, cfg.dim)
    taken = []
    original = cpu.int8_operands
    monkeypatch.setattr(cpu, "int8_operands", lambda *a: taken.append(original(*a)) or taken[-1])
    with torch.no_grad():
        monkeypatch.setattr(cpu, "USE_INT8", True)
        fast = layer(x)
        assert taken and all(t is not None for t in taken)  # int8 scored every call
        monkeypatch.setattr(cpu, "USE_INT8", False)
        slow = layer(x)
    assert torch.equal(fast, slow)


def test_decode_sized_calls_keep_the_fp32_route(monkeypatch):
    # One query x 8 heads against many keys: converting the keys would cost more than it saves.
    monkeypatch.setattr(cpu, "MIN_QUERY_ROWS", 512)
    called = []
    monkeypatch.setattr(cpu, "int8_operands", lambda *a: called.append(1))
    q, weights, keys = official_inputs(1, 1, 8, 64, 300)
    visible = torch.tensor([[300]], dtype=torch.int32)
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, 16, visible),
                       indexer_topk_reference(q, weights, keys, 16, visible))
    assert not called


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 6), t=st.integers(2, 60), k=st.integers(1, 20), levels=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_property_top_entries_equal_the_oracle_with_many_ties(rows, t, k, levels, seed):
    # Scores from a few levels (bf16 index scores tie this often): the fast top-k with its tie
    # rule against indexer.select_entries, the readable definition.
    from hybrid_attention.indexer import select_entries
    from hybrid_attention.ops.indexer_topk.reference import top_entries

    g = torch.Generator().manual_seed(seed)
    k = min(k, t)
    scores = torch.randint(0, levels, (1, rows, t), generator=g).float() - 1.0
    scores[scores == -1.0] = -0.0 if seed % 2 else 0.0  # +0 and -0 are the same score
    seen = torch.randint(0, t + 1, (rows,), generator=g)
    expected = select_entries(scores[0][None], seen, k)
    got = top_entries(scores.clone(), seen[None], k)
    assert torch.equal(got, expected)


def eager_head_sum(products, weights):
    """The reference's passes after its GEMM (`block_scores`): ReLU, weighting, heads added in order."""
    return head_sum(products.float().clamp_min(0).mul_(weights[..., None])[None])[0]


@pytest.mark.parametrize("heads", [1, 3, 8, 13])
def test_the_fused_epilogues_equal_the_eager_passes_bit_for_bit(heads):
    g = torch.Generator().manual_seed(heads)
    n, t = 37, 203  # 203 columns: a vector loop's tail too
    dots = torch.randint(-2**20, 2**20, (n, heads, t), generator=g, dtype=torch.int32)
    weights = torch.randn(n, heads, generator=g) * 2.0 ** torch.randint(-8, 8, (n, heads), generator=g)
    key_scale = 2.0 ** torch.randint(-10, 10, (t,), generator=g).float()
    wide = torch.full((n, t + 9), float("nan"))
    out = wide[:, 4:4 + t]  # a strided view, as the tiles write into the scores
    fused = cpu.fused(cpu.head_sum_int8, heads, n * heads * t)
    assert cpu.run_fused(fused, dots, weights, key_scale, out)
    assert torch.equal(out, eager_head_sum(dots, weights) * key_scale)
    assert wide[:, :4].isnan().all() and wide[:, 4 + t:].isnan().all()  # nothing else written
    products = torch.randn(n, heads, t, generator=g)
    fused = cpu.fused(cpu.head_sum_fp32, heads, n * heads * t)
    assert cpu.run_fused(fused, products, weights, out)
    assert torch.equal(out, eager_head_sum(products, weights))
    # bf16: each weighted product and the total rounded to bf16, as block_scores' bf16 ops round
    q = torch.randn(1, n, heads, 64, generator=g).bfloat16()
    keys = torch.randn(1, t, 64, generator=g).bfloat16()
    w16 = weights.bfloat16()[None]
    products = torch.matmul(q.reshape(1, n * heads, 64), keys.transpose(1, 2)).view(n, heads, t)
    fused = cpu.fused(cpu.head_sum_bf16, heads, n * heads * t)
    assert cpu.run_fused(fused, products, w16[0], out)
    assert torch.equal(out, block_scores(q, w16, keys)[0])


def test_the_head_sum_adds_the_heads_in_order_in_every_column():
    # torch.sum over the head axis adds a row's last columns (past the vector width) another way;
    # the reference's head_sum is index_scores' loop in every column.
    from hybrid_attention.indexer import index_scores

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 30, 8, 64, generator=g), torch.randn(1, 300, 64, generator=g)
    weights = torch.randn(1, 30, 8, generator=g) * 2.0 ** torch.randint(-6, 6, (1, 30, 8), generator=g)
    per_head = torch.stack([q[:, :, h] @ keys.transpose(1, 2) for h in range(8)], dim=2)
    per_head = per_head.clamp_min(0) * weights[..., None]
    expected = per_head[:, :, 0].clone()
    for h in range(1, 8):
        expected = expected + per_head[:, :, h]
    assert torch.equal(head_sum(per_head), expected)
    assert torch.equal(head_sum(per_head), index_scores(q, weights, keys))


def test_many_heads_keep_the_eager_passes():
    assert cpu.fused(cpu.head_sum_int8, cpu.FUSED_HEADS + 1, 1 << 20) is None
    q, weights, keys = official_inputs(1, 40, cpu.FUSED_HEADS + 4, 64, 30, seed=5)
    visible = causal(40, 30, ratio=1)[None].int()
    assert torch.equal(cpu.indexer_topk_cpu(q, weights, keys, 8, visible),
                       indexer_topk_reference(q, weights, keys, 8, visible))


@pytest.mark.parametrize("b, s, heads, d, t, k", [
    (1, 300, 8, 64, 75, 16),
    (2, 129, 4, 128, 40, 7),
    (3, 50, 2, 64, 600, 5),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fp32_and_bf16_routes_with_the_fused_epilogue_equal_the_reference(monkeypatch, b, s, heads, d, t,
                                                                               k, dtype):
    # quant="none" values: full mantissas, so int8 cannot apply and the fp32 (or bf16) GEMM runs.
    fused_calls = []
    original = cpu.run_fused
    monkeypatch.setattr(cpu, "run_fused", lambda *a: fused_calls.append(original(*a)) or fused_calls[-1])
    g = torch.Generator().manual_seed(b * s)
    q, keys = torch.randn(b, s, heads, d, generator=g).to(dtype), torch.randn(b, t, d, generator=g).to(dtype)
    weights = torch.randn(b, s, heads, generator=g).to(dtype)
    visible = causal(s, t).expand(b, s).int()
    got = cpu.indexer_topk_cpu(q, weights, keys, k, visible)
    assert fused_calls and all(fused_calls)
    assert torch.equal(got, indexer_topk_reference(q, weights, keys, k, visible))


def test_a_compiler_failure_falls_back_to_the_eager_passes(monkeypatch):
    def broken(function, **options):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(cpu, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    q, weights, keys = official_inputs(1, 100, 8, 64, 40, seed=4)
    visible = causal(100, 40)[None].int()
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        got = cpu.indexer_topk_cpu(q, weights, keys, 8, visible)
    assert torch.equal(got, indexer_topk_reference(q, weights, keys, 8, visible))
    assert cpu.FUSE_EPILOGUE is False  # one warning, then the eager passes for the process

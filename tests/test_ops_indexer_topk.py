"""indexer_topk: the fused Triton scoring + running top-k (run by Triton's interpreter on CPU tensors)
against the torch reference, id for id; the reference against the indexer's own functions; ties,
causal visibility, FP4 keys, entry splits; error paths.

Ids are compared exactly, so the inputs are chosen on coarse grids (FP4 queries and keys, as the
official precision mode has them, and weights in steps of 1/8): every dot product, head term and
head sum is then exact in fp32 whatever the summation order, and both backends see the same scores.
With other inputs the two may round a score differently in its last bf16 bit, and near-ties may
then resolve differently (SPEC 6).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch
import triton  # noqa: E402,F401  (a dev dependency: `make test` installs it; these tests must run)
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention.indexer import index_scores, select_entries
from hybrid_attention.ops import FP4Keys, indexer_topk
from hybrid_attention.quant import fake_quant_fp4


def grid_inputs(b: int, s: int, heads: int, head_dim: int, n_keys: int, dtype=torch.bfloat16, seed: int = 0):
    """q, weights, keys on coarse grids, with repeated keys and an all-zero weight row (ties)."""
    g = torch.Generator().manual_seed(seed)
    q = fake_quant_fp4(torch.randn(b, s, heads, head_dim, generator=g)).to(dtype)
    keys = fake_quant_fp4(torch.randn(b, n_keys, head_dim, generator=g))
    keys[:, 1::3] = keys[:, 0::3][:, : keys[:, 1::3].size(1)]  # every third key repeated: exact ties
    weights = torch.randint(-8, 9, (b, s, heads), generator=g) / 8
    if s > 1:
        weights[:, 1] = 0  # a query whose entries all score 0
    return q, weights.to(dtype), keys.to(dtype)


def causal(s: int, ratio: int = 4) -> torch.Tensor:
    """Entries the query at position t sees in a prefill: i < (t + 1) // ratio (SPEC 4)."""
    return (torch.arange(s) + 1) // ratio


def both(q, weights, keys, k, visible=None):
    ref = indexer_topk(q, weights, keys, k, visible, backend="torch")
    out = indexer_topk(q, weights, keys, k, visible, backend="triton")
    assert ref.dtype == out.dtype == torch.int32
    assert torch.equal(ref, out), f"first differing query: {(ref != out).any(-1).nonzero()[0].tolist()}"
    return ref


@pytest.mark.parametrize("b, s, heads, head_dim, n_keys, k, dtype", [
    pytest.param(2, 19, 4, 32, 13, 5, torch.bfloat16, id="B2-T19-H4-D32-t13-k5-bf16"),
    pytest.param(2, 19, 4, 32, 13, 5, torch.float32, id="B2-T19-H4-D32-t13-k5-fp32"),
    pytest.param(1, 17, 3, 64, 37, 20, torch.bfloat16, id="B1-T17-H3-D64-t37-k20-two-tiles"),
])
def test_prefill_matches_reference(b, s, heads, head_dim, n_keys, k, dtype):
    q, weights, keys = grid_inputs(b, s, heads, head_dim, n_keys, dtype)
    visible = torch.arange(s) * n_keys // (s - 1)  # 0 for the first query, every key for the last
    picks = both(q, weights, keys, k, visible)
    assert (picks[:, 0] == -1).all()  # the first query sees nothing


def test_decode_and_entry_splits():
    """One query per sequence (16 heads per dot), the entries split over programs and merged."""
    from hybrid_attention.ops.indexer_topk.triton import indexer_topk_triton

    q, weights, keys = grid_inputs(3, 1, 16, 32, 70, seed=1)
    ref = both(q, weights, keys, 8)
    for splits in (2, 3):
        visible = torch.full((3, 1), 70, dtype=torch.int32)
        assert torch.equal(indexer_topk_triton(q, weights, keys, 8, visible, splits=splits), ref)


def test_fp4_keys_are_decoded_in_the_kernel():
    q, weights, keys = grid_inputs(2, 6, 4, 64, 21, seed=2)
    stored = FP4Keys.quantize(keys.float())
    assert torch.equal(stored.dequantize(torch.bfloat16), keys)  # grid keys survive FP4 exactly
    ref = indexer_topk(q, weights, keys, 6, backend="torch")
    assert torch.equal(both(q, weights, stored, 6), ref)


def test_visible_per_sequence_and_k_past_the_keys():
    q, weights, keys = grid_inputs(2, 5, 2, 32, 9, seed=3)
    visible = torch.tensor([[0, 1, 3, 9, 40], [2, 2, 5, 7, 9]])  # 40: past t means all t
    picks = both(q, weights, keys, 12, visible)  # k > t: lists end in -1
    assert (picks[0, 0] == -1).all() and picks[0, 1].tolist() == [0] + [-1] * 11
    assert ((picks >= 0).sum(-1) == visible.clamp_max(9)).all()


def test_reference_is_the_indexer_selection():
    """Against the indexer's own functions on the whole score matrix (SPEC 6 prefill masking)."""
    q, weights, keys = grid_inputs(2, 23, 4, 32, 5, seed=4)
    visible = causal(23)
    expected = select_entries(index_scores(q, weights, keys), visible, 5)
    got = indexer_topk(q, weights, keys, 5, visible, backend="torch", query_block=4)
    assert torch.equal(got.long(), expected)


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 24), n_keys=st.integers(1, 30), k=st.integers(1, 10), tile=st.integers(1, 9),
       levels=st.integers(1, 4), seed=st.integers(0, 999),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_reference_ties_against_the_indexer_selection(s, n_keys, k, tile, levels, seed, dtype):
    """Scores drawn from `levels` values: most rows tie at the k-th score, some do not; the fast
    top-k with its packed-key redo of tied rows must pick the oracle's set in every tile split."""
    g = torch.Generator().manual_seed(seed)
    q = torch.ones(1, s, 1, 32, dtype=dtype)
    keys = (torch.randint(0, levels, (1, n_keys, 1), generator=g).float() / 32).expand(1, n_keys, 32)
    weights = torch.randint(-2, 3, (1, s, 1), generator=g).to(dtype)
    visible = torch.randint(0, n_keys + 1, (s,), generator=g)
    expected = select_entries(index_scores(q, weights, keys.to(dtype)), visible, min(k, n_keys))
    got = indexer_topk(q, weights, keys.to(dtype), min(k, n_keys), visible, backend="torch", query_block=tile)
    assert torch.equal(got.long(), expected)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 9), width=st.integers(20, 60), levels=st.integers(1, 50),
       hidden=st.floats(0, 1), seed=st.integers(0, 999))
def test_best_values_are_those_of_topk(rows, k, width, levels, hidden, seed):
    """The chunk-narrowed top-k (rows of 20k to 60k columns: both chunk sizes and the plain
    fallback) returns the values of `torch.topk`, with ids that hold them, each id once; scores
    drawn from few levels (ties across chunks) and partly -inf (hidden entries)."""
    from hybrid_attention.ops.indexer_topk.reference import best_values

    g = torch.Generator().manual_seed(seed)
    t = width * k
    scores = torch.randint(0, levels, (rows, t), generator=g).float()
    scores[torch.rand(rows, t, generator=g) < hidden] = float("-inf")
    values, ids = best_values(scores, k)
    assert torch.equal(values.sort(dim=-1).values, scores.topk(k, dim=-1).values.sort(dim=-1).values)
    assert torch.equal(scores.gather(-1, ids), values)
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("b", [1, 2])
def test_reference_selection_on_long_rows(b):
    """Rows long enough for `best_values`' chunks (and not a multiple of them), with many ties:
    the reference still picks the indexer's set."""
    g = torch.Generator().manual_seed(11)
    s, n_keys, k = 40, 331, 6
    q = torch.ones(b, s, 1, 32)
    keys = (torch.randint(0, 7, (b, n_keys, 1), generator=g).float() / 32).expand(b, n_keys, 32)
    weights = torch.randint(-2, 3, (b, s, 1), generator=g).float()
    visible = torch.randint(0, n_keys + 1, (s,), generator=g)
    expected = select_entries(index_scores(q, weights, keys), visible, k)
    assert torch.equal(indexer_topk(q, weights, keys, k, visible, backend="torch").long(), expected)


@pytest.mark.parametrize("b", [1, 2])
def test_reference_tiles_inside_one_top_k_group(b, monkeypatch):
    """Small tiles share one top-k call and meet their keys in chunks; the columns a tile never
    writes (past its queries' last visible entry) hold garbage (NaN here) and must stay hidden."""
    from hybrid_attention.ops.indexer_topk import reference

    monkeypatch.setattr(reference, "QUERY_TILE", 8 * b)  # tiles of 8 queries
    monkeypatch.setattr(reference, "MIN_KEY_CHUNK", 4)
    monkeypatch.setattr(reference, "SCORE_TILE", b * 8 * 3 * 4)  # keys in chunks of 4
    monkeypatch.setattr(reference, "TOPK_GROUP", 2000)  # several tiles per group
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    g = torch.Generator().manual_seed(8)
    q, weights, keys = torch.randn(b, 61, 3, 32, generator=g), torch.randn(b, 61, 3, generator=g), \
        torch.randn(b, 15, 32, generator=g)
    visible = causal(61)
    expected = select_entries(index_scores(q, weights, keys), visible, 5)
    assert torch.equal(indexer_topk(q, weights, keys, 5, visible, backend="torch").long(), expected)


def test_reference_scores_are_index_scores_bit_for_bit():
    """On arbitrary bf16 inputs the reference's in-place scores equal `indexer.index_scores`."""
    from hybrid_attention.ops.indexer_topk.reference import block_scores

    g = torch.Generator().manual_seed(6)
    q, keys = torch.randn(2, 7, 4, 32, generator=g).bfloat16(), torch.randn(2, 11, 32, generator=g).bfloat16()
    weights = torch.randn(2, 7, 4, generator=g).bfloat16()
    assert torch.equal(block_scores(q, weights, keys), index_scores(q, weights, keys).float())


def test_ties_go_to_the_lower_entry():
    q, weights, keys = grid_inputs(1, 3, 2, 32, 12, seed=5)
    keys[:] = keys[:, :1]  # every entry scores the same
    picks = both(q, weights, keys, 4)
    assert picks[0].tolist() == [[0, 1, 2, 3]] * 3


@settings(max_examples=5, deadline=None)
@given(s=st.integers(1, 9), n_keys=st.integers(1, 40), k=st.integers(1, 12), seed=st.integers(0, 99))
def test_lengths_and_widths(s, n_keys, k, seed):
    q, weights, keys = grid_inputs(1, s, 2, 32, n_keys, seed=seed)
    both(q, weights, keys, k, causal(s, ratio=1).clamp_max(n_keys))


def test_auto_is_the_torch_path_on_cpu():
    q, weights, keys = grid_inputs(1, 4, 2, 32, 6)
    assert torch.equal(indexer_topk(q, weights, keys, 3), indexer_topk(q, weights, keys, 3, backend="torch"))


@pytest.mark.parametrize("bad, message", [
    (dict(q=torch.randn(1, 2, 8)), "q must be"),
    (dict(weights=torch.randn(1, 2, 3)), "weights must be"),
    (dict(weights=torch.randn(1, 2, 2).bfloat16()), "weights must be"),
    (dict(keys=torch.randn(1, 5, 16)), "keys must be"),
    (dict(keys=FP4Keys(torch.zeros(1, 5, 16, dtype=torch.uint8), torch.zeros(1, 5, 2, dtype=torch.int8))),
     "FP4Keys.exponents"),
    (dict(keys=FP4Keys(torch.zeros(1, 5, 8, dtype=torch.uint8), torch.zeros(1, 5, 1, dtype=torch.int8))),
     "FP4Keys.packed"),
    (dict(k=-1), "k must be"),
    (dict(visible=torch.zeros(3, dtype=torch.int32)), "visible must be"),
    (dict(visible=torch.tensor([1, -1])), "visible counts"),
    (dict(backend="cuda-magic"), "backend must be"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(q=torch.randn(1, 2, 2, 32), weights=torch.randn(1, 2, 2), keys=torch.randn(1, 5, 32), k=2)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        indexer_topk(**args)

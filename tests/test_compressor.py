"""The compressor against a loop-by-loop reading of SPEC.md section 5."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention.compressor import Compressor
from hybrid_attention.rope import apply_rope, rope_frequencies

DIM, D, ROPE = 16, 68, 4  # 64 non-rope dims: one FP8 block


def make(ratio: int, overlap: bool, seed: int = 0) -> Compressor:
    torch.manual_seed(seed)
    comp = Compressor(DIM, D, ratio, overlap, ROPE, norm_eps=1e-6, rotate=False)
    with torch.no_grad():
        comp.ape.normal_()
        comp.norm.weight.uniform_(0.5, 1.5)
    return comp


def entry_by_the_spec(comp: Compressor, x: torch.Tensor, i: int) -> torch.Tensor:
    """Entry i of one sequence x [s, dim], one feature and one slot at a time (SPEC 5.2)."""
    r = comp.ratio
    a = x @ comp.wkv.weight.T
    g = x @ comp.wgate.weight.T
    out = torch.zeros(D)
    for f in range(D):
        logits, values = [], []
        if comp.overlap:
            for j in range(r):  # previous block, features [0, d)
                t = (i - 1) * r + j
                logits.append(g[t, f] + comp.ape[j, f] if t >= 0 else torch.tensor(-math.inf))
                values.append(a[t, f] if t >= 0 else torch.tensor(0.0))
            for j in range(r):  # own block, features [d, 2d)
                t = i * r + j
                logits.append(g[t, D + f] + comp.ape[j, D + f])
                values.append(a[t, D + f])
        else:
            for j in range(r):
                t = i * r + j
                logits.append(g[t, f] + comp.ape[j, f])
                values.append(a[t, f])
        weights = torch.softmax(torch.stack(logits), 0)
        out[f] = (weights * torch.stack(values)).sum()
    return out


@pytest.mark.parametrize("ratio, overlap", [(4, True), (4, False), (8, False), (3, True)],
                         ids=["csa-r4", "hca-r4", "hca-r8", "overlap-r3"])
def test_entries_follow_the_spec_formula(ratio, overlap):
    comp = make(ratio, overlap)
    x = torch.randn(1, 5 * ratio + ratio // 2, DIM)
    freqs = rope_frequencies(ROPE, 160000.0)
    with torch.no_grad():
        entries, state = comp(x, 0, comp.new_state(1), freqs, "none")
        assert entries.shape == (1, 5, D)
        for i in range(5):
            raw = entry_by_the_spec(comp, x[0], i)
            expected = apply_rope(comp.norm(raw)[None, None], torch.tensor([i * ratio]), freqs)[0, 0]
            torch.testing.assert_close(entries[0, i], expected, atol=1e-5, rtol=1e-5)
    # the remainder tokens wait in the state; with overlap the last full block is kept too
    rem = ratio // 2
    first = ratio if overlap else 0
    assert torch.isfinite(state.score[0, first:first + rem]).all()
    assert torch.isinf(state.score[0, first + rem:]).all()
    if overlap:
        a = x[0] @ comp.wkv.weight.T
        torch.testing.assert_close(state.kv[0, :ratio], a[4 * ratio:5 * ratio])


def test_short_prefill_emits_nothing_and_fresh_state_has_no_previous_block():
    comp = make(4, True)
    freqs = rope_frequencies(ROPE, 160000.0)
    with torch.no_grad():
        entries, state = comp(torch.randn(1, 3, DIM), 0, comp.new_state(1), freqs, "none")
        assert entries.shape == (1, 0, D)
        # A new sequence must not see the old one's last block (SPEC 9, bug 7).
        fresh = comp.new_state(1)
        assert torch.isinf(fresh.score).all() and (fresh.kv == 0).all()


@settings(max_examples=30, deadline=None)
@given(ratio=st.sampled_from([2, 4, 5]), overlap=st.booleans(),
       cuts=st.lists(st.integers(1, 13), min_size=1, max_size=6))
def test_streaming_gives_the_same_entries_bit_for_bit(ratio, overlap, cuts):
    comp = make(ratio, overlap, seed=ratio)
    s = sum(cuts)
    x = torch.randn(2, s, DIM)
    freqs = rope_frequencies(ROPE, 160000.0, 16.0, 64)
    with torch.no_grad():
        whole, whole_state = comp(x, 0, comp.new_state(2), freqs, "official")
        state, parts, pos = comp.new_state(2), [], 0
        for n in cuts:
            entries, state = comp(x[:, pos:pos + n], pos, state, freqs, "official")
            parts.append(entries)
            pos += n
    streamed = torch.cat(parts, 1)
    assert streamed.shape == whole.shape == (2, s // ratio, D)
    torch.testing.assert_close(streamed, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.kv, whole_state.kv, atol=1e-6, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(ratio=st.sampled_from([2, 4, 5]), overlap=st.booleans(), chunk_tokens=st.integers(1, 17),
       first=st.integers(0, 9), rest=st.integers(0, 40))
def test_long_chunks_pooled_piecewise_equal_one_piece(ratio, overlap, chunk_tokens, first, rest):
    """A chunk is pooled CHUNK_TOKENS at a time (cut at block boundaries, state carried between
    the pieces); entries and state match pooling it in one piece, also when the chunk starts
    inside a block."""
    from unittest import mock

    from hybrid_attention import compressor

    comp = make(ratio, overlap, seed=ratio + 1)
    x = torch.randn(2, first + rest, DIM)
    freqs = rope_frequencies(ROPE, 160000.0, 16.0, 64)
    with torch.no_grad():
        _, state = comp(x[:, :first], 0, comp.new_state(2), freqs, "official")
        with mock.patch.object(compressor, "CHUNK_TOKENS", 1 << 30):
            whole, whole_state = comp(x[:, first:], first, state, freqs, "official")
        with mock.patch.object(compressor, "CHUNK_TOKENS", chunk_tokens):
            pieces, pieces_state = comp(x[:, first:], first, state, freqs, "official")
    assert pieces.shape == whole.shape == (2, (first + rest) // ratio - first // ratio, D)
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pieces_state.kv, whole_state.kv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pieces_state.score, whole_state.score, atol=1e-6, rtol=1e-6)

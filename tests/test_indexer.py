import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention.indexer import index_scores, select_entries, topk_lowest_index_ties


def test_scores_are_the_weighted_relu_sum_over_heads():
    torch.manual_seed(0)
    qi, w, keys = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4), torch.randn(1, 6, 8)
    expected = torch.zeros(1, 3, 6)
    for t in range(3):
        for i in range(6):
            expected[0, t, i] = sum(w[0, t, h] * torch.relu(qi[0, t, h] @ keys[0, i]) for h in range(4))
    torch.testing.assert_close(index_scores(qi, w, keys), expected, atol=1e-5, rtol=1e-5)


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    assert topk_lowest_index_ties(scores, 3).tolist() == [[1, 2, 4]]
    assert topk_lowest_index_ties(torch.zeros(1, 5), 2).tolist() == [[0, 1]]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 3), min_size=1, max_size=30), data=st.data())
def test_topk_equals_a_stable_sort(values, data):
    k = data.draw(st.integers(1, len(values)))
    scores = torch.tensor([values], dtype=torch.float32)
    expected = sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])
    assert topk_lowest_index_ties(scores, k)[0].tolist() == expected


def test_select_masks_entries_the_query_cannot_see():
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]])
    visible = torch.tensor([1, 4])
    picks = select_entries(scores, visible, 3)
    # query 0 sees only entry 0: the other picks become -1
    assert sorted(picks[0, 0].tolist()) == [-1, -1, 0]
    assert picks[0, 1].tolist() == [1, 2, 3]

"""ops.indexer_loss: the blocked autograd Function against the reference through autograd."""

import pytest
import torch
from conftest import assert_close

from hybrid_attention.ops.indexer_loss import cpu, indexer_loss, indexer_loss_reference


def make_inputs(b, s, hi, di, n, k, holes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qi = torch.randn(b, s, hi, di, generator=gen, dtype=dtype)
    weights = torch.randn(b, s, hi, generator=gen, dtype=dtype)
    keys = torch.randn(b, n, di, generator=gen, dtype=dtype)
    picks = torch.rand(b, s, n, generator=gen).argsort(-1)[..., :k]
    if holes:
        picks = picks.masked_fill(torch.rand(b, s, k, generator=gen) < 0.3, -1)
        picks[:, 0] = -1  # a query without a single pick
    teacher = torch.rand(b, s, k, generator=gen, dtype=dtype)
    teacher[:, 1] = 0  # a query whose teacher has no mass on its picks
    return qi, weights, keys, picks, teacher


def losses_and_grads(fn, inputs):
    qi, weights, keys, picks, teacher = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (qi, weights, keys)]
    total, count = fn(*leaves, picks, teacher)
    (total / count.clamp_min(1)).backward()
    return total, count, [t.grad for t in leaves]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "QUERY_BLOCK", 5)


@pytest.mark.parametrize("b, s, hi, di, n, k, holes", [
    pytest.param(1, 12, 2, 8, 9, 4, False, id="B1-T12-H2-D8-n9-k4"),
    pytest.param(2, 23, 3, 16, 17, 6, True, id="B2-T23-H3-D16-n17-k6-holes"),
])
def test_loss_and_gradients_equal_the_reference(b, s, hi, di, n, k, holes):
    inputs = make_inputs(b, s, hi, di, n, k, holes)
    ref = losses_and_grads(indexer_loss_reference, inputs)
    got = losses_and_grads(indexer_loss, inputs)
    assert_close("loss", ref[0], got[0])
    assert int(ref[1]) == int(got[1]) == (b * (s - 2) if holes else b * (s - 1))
    for name, r, g in zip(("dqi", "dweights", "dkeys"), ref[2], got[2], strict=True):
        assert_close(name, r, g)


def test_fp64_gradcheck():
    qi, weights, keys, picks, teacher = make_inputs(1, 7, 2, 4, 6, 3, True, dtype=torch.float64, seed=2)
    leaves = [t.requires_grad_(True) for t in (qi, weights, keys)]
    assert torch.autograd.gradcheck(lambda q, w, k: cpu.IndexerLoss.apply(q, w, k, picks, teacher)[0],
                                    leaves, eps=1e-6, atol=1e-6)


def test_bad_inputs_name_what_is_wrong():
    qi, weights, keys, picks, teacher = make_inputs(1, 4, 2, 8, 5, 2, False)
    with pytest.raises(ValueError, match=r"weights must be \[1, 4, 2\]"):
        indexer_loss(qi, weights[:, :3], keys, picks, teacher)
    with pytest.raises(ValueError, match=r"picks must lie in \[-1, 5\)"):
        indexer_loss(qi, weights, keys, picks + 5, teacher)
    with pytest.raises(ValueError, match="teacher must be"):
        indexer_loss(qi, weights, keys, picks, teacher[..., :1])

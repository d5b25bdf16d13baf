import pytest
import torch

from hybrid_attention.ops import sparse_attention


def naive(q, kv, sink, indices, scale):
    """float64, one query and head at a time, the formula of SPEC 7."""
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for t in range(s):
            rows = [int(j) for j in indices[bi, t] if j >= 0]
            for hi in range(h):
                if not rows:
                    continue
                z = torch.stack([scale * (q[bi, t, hi].double() @ kv[bi, j].double()) for j in rows])
                m = z.max()
                e = torch.exp(z - m)
                denom = e.sum() + torch.exp(sink[hi].double() - m)
                out[bi, t, hi] = sum(e[n] * kv[bi, j].double() for n, j in enumerate(rows)) / denom
    return out


@pytest.mark.parametrize("b, s, h, d, n, k", [(1, 5, 2, 8, 7, 3), (2, 9, 4, 16, 20, 6)],
                         ids=["B1-T5-H2-D8-k3", "B2-T9-H4-D16-k6"])
def test_matches_the_formula_with_holes_and_sink(b, s, h, d, n, k):
    torch.manual_seed(0)
    q, kv, sink = torch.randn(b, s, h, d), torch.randn(b, n, d), torch.randn(h)
    indices = torch.randint(-1, n, (b, s, k), dtype=torch.int32)
    indices[0, 0] = -1  # a query that sees nothing gets zeros
    out = sparse_attention(q, kv, sink, indices, d**-0.5, query_block=4)
    ref = naive(q, kv, sink, indices, d**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out[0, 0] == 0).all()


def test_sink_only_rescales():
    torch.manual_seed(0)
    q, kv = torch.randn(1, 3, 2, 8), torch.randn(1, 4, 8)
    idx = torch.tensor([[[0, 1, 2, 3]] * 3], dtype=torch.int32)
    plain = sparse_attention(q, kv, torch.full((2,), -torch.inf), idx, 0.3)
    ref = torch.softmax(torch.einsum("bshd,bnd->bshn", q, kv) * 0.3, -1) @ kv[:, None]
    torch.testing.assert_close(plain, ref, atol=1e-6, rtol=1e-5)
    muted = sparse_attention(q, kv, torch.full((2,), 50.0), idx, 0.3)
    assert muted.abs().max() < 1e-10


@pytest.mark.parametrize("bad, message", [
    (dict(q=torch.randn(1, 2, 8)), "q must be"),
    (dict(kv=torch.randn(1, 4, 7)), "kv must be"),
    (dict(sink=torch.randn(3)), "sink must be"),
    (dict(indices=torch.full((1, 2, 3), 4, dtype=torch.int32)), "indices must lie"),
    (dict(indices=torch.zeros(1, 2, 3)), "int32 or int64"),
    (dict(backend="cuda-magic"), "backend must be"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(q=torch.randn(1, 2, 2, 8), kv=torch.randn(1, 4, 8), sink=torch.zeros(2),
                indices=torch.zeros(1, 2, 3, dtype=torch.int32), scale=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        sparse_attention(**args)

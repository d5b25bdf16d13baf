"""sparse_attention: the Triton kernels (run by Triton's interpreter on CPU tensors) against the torch
reference, forward and every gradient; FP8 and paged KV storage; error paths."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch
import triton  # noqa: E402,F401  (a dev dependency: `make test` installs it; these tests must run)
from conftest import TOLERANCE, assert_close

from hybrid_attention.attention import window_indices_decode, window_indices_prefill
from hybrid_attention.ops import FP8KV, sparse_attention
from hybrid_attention.quant import fake_quant_nope_fp8


def check(name: str, ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
    """Inputs in fp32: conftest's bound (largest error <= 1e-5 of the reference's RMS). bf16: two correct
    results differ by a rounding at every element (the kernel also rounds P and dS to bf16 before
    its tensor-core dots, like FlashAttention and the TileLang kernel), so the bf16 tolerance bounds
    the relative RMSE, and the largest error may reach 5x that (a wrong row would exceed it)."""
    if dtype != torch.bfloat16:
        assert_close(name, ref, out)
        return
    assert_close(name, ref, out, ratio=5 * TOLERANCE[torch.bfloat16])
    error = relative_rmse(ref, out)
    assert error <= TOLERANCE[torch.bfloat16], f"{name}: relative RMSE {error:.3e}"


def relative_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((out - ref).square().mean().sqrt() / ref.square().mean().sqrt())


def random_lists(b: int, s: int, k: int, n: int, hole_rate: float = 0.3) -> torch.Tensor:
    """[b, s, k] distinct rows of [0, n) per query, a fraction of them -1."""
    rows = torch.rand(b, s, n).argsort(dim=-1)[..., :k]
    return rows.masked_fill(torch.rand(b, s, k) < hole_rate, -1).to(torch.int32)


def hca_prefill_lists(b: int, s: int, window: int, ratio: int) -> torch.Tensor:
    """The official prefill list (SPEC 4): window rows, then compressed entry i at row s + i while
    i < (t + 1) // ratio, -1 after."""
    entry = torch.arange(s // ratio)
    visible = (torch.arange(s) + 1) // ratio
    compressed = torch.where(entry < visible[:, None], entry + s, -1)
    lists = torch.cat((window_indices_prefill(s, window), compressed), dim=-1)
    return lists.to(torch.int32)[None].expand(b, -1, -1).contiguous()


def run(backend, q, kv, sink, indices, **kwargs):
    """Output and the gradients of a fixed random projection of it (w.r.t. q, kv, sink)."""
    leaves = [t.detach().requires_grad_() for t in (q, kv, sink)]
    out = sparse_attention(leaves[0], leaves[1], leaves[2], indices, q.size(-1) ** -0.5, backend=backend,
                           **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out.float() * weight.float()).sum().backward()
    return [out] + [t.grad for t in leaves]


def compare(q, kv, sink, indices, **kwargs):
    names = ("out", "dq", "dkv", "dsink")
    expected = run("torch", q, kv, sink, indices, **kwargs)
    got = run("triton", q, kv, sink, indices, **kwargs)
    for name, ref, out in zip(names, expected, got, strict=True):
        check(name, ref, out, q.dtype)


CASES = [
    pytest.param(2, 9, 4, 32, 20, 12, torch.float32, id="B2-T9-H4-D32-k12-holes-fp32"),
    pytest.param(2, 9, 4, 32, 20, 12, torch.bfloat16, id="B2-T9-H4-D32-k12-holes-bf16"),
    pytest.param(1, 5, 3, 80, 90, 70, torch.float32, id="B1-T5-H3-D80-k70-two-chunks"),
]


@pytest.mark.parametrize("b, s, h, d, n, k, dtype", CASES)
def test_random_lists_with_holes(b, s, h, d, n, k, dtype):
    torch.manual_seed(0)
    q, kv = torch.randn(b, s, h, d).to(dtype), torch.randn(b, n, d).to(dtype)
    indices = random_lists(b, s, k, n)
    indices[0, 0] = -1  # a query that sees nothing
    indices[-1, -1, :64] = -1  # a first chunk with no valid row: the online softmax must not NaN
    compare(q, kv, torch.randn(h), indices)


def test_bf16_error_against_fp64_is_that_of_the_bf16_reference():
    """fp64-anchored: on bf16 inputs, the kernel's error to the float64 oracle is within a small
    factor of the bf16 torch path's own error, for the output and every gradient."""
    torch.manual_seed(3)
    b, s, h, d, n, k = 2, 9, 4, 32, 20, 12
    q, kv, sink = torch.randn(b, s, h, d).bfloat16(), torch.randn(b, n, d).bfloat16(), torch.randn(h)
    indices = random_lists(b, s, k, n)
    oracle = run("torch", q.double(), kv.double(), sink.double(), indices)
    reference = run("torch", q, kv, sink, indices)
    kernel = run("triton", q, kv, sink, indices)
    for name, exact, ref, out in zip(("out", "dq", "dkv", "dsink"), oracle, reference, kernel, strict=True):
        ref_error, error = relative_rmse(exact, ref), relative_rmse(exact, out)
        assert error <= 3 * ref_error + 1e-3, f"{name}: kernel {error:.2e}, bf16 reference {ref_error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_and_compressed_prefill_lists(dtype):
    """HCA-style lists of an odd-length prefill: window rows of the call, then compressed entries."""
    torch.manual_seed(0)
    b, s, h, d, window, ratio = 2, 11, 2, 16, 4, 2
    q = torch.randn(b, s, h, d).to(dtype)
    kv = torch.randn(b, s + s // ratio, d).to(dtype)  # the call's rows, then its entries
    compare(q, kv, torch.randn(h), hca_prefill_lists(b, s, window, ratio))


def test_decode_lists_over_a_ring_buffer():
    """One token per sequence: ring-buffer window slots (oldest first) then compressed rows."""
    torch.manual_seed(0)
    b, h, d, window, n_entries = 3, 4, 32, 8, 6
    kv = torch.randn(b, window + n_entries, d)
    lists = [torch.cat((window_indices_decode(pos, window), window + torch.arange((pos + 1) // 4)))
             for pos in (3, 12, 25)]
    width = max(len(x) for x in lists)
    indices = torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=-1) for x in lists])
    compare(torch.randn(b, 1, h, d), kv, torch.randn(h), indices[:, None])  # int64 lists


def test_rows_with_nothing_to_see_are_zero_even_with_a_minus_inf_sink():
    torch.manual_seed(0)
    q, kv = torch.randn(1, 3, 2, 16), torch.randn(1, 5, 16)
    indices = torch.tensor([[[-1, -1], [0, -1], [-1, -1]]], dtype=torch.int32)
    sink = torch.tensor([float("-inf"), 0.5])
    out, dq, dkv, dsink = run("triton", q, kv, sink, indices)
    assert (out[0, 0] == 0).all() and (out[0, 2] == 0).all()
    assert all(torch.isfinite(t).all() for t in (out, dq, dkv, dsink))
    compare(q, kv, sink, indices)


@pytest.mark.parametrize("rope_dim", [0, 64], ids=["all-fp8", "fp8+bf16-rope"])
def test_fp8_kv_reads_the_fake_quantised_rows(rope_dim):
    """The FP8 storage, decoded in the kernel, is exactly the fake-quantised bf16 rows."""
    torch.manual_seed(0)
    b, s, h, d, n = 2, 4, 3, 128, 24
    rows = torch.randn(b, n, d).bfloat16()
    stored = FP8KV.quantize(rows, rope_dim=rope_dim)
    plain = fake_quant_nope_fp8(rows, rope_dim)
    torch.testing.assert_close(stored.dequantize(torch.bfloat16), plain, atol=0, rtol=0)
    q, sink, indices = torch.randn(b, s, h, d).bfloat16(), torch.randn(h), random_lists(b, s, 10, n)
    ref = sparse_attention(q, plain, sink, indices, 0.1, backend="torch")
    assert_close("torch fp8", ref, sparse_attention(q, stored, sink, indices, 0.1, backend="torch"))
    assert_close("triton fp8", ref, sparse_attention(q, stored, sink, indices, 0.1, backend="triton"))
    # No gradient reaches the stored rows, but q and the sink still learn.
    q.requires_grad_()
    sparse_attention(q, stored, sink, indices, 0.1, backend="triton").float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def paged(kv: torch.Tensor, page_size: int, generator: torch.Generator):
    """A shuffled pool [pages, page_size, d] holding kv [b, n, d] and its block table [b, n / page]."""
    b, n, d = kv.shape
    per_seq = n // page_size
    order = torch.randperm(b * per_seq + 2, generator=generator)  # 2 spare pages nobody uses
    table = order[: b * per_seq].view(b, per_seq)
    pool = torch.randn(b * per_seq + 2, page_size, d, generator=generator).to(kv.dtype)
    pool[table.flatten()] = kv.reshape(b * per_seq, page_size, d)
    return pool, table.to(torch.int32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_paged_kv_equals_contiguous_kv(backend):
    torch.manual_seed(0)
    b, s, h, d, n, page = 2, 5, 4, 80, 24, 8
    q, kv, sink = torch.randn(b, s, h, d), torch.randn(b, n, d), torch.randn(h)
    indices = random_lists(b, s, 9, n)
    pool, table = paged(kv, page, torch.Generator().manual_seed(0))
    expected = run("torch", q, kv, sink, indices)
    got = run(backend, q, pool, sink, indices, block_table=table)
    for name, ref, out in zip(("out", "dq"), expected[:2], got[:2], strict=True):
        check(name, ref, out, q.dtype)
    dpool = got[2]
    assert_close("dkv", expected[2], dpool[table.long()].reshape(b, n, d))
    unused = torch.ones(pool.size(0), dtype=torch.bool)
    unused[table.long().flatten()] = False
    assert (dpool[unused] == 0).all()  # the pages of nobody get no gradient

    stored = FP8KV.quantize(pool, rope_dim=16)
    ref = sparse_attention(q, stored.dequantize(), sink, indices, 0.2, backend="torch", block_table=table)
    assert_close("paged fp8", ref, sparse_attention(q, stored, sink, indices, 0.2, backend=backend,
                                                    block_table=table))


def test_auto_is_the_torch_path_on_cpu():
    torch.manual_seed(0)
    q, kv, sink = torch.randn(1, 4, 2, 16), torch.randn(1, 6, 16), torch.randn(2)
    indices = random_lists(1, 4, 5, 6)
    auto = sparse_attention(q, kv, sink, indices, 0.3)
    assert torch.equal(auto, sparse_attention(q, kv, sink, indices, 0.3, backend="torch"))


def test_torch_path_skips_columns_no_query_uses():
    """Dropping all -1 columns of a block (early HCA queries) changes nothing."""
    torch.manual_seed(0)
    q, kv, sink = torch.randn(1, 12, 2, 16), torch.randn(1, 30, 16), torch.randn(2)
    indices = hca_prefill_lists(1, 12, 4, 3)
    assert indices.size(-1) == 8
    whole = sparse_attention(q, kv[:, :16], sink, indices, 0.3, query_block=12)
    blocked = sparse_attention(q, kv[:, :16], sink, indices, 0.3, query_block=2)
    assert_close("blocked", whole, blocked)


@pytest.mark.parametrize("bad, message", [
    (dict(kv=torch.randn(3, 4, 8), block_table=torch.zeros(1, 2)), "block_table must be int"),
    (dict(kv=torch.randn(3, 4, 8), block_table=torch.zeros(2, 2, dtype=torch.int32)), "block_table must be"),
    (dict(kv=torch.randn(3, 4, 8), block_table=torch.full((1, 2), 3, dtype=torch.int32)),
     "block_table entries must lie"),
    (dict(kv=torch.randn(3, 2, 8), block_table=torch.zeros(1, 1, dtype=torch.int32),
          indices=torch.full((1, 2, 3), 2, dtype=torch.int32)), "indices must lie"),
    (dict(kv=FP8KV(torch.zeros(1, 4, 8, dtype=torch.float8_e4m3fn), torch.zeros(1, 4, 1, dtype=torch.int8))),
     "FP8KV.exponents"),
    (dict(kv=FP8KV(torch.zeros(1, 4, 64), torch.zeros(1, 4, 1, dtype=torch.int8))), "float8_e4m3fn"),
    (dict(kv=FP8KV(torch.zeros(1, 4, 64, dtype=torch.float8_e4m3fn), torch.zeros(1, 4, 1, dtype=torch.int8))),
     "q has head_dim 8"),
    (dict(kv="rows"), "kv must be a torch.Tensor or an FP8KV"),
])
def test_bad_storage_is_named(bad, message):
    args = dict(q=torch.randn(1, 2, 2, 8), kv=torch.randn(1, 4, 8), sink=torch.zeros(2),
                indices=torch.zeros(1, 2, 3, dtype=torch.int32), scale=1.0)
    args.update(bad)
    error = TypeError if isinstance(args["kv"], str) else ValueError  # not a tensor: a TypeError
    with pytest.raises(error, match=message):
        sparse_attention(**args)

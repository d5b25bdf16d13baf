"""ops.joint_attention: the blocked autograd Function (cpu.py) against the SPEC 4 construction with
sparse attention through autograd (reference.py): output, teacher and every gradient."""

import pytest
import torch
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_attention.ops.joint_attention import cpu, joint_attention, joint_attention_reference

# (batch, seq, start, heads, dim, window, ratio, mode, top-k)
CASES = [
    pytest.param(2, 37, 0, 3, 16, 8, 0, "window", 0, id="B2-T37-window"),
    pytest.param(1, 40, 13, 2, 16, 8, 0, "window", 0, id="B1-T40-from13-window"),
    pytest.param(2, 45, 0, 3, 16, 8, 8, "dense", 0, id="B2-T45-hca-r8"),
    pytest.param(2, 30, 21, 2, 16, 8, 8, "dense", 0, id="B2-T30-from21-hca-r8"),
    pytest.param(2, 41, 0, 3, 16, 8, 4, "picks", 5, id="B2-T41-csa-r4-topk5"),
    pytest.param(1, 23, 50, 2, 32, 8, 4, "picks", 6, id="B1-T23-from50-csa-topk6"),
    pytest.param(2, 29, 3, 2, 16, 8, 4, "dense", 0, id="B2-T29-from3-dense-csa"),
]


def make_inputs(b, s, start, h, d, window, ratio, mode, topk, dtype=torch.float32, seed=0, drop=0.0):
    """q, kv (min(start, window - 1) rows of context, then the chunk's), sink, compressed, picks:
    top-k of random scores over the visible entries, -1 where fewer are visible, and a `drop`
    share of the rest set to -1 too."""
    gen = torch.Generator().manual_seed(seed)
    context = min(start, window - 1)
    q = torch.randn(b, s, h, d, generator=gen).to(dtype)
    kv = torch.randn(b, context + s, d, generator=gen).to(dtype)
    sink = torch.randn(h, generator=gen)
    compressed = picks = None
    if mode != "window":
        n = (start + s) // ratio
        compressed = torch.randn(b, n, d, generator=gen).to(dtype)
    if mode == "picks":
        visible = torch.div(start + torch.arange(s) + 1, ratio, rounding_mode="floor")
        scores = torch.rand(b, s, max(n, 1), generator=gen)[..., :n]
        scores = scores.masked_fill(torch.arange(n) >= visible[:, None], -1.0)
        k = min(topk, n)
        picks = scores.topk(k, dim=-1).indices
        dropped = torch.rand(picks.shape, generator=gen) < drop
        picks = picks.masked_fill((picks >= visible[:, None]) | dropped, -1)  # holes
    return q, kv, sink, compressed, picks


def is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def run(fn, inputs, window, start, ratio, grads):
    q, kv, sink, compressed, picks = (t.detach().clone() if is_float(t) else t for t in inputs)
    for t in (q, kv, sink, compressed):
        if t is not None:
            t.requires_grad_(True)
    out, teacher = fn(q, kv, sink, q.size(-1) ** -0.5, window, start, compressed, ratio, picks)
    out.backward(grads)
    return out, teacher, [t.grad if t is not None else None for t in (q, kv, sink, compressed)]


def fast(q, kv, sink, scale, window, start, compressed, ratio, picks):
    return joint_attention(q, kv, sink, scale, window, start, compressed, ratio, picks,
                           want_teacher=compressed is not None, backend="torch")


@pytest.fixture(autouse=True, params=[(8, 8), (12, 4), (10, 3)], ids=lambda p: f"chunk{p[0]}-sub{p[1]}")
def small_blocks(monkeypatch, request):
    """Many chunks even at these lengths; several bands per chunk, and chunks that are not a
    multiple of the sub-block (10 queries in bands of 3: chunks of 9), with a last band cut short."""
    chunk, sub = request.param
    monkeypatch.setattr(cpu, "QUERY_BLOCK", chunk)
    monkeypatch.setattr(cpu, "SUB_BLOCK", sub)


@pytest.mark.parametrize("b, s, start, h, d, window, ratio, mode, topk", CASES)
def test_output_teacher_and_gradients_equal_the_reference(b, s, start, h, d, window, ratio, mode, topk):
    inputs = make_inputs(b, s, start, h, d, window, ratio, mode, topk)
    grads = torch.randn(b, s, h, d)
    ref = run(joint_attention_reference, inputs, window, start, ratio, grads)
    got = run(fast, inputs, window, start, ratio, grads)
    assert_close("out", ref[0], got[0])
    if ref[1] is not None:
        assert_close("teacher", ref[1], got[1])
    for name, r, g in zip(("dq", "dkv", "dsink", "dcompressed"), ref[2], got[2], strict=True):
        if r is not None:
            assert_close(name, r, g)


@pytest.mark.parametrize("mode, ratio", [("window", 0), ("dense", 4), ("picks", 4)])
def test_fp64_gradcheck(mode, ratio):
    q, kv, sink, compressed, picks = make_inputs(1, 11, 2, 2, 4, 4, ratio, mode, 3, dtype=torch.float64)
    sink = sink.double()
    args = [t.requires_grad_(True) for t in (q, kv, sink)]
    if compressed is not None:
        args.append(compressed.requires_grad_(True))

    def fn(q, kv, sink, compressed=None):
        return cpu.JointAttention.apply(q, kv, compressed, sink, picks, 0.5, 4, 2, ratio, False)[0].double()

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_bf16_error_against_fp64_is_no_larger_than_the_bf16_reference():
    inputs = make_inputs(2, 41, 5, 3, 16, 8, 4, "picks", 5, dtype=torch.bfloat16, seed=3)
    grads = torch.randn(2, 41, 3, 16)
    exact = run(joint_attention_reference, [t.double() if is_float(t) else t for t in inputs],
                8, 5, 4, grads.double())
    ref = run(joint_attention_reference, inputs, 8, 5, 4, grads)
    got = run(fast, inputs, 8, 5, 4, grads)
    assert (got[0].double() - exact[0]).abs().max() <= (ref[0].double() - exact[0]).abs().max() + 1e-3
    for name, e, r, g in zip(("dq", "dkv", "dsink", "dc"), exact[2], ref[2], got[2], strict=True):
        err_fast = (g.double() - e).abs().max()
        err_ref = (r.double() - e).abs().max()
        assert err_fast <= err_ref + 2e-2 * e.abs().max(), f"{name}: {err_fast} vs {err_ref}"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), s=st.integers(1, 30), start=st.integers(0, 20), window=st.sampled_from([1, 4, 8]),
       mode=st.sampled_from(["window", "dense", "picks"]), topk=st.integers(1, 6), seed=st.integers(0, 99))
def test_random_shapes(b, s, start, window, mode, topk, seed):
    ratio = 0 if mode == "window" else 4
    inputs = make_inputs(b, s, start, 2, 8, window, ratio, mode, topk, seed=seed)
    if mode == "picks" and inputs[3].size(1) == 0:
        mode, inputs = "dense", inputs[:4] + (None,)
    grads = torch.randn(b, s, 2, 8, generator=torch.Generator().manual_seed(seed))
    ref = run(joint_attention_reference, inputs, window, start, ratio, grads)
    got = run(fast, inputs, window, start, ratio, grads)
    assert_close("out", ref[0], got[0])
    for name, r, g in zip(("dq", "dkv", "dcompressed"), ref[2][:2] + ref[2][3:], got[2][:2] + got[2][3:],
                          strict=True):
        if r is not None and r.numel():  # no entries yet: an empty gradient
            assert_close(name, r, g)
    # dsink[h] = -sum over (batch, query) of P_sink * <dO, O>: terms of both signs, so its rounding
    # error scales with the sum of their sizes (bounded by sum |<dO, O>|), not with the result's.
    magnitude = (grads.double() * ref[0].double()).sum(-1).abs().sum((0, 1)).max()
    assert (got[2][2].double() - ref[2][2].double()).abs().max() <= 1e-5 * magnitude


@pytest.mark.parametrize("change, message", [
    (dict(kv=torch.zeros(1, 5, 8)), r"kv must be \[1, 4, 8\]"),
    (dict(sink=torch.zeros(3)), r"sink must be \[2\]"),
    (dict(window_size=0), "window_size must be a positive int"),
    (dict(start=-1), "start must be a non-negative int"),
    (dict(compressed=torch.zeros(1, 0, 8), ratio=4, start=4, kv=torch.zeros(1, 7, 8)),
     "compressed holds 0 entries"),
    (dict(picks=torch.zeros(1, 4, 2, dtype=torch.int64)), "give compressed too"),
    (dict(compressed=torch.zeros(1, 1, 8), ratio=4, picks=torch.full((1, 4, 2), 3)), "picks must lie in"),
])
def test_bad_inputs_name_what_is_wrong(change, message):
    args = {**dict(q=torch.zeros(1, 4, 2, 8), kv=torch.zeros(1, 4, 8), sink=torch.zeros(2), scale=1.0,
                   window_size=4, start=0), **change}
    with pytest.raises(ValueError, match=message):
        joint_attention(**args)


@pytest.mark.parametrize("b, s, h, d", [(2, 37, 3, 16), (1, 130, 2, 80)])
def test_full_attention_train_equals_the_blocked_construction(b, s, h, d):
    """The "full" kind's training op (a fused causal kernel, the sink as one more key) against the
    plain construction through autograd: output and the gradients of q, rows and sink."""
    gen = torch.Generator().manual_seed(s)
    q, rows, sink = torch.randn(b, s, h, d, generator=gen), torch.randn(b, s, d, generator=gen), \
        torch.randn(h, generator=gen) * 3
    grads = torch.randn(b, s, h, d, generator=gen)
    results = []
    for fn in (lambda q, rows, sink: cpu.joint_attention_inference(q, torch.arange(s), sink, d ** -0.5,
                                                                   rows=rows),
               lambda q, rows, sink: cpu.full_attention_train(q, rows, sink, d ** -0.5)):
        leaves = [t.clone().requires_grad_(True) for t in (q, rows, sink)]
        out = fn(*leaves)
        out.backward(grads)
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, ref, got in zip(("out", "dq", "drows", "dsink"), *results, strict=True):
        assert_close(name, ref, got)


@pytest.mark.parametrize("case", [2, 4], ids=["hca", "csa"])
def test_a_memo_serves_the_rerun_of_checkpointing_once(case, monkeypatch):
    """With a memo, the first call (forward, no graph) keeps its results; the same call again
    (the rerun in backward) takes them instead of computing the forward, and differentiates
    exactly as a call without a memo; a third call computes again."""
    b, s, start, h, d, window, ratio, mode, topk = CASES[case].values
    inputs = make_inputs(b, s, start, h, d, window, ratio, mode, topk)
    grads = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(5))
    plain = run(lambda *a: joint_attention(*a, want_teacher=True), inputs, window, start, ratio, grads)

    forwards = []
    real_forward = cpu._forward
    monkeypatch.setattr(cpu, "_forward", lambda *a: forwards.append(1) or real_forward(*a))
    memo = {}
    with torch.no_grad():  # the first run of a checkpointed piece
        first = joint_attention(*inputs[:3], d ** -0.5, window, start, inputs[3], ratio, inputs[4],
                                want_teacher=True, memo=memo)
    assert len(forwards) == 1 and set(memo) == {"out", "teacher"}
    rerun = run(lambda *a: joint_attention(*a, want_teacher=True, memo=memo), inputs, window, start, ratio,
                grads)
    assert len(forwards) == 1 and not memo  # served from the memo, and only once
    assert torch.equal(rerun[0], first[0]) and torch.equal(rerun[1], first[1])
    assert torch.equal(rerun[0], plain[0]) and torch.equal(rerun[1], plain[1])
    for got, want in zip(rerun[2], plain[2], strict=True):
        assert torch.equal(got, want)
    run(lambda *a: joint_attention(*a, memo=memo), inputs, window, start, ratio, grads)
    assert len(forwards) == 2  # an emptied memo computes again

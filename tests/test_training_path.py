"""The layer's training path (`HybridAttention._attend_train`: joint_attention + indexer_loss, whose
backward works a query block at a time) against two other constructions through plain autograd:
the same wiring on the SPEC 4 reference ops (flat row lists, `*_reference`, the compressors'
reference pooling) through plain autograd, nothing recomputed, and the blocked inference path
(`_attend`). Outputs, the indexer loss, and the gradients of x and of every
parameter, for every kind, batch 2, lengths off the ratios, a chunk that continues a state,
dense CSA, and top-k smaller than the visible entries."""

import copy

import pytest
import torch
from conftest import TOLERANCE, assert_close, layer_of_kind

from hybrid_attention import AttentionConfig, attention, modules
from hybrid_attention.ops.compress import api as compress_api
from hybrid_attention.ops.compress import compress_reference
from hybrid_attention.ops.indexer_loss import indexer_loss_reference
from hybrid_attention.ops.joint_attention import cpu, joint_attention_reference

TINY = AttentionConfig.preset("tiny")  # window 8, CSA ratio 4 with top-k 4, HCA ratio 8


def reference_ops(q, kv, sink, scale, window_size, start, compressed, ratio, picks, want_teacher,
                  backend="auto", memo=None):
    return joint_attention_reference(q, kv, sink, scale, window_size, start, compressed, ratio, picks)


def whole(function, rows, shared, params, piece=None, project=None):
    """`recompute_pieces` as one piece through plain autograd (nothing recomputed)."""
    s = next(t.size(1) for t in rows if t is not None)
    y, sums = function(0, s, rows, shared)
    if project is not None:
        y = torch.nn.functional.linear(y, project.to(y.dtype))
    return y, sums if sums is not None else y.new_zeros(0)


def step(layer, x, prefix, dense_csa, dtype=torch.float32):
    """Loss <y, g> + indexer loss of a chunk x after `prefix` (streamed without gradients)."""
    layer.zero_grad(set_to_none=True)
    state = None
    if prefix is not None:
        state = layer.new_state(x.size(0))
        with torch.no_grad():
            layer(prefix, state=state)
    x = x.detach().clone().requires_grad_(True)
    y, aux = layer(x, state=state, return_aux=True, dense_csa=dense_csa)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    ((y * g).sum() + aux["indexer_loss"]).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), aux["indexer_loss"].detach(), x.grad, grads


CASES = [pytest.param(kind, s, prefix, dense, id=f"{kind}-T{s}" + (f"-after{prefix}" if prefix else "")
                      + ("-dense" if dense else ""))
         for kind, s, prefix, dense in [("csa", 37, 0, False), ("csa", 23, 19, False), ("csa", 37, 0, True),
                                        ("csa", 21, 30, True), ("hca", 37, 0, False), ("hca", 29, 13, False),
                                        ("window", 37, 0, False), ("window", 17, 11, False)]]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "QUERY_BLOCK", 12)  # chunks of 12 queries in 3 bands of 4
    monkeypatch.setattr(cpu, "SUB_BLOCK", 4)
    monkeypatch.setattr(modules, "RECOMPUTE_ROWS", 8)  # several recomputed pieces per chunk


@pytest.mark.parametrize("kind, s, prefix_len, dense", CASES)
def test_training_path_equals_the_reference_ops_and_the_inference_path(kind, s, prefix_len, dense,
                                                                        monkeypatch):
    layer = layer_of_kind(TINY, kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, s, TINY.dim, generator=gen)
    prefix = torch.randn(2, prefix_len, TINY.dim, generator=gen) if prefix_len else None
    fast = step(layer, x, prefix, dense)
    with monkeypatch.context() as patch:
        patch.setattr(attention, "joint_attention", reference_ops)
        patch.setattr(attention, "indexer_loss", indexer_loss_reference)
        patch.setattr(attention, "recompute_pieces", whole)
        patch.setattr(attention, "_checkpointed", attention._called)  # plain autograd throughout
        patch.setattr(compress_api, "compress_cpu", compress_reference)
        oracle = step(layer, x, prefix, dense)
    assert_close("y", oracle[0], fast[0])
    assert_close("indexer loss", oracle[1], fast[1])
    assert_close("dx", oracle[2], fast[2])
    for name, grad in oracle[3].items():
        if grad is None:
            assert fast[3][name] is None, name
        else:
            assert_close(name, grad, fast[3][name])
    if not dense:  # the blocked inference path through autograd (no indexer loss, no dense mode)
        with monkeypatch.context() as patch:
            patch.setattr(attention.HybridAttention, "_attend_train", blocked_inference_path)
            blocked = step(layer, x, prefix, dense)
        assert_close("y", blocked[0], fast[0])
        assert_close("dx", blocked[2], fast[2])
        for name, grad in blocked[3].items():
            if grad is not None:
                assert_close(name, grad, fast[3][name])
    if kind == "csa":
        assert float(fast[1]) > 0 and any(n.startswith("indexer.") and g is not None
                                          for n, g in fast[3].items())


def blocked_inference_path(self, x, keys, positions, freqs, compressed, index_keys, head_weights, *_):
    qr = self.q_norm(self.wq_a(x))
    context = keys.size(1) - qr.size(1)  # rows before the chunk's own
    y, aux = self._attend(qr, keys, context, positions, freqs, compressed, index_keys, head_weights)
    return y, {**aux, "indexer_loss": qr.new_zeros(())}


def test_a_chunk_shorter_than_the_ratio_has_no_entries_and_still_trains():
    layer = layer_of_kind(TINY, "csa")
    x = torch.randn(2, 3, TINY.dim, requires_grad=True)  # 3 tokens: no compressed entry yet
    y, aux = layer(x, return_aux=True)
    (y.sum() + aux["indexer_loss"]).backward()
    assert float(aux["indexer_loss"].detach()) == 0 and x.grad.abs().sum() > 0


def test_top_k_is_smaller_than_the_visible_entries():
    layer = layer_of_kind(TINY, "csa")
    with torch.enable_grad():
        _, aux = layer(torch.randn(1, 64, TINY.dim, requires_grad=True), return_aux=True)
    # 64 tokens: 16 entries visible at the end, top-k 4 plus the window of 8
    assert aux["attended_keys"] < 8 + TINY.index_topk


def test_bf16_gradients_are_within_the_fp64_anchored_bound():
    layer = layer_of_kind(TINY, "csa")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 37, TINY.dim, generator=gen)
    exact = step(copy.deepcopy(layer).double(), x.double(), None, False)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    fast = step(low, x.bfloat16(), None, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "joint_attention", reference_ops)
        patch.setattr(attention, "indexer_loss", indexer_loss_reference)
        ref = step(low, x.bfloat16(), None, False)

    def err(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    assert err(fast[2], exact[2]) <= err(ref[2], exact[2]) + 2e-2
    for name, grad in exact[3].items():
        if grad is not None and fast[3][name] is not None:
            assert err(fast[3][name], grad) <= err(ref[3][name], grad) + 2e-2, name


def test_bf16_autocast_training_is_within_the_fp64_anchored_bound():
    """fp32 master weights, bf16 autocast: the gradients' error against fp64 is no larger than
    that of the same step through the reference ops under autocast (plus bf16 noise)."""
    layer = layer_of_kind(TINY, "csa")
    x = torch.randn(2, 37, TINY.dim, generator=torch.Generator().manual_seed(4))
    exact = step(copy.deepcopy(layer).double(), x.double(), None, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = step(layer, x, None, False)
    with pytest.MonkeyPatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
        patch.setattr(attention, "joint_attention", reference_ops)
        patch.setattr(attention, "indexer_loss", indexer_loss_reference)
        ref = step(layer, x, None, False)

    def err(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    assert all(g is None or g.dtype == torch.float32 for g in fast[3].values())  # fp32 master grads
    assert err(fast[2], exact[2]) <= err(ref[2], exact[2]) + 2e-2
    for name, grad in exact[3].items():
        if grad is not None:
            assert err(fast[3][name], grad) <= err(ref[3][name], grad) + 2e-2, name


@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    from torch.utils.checkpoint import checkpoint

    layer = layer_of_kind(TINY, kind)
    x = torch.randn(2, 29, TINY.dim, generator=torch.Generator().manual_seed(5))
    plain = step(layer, x, None, False)

    def checkpointed(x, **kwargs):
        return checkpoint(lambda t: layer(t, **kwargs), x, use_reentrant=False)

    layer.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    y, aux = checkpointed(leaf, return_aux=True)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ((y * g).sum() + aux["indexer_loss"]).backward()
    assert torch.equal(leaf.grad, plain[2])
    for name, p in layer.named_parameters():
        assert (p.grad is None) == (plain[3][name] is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, plain[3][name]), name


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("rows_grad", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_pieces_equal_plain_autograd_and_keep_only_their_inputs(rows_grad, autocast, project):
    """`recompute_pieces`: the same output, sums and gradients (of the rows, of the shared tensors
    and of the parameters, summed over pieces) as autograd through the function run whole; only the
    inputs are saved for backward. With `project`, a last linear layer whose backward is done by
    hand outside the rerun: its weight's gradient too. Under bf16 autocast, where the two round
    their own way, each is held to the fp64 run: no further from it than plain autograd, plus bf16
    noise."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.nn.Parameter(torch.randn(12, 6, generator=gen))
    last = torch.nn.Parameter(torch.randn(5, 12, generator=gen)) if project else None
    frozen = torch.nn.Parameter(torch.randn(12, generator=gen), requires_grad=False)
    rows = torch.randn(2, 21, 6, generator=gen)  # 21 tokens: pieces of 8, 8 and 5
    shared = torch.randn(2, 30, 12, generator=gen)  # read whole by every piece
    positions = torch.arange(3, 24)
    g, g_sums = torch.randn(2, 21, 5 if project else 12, generator=gen), torch.tensor([0.7, 5.0])

    def function(a, e, pieces, common):
        r, nothing = pieces
        keys, label = common
        assert nothing is None and label == "not a tensor"
        y = torch.nn.functional.linear(r, weight.to(r.dtype)) * frozen.to(r.dtype)
        y = torch.tanh(y) * positions[a:e, None].cos() + y.square().mean(-1, keepdim=True)
        mixed = torch.einsum("bsd,btd->bst", y, keys[:, 3:12]).softmax(-1) @ keys[:, 3:12]
        loss = mixed.float().square().sum()
        return y + mixed, torch.stack((loss, torch.tensor(float(e - a))))

    results = {}
    for how in ("plain", "recomputed", "fp64") if autocast else ("plain", "recomputed"):
        dtype = torch.float64 if how == "fp64" else torch.float32
        leaf = rows.to(dtype, copy=True).requires_grad_(rows_grad)
        common = shared.to(dtype, copy=True).requires_grad_()
        weight.grad = None
        if project:
            last.grad = None
        saved = []
        keep = saved.append
        with torch.autograd.graph.saved_tensors_hooks(lambda t, keep=keep: keep(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and how != "fp64"):
            if how == "recomputed":
                y, sums = modules.recompute_pieces(function, [leaf, None], [common, "not a tensor"],
                                                   [weight, frozen], piece=8, project=last)
            else:
                y, sums = function(0, 21, [leaf, None], [common, "not a tensor"])
                if project:
                    y = torch.nn.functional.linear(y, last.to(y.dtype))
        torch.autograd.backward([y, sums], [g.to(y.dtype), g_sums.to(sums.dtype)])
        results[how] = dict(y=y.detach(), sums=sums.detach(), drows=leaf.grad, dshared=common.grad,
                            dweight=weight.grad, dproject=last.grad if project else None)
        if how == "recomputed":
            recomputed_saved = saved
    plain, got = results["plain"], results["recomputed"]
    assert got["y"].dtype == plain["y"].dtype and got["dweight"].dtype == torch.float32
    assert float(got["sums"][1]) == 21  # the counts add up over the pieces
    assert (got["drows"] is None) == (not rows_grad)
    assert frozen.grad is None
    for name, value in got.items():
        if value is None:
            continue
        if not autocast:
            assert_close(name, plain[name], value)
        else:
            exact = results["fp64"][name]
            assert (value - exact).abs().max() <= (plain[name] - exact).abs().max() \
                + TOLERANCE[torch.bfloat16] * exact.abs().max(), name
    if project:
        assert got["dproject"].dtype == torch.float32
    # rows, shared, params (and the projection's weight)
    assert len(recomputed_saved) == 4 + project and all(t.numel() <= shared.numel() for t in recomputed_saved)


def test_recomputed_pieces_when_only_the_sums_have_a_graph():
    """As in the indexer's warm-up: the output has no graph (nothing it uses trains), the sums do."""
    gen = torch.Generator().manual_seed(9)
    rows, shared = torch.randn(1, 13, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    weight = torch.nn.Parameter(torch.randn(4, 4, generator=gen))

    def function(a, e, pieces, common):
        (r,), (keys,) = pieces, common
        y = r @ keys.transpose(1, 2)  # no trainable input
        return y, (torch.nn.functional.linear(r, weight) @ keys.transpose(1, 2)).square().sum()[None]

    expected = torch.autograd.grad(function(0, 13, [rows], [shared])[1].sum(), weight)[0]
    y, sums = modules.recompute_pieces(function, [rows], [shared], [weight], piece=4)
    torch.autograd.backward([y, sums], [torch.ones_like(y), torch.ones_like(sums)])
    assert_close("dweight", expected, weight.grad)


def test_without_return_aux_the_picks_and_gradients_are_the_same():
    """Autograd on but no indexer loss asked for: the query side still chooses the picks (in each
    piece's first run, reused when backward recomputes it), so y and dx equal those of a step with
    return_aux, and y equals the no-grad inference path's."""
    layer = layer_of_kind(TINY, "csa")
    x = torch.randn(2, 37, TINY.dim, generator=torch.Generator().manual_seed(5), requires_grad=True)
    results = []
    for return_aux in (False, True):
        x.grad = None
        out = layer(x, return_aux=return_aux)
        y = out[0] if return_aux else out
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone()))
    with torch.no_grad():
        inference = layer(x)
    assert_close("y", results[1][0], results[0][0])
    assert_close("dx", results[1][1], results[0][1])
    assert_close("y vs inference", inference, results[0][0])

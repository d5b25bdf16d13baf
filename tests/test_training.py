"""Gradients through the layer, and the indexer's KL loss (SPEC 12)."""

import torch
from conftest import layer_of_kind

from hybrid_attention import AttentionConfig
from hybrid_attention.ops.indexer_loss.reference import kl_to_teacher

TINY = AttentionConfig.preset("tiny")


def test_gradients_reach_every_trained_parameter():
    for kind in ("csa", "hca", "window", "full"):
        layer = layer_of_kind(TINY, kind)
        x = torch.randn(2, 30, TINY.dim, requires_grad=True)
        layer(x).square().mean().backward()
        for name, p in layer.named_parameters():
            if name.startswith("indexer."):
                assert p.grad is None, f"{kind}: {name} must learn only from the indexer loss"
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind}: no gradient for {name}"
        assert x.grad.abs().sum() > 0


def test_gradient_matches_a_finite_difference():
    layer = layer_of_kind(TINY, "hca").double()
    x = torch.randn(1, 20, TINY.dim, dtype=torch.float64)
    for name in ("compressor.ape", "attn_sink", "wkv.weight"):
        param = dict(layer.named_parameters())[name]
        direction = torch.randn_like(param)
        layer.zero_grad()
        layer(x).sum().backward()
        analytic = (param.grad * direction).sum().item()
        eps = 1e-3
        with torch.no_grad():
            param += eps * direction
            up = layer(x).sum().item()
            param -= 2 * eps * direction
            down = layer(x).sum().item()
            param += eps * direction
        numeric = (up - down) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(numeric)), (name, numeric, analytic)


def test_kl_loss_by_hand():
    # one query, one head, two entries: teacher (0.2, 0.6) -> normalised (0.25, 0.75)
    probs = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2)
    student = torch.tensor([0.0, 0.0]).view(1, 1, 2)  # uniform
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    total, count = kl_to_teacher(probs.sum(2), student, valid)  # the teacher: summed over heads
    expected = 0.25 * torch.log(torch.tensor(0.5)) + 0.75 * torch.log(torch.tensor(1.5))
    assert count == 1 and abs(total.item() - expected.item()) < 1e-6
    # masked entries and queries without entries do not count
    valid2 = torch.tensor([[[True, False], [False, False]]])
    total, count = kl_to_teacher(torch.rand(1, 2, 3, 2).sum(2), torch.randn(1, 2, 2), valid2)
    assert count == 1 and abs(total.item()) < 1e-6  # one entry: teacher = student = 1


def test_indexer_loss_trains_only_the_indexer_and_goes_down():
    layer = layer_of_kind(TINY, "csa")
    torch.manual_seed(0)
    x = torch.randn(2, 64, TINY.dim)
    for dense in (True, False):  # dense warm-up, then sparse training
        _, aux = layer(x, return_aux=True, dense_csa=dense)
        layer.zero_grad()
        aux["indexer_loss"].backward()
        grads = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and all(n.startswith("indexer.") for n in grads), grads
    optimizer = torch.optim.Adam(layer.indexer.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, aux = layer(x, return_aux=True, dense_csa=True)
        optimizer.zero_grad()
        aux["indexer_loss"].backward()
        optimizer.step()
        losses.append(aux["indexer_loss"].item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses[::10]


def test_non_csa_layers_report_a_zero_indexer_loss():
    _, aux = layer_of_kind(TINY, "hca")(torch.randn(1, 10, TINY.dim), return_aux=True)
    assert aux["indexer_loss"].item() == 0

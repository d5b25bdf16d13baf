"""compress: the Triton pooling kernels (run by Triton's interpreter on CPU tensors) against the torch
reference, forward and every gradient; the reference against the Compressor's own pooling; the
streaming `previous` block; error paths."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch
import triton  # noqa: E402,F401  (a dev dependency: `make test` installs it; these tests must run)
from conftest import assert_close

from hybrid_attention.compressor import Compressor
from hybrid_attention.ops import compress
from hybrid_attention.ops.compress import compress_reference, cpu


def run_reference(kv, score, ape, ratio, overlap, previous=None):
    """The reference through plain autograd: entries and the gradients of kv, score and ape."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (kv, score, ape)]
    out = compress_reference(*leaves, ratio, overlap, previous)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return [out] + [None if t is None else t.grad for t in leaves]


def run(backend, kv, score, ape, ratio, overlap, previous=None):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (kv, score, ape)]
    out = compress(*leaves, ratio, overlap, previous, backend=backend)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return [out] + [None if t is None else t.grad for t in leaves]


def inputs(b, s, width, ratio, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv, score = torch.randn(b, s, width, generator=g), 2 * torch.randn(b, s, width, generator=g)
    return kv.to(dtype), score.to(dtype), torch.randn(ratio, width, generator=g)


@pytest.mark.parametrize("b, s, d, ratio, overlap, dtype", [
    pytest.param(2, 23, 24, 4, True, torch.float32, id="B2-T23-D24-r4-overlap"),
    pytest.param(2, 23, 24, 4, True, torch.bfloat16, id="B2-T23-D24-r4-overlap-bf16"),
    pytest.param(1, 17, 40, 3, True, torch.float32, id="B1-T17-D40-r3-overlap"),
    pytest.param(2, 35, 16, 8, False, torch.float32, id="B2-T35-D16-r8"),
    pytest.param(1, 300, 16, 128, False, torch.float32, id="B1-T300-D16-r128"),
])
def test_triton_matches_reference(b, s, d, ratio, overlap, dtype):
    kv, score, ape = inputs(b, s, 2 * d if overlap else d, ratio, dtype)
    expected = run("torch", kv, score, ape, ratio, overlap)
    got = run("triton", kv, score, ape, ratio, overlap)
    assert got[0].shape == (b, s // ratio, d) and got[0].dtype == torch.float32
    for name, ref, out in zip(("entries", "dkv", "dscore", "dape"), expected, got, strict=True):
        # The pooling is fp32 for every input dtype; gradients come back in the input's dtype.
        assert_close(name, ref, out, ratio=2e-2 if out.dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("b, s, d, ratio, overlap, dtype, with_ape, with_previous", [
    pytest.param(2, 23, 24, 4, True, torch.float32, True, False, id="overlap-T23"),
    pytest.param(2, 40, 24, 4, True, torch.float32, True, True, id="overlap-T40-previous"),
    pytest.param(1, 37, 16, 4, True, torch.float32, False, True, id="overlap-no-ape-previous"),
    pytest.param(2, 23, 24, 4, True, torch.bfloat16, True, False, id="overlap-bf16"),
    pytest.param(2, 35, 16, 8, False, torch.float32, True, False, id="r8"),
    pytest.param(1, 300, 16, 128, False, torch.float32, True, False, id="r128-T300"),
    pytest.param(1, 3, 16, 4, True, torch.float32, True, False, id="shorter-than-a-block"),
])
def test_torch_backend_equals_the_reference_forward_and_backward(b, s, d, ratio, overlap, dtype, with_ape,
                                                                 with_previous, monkeypatch):
    """The chunked autograd Function (chunks of 2 blocks: entries, and the overlap's previous
    block, cross chunk boundaries) against the reference through autograd."""
    monkeypatch.setattr(cpu, "CHUNK_BLOCKS", 2)
    width = 2 * d if overlap else d
    kv, score, ape = inputs(b, s, width, ratio, dtype, seed=3)
    ape = ape if with_ape else None
    previous = None
    if with_previous:
        g = torch.Generator().manual_seed(4)
        previous = (torch.randn(b, ratio, width, generator=g), torch.randn(b, ratio, width, generator=g))
    expected = run_reference(kv, score, ape, ratio, overlap, previous)
    got = run("torch", kv, score, ape, ratio, overlap, previous)
    assert got[0].shape == (b, s // ratio, d) and got[0].dtype == torch.float32
    for name, ref, out in zip(("entries", "dkv", "dscore", "dape"), expected, got, strict=True):
        if ref is None:
            assert out is None, name
        else:
            assert out.dtype == ref.dtype and out.shape == ref.shape, name
            if ref.numel():
                assert_close(name, ref, out)


def test_torch_backend_keeps_only_its_inputs_and_entries():
    """No slot, softmax or product tensor of the sequence's length is saved for backward."""
    kv, score, ape = inputs(1, 64, 32, 4)
    leaves = [t.requires_grad_() for t in (kv, score, ape)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = compress(*leaves, 4, True, backend="torch")
    assert out.shape == (1, 16, 16)
    assert max(t.numel() for t in saved) == kv.numel()
    assert sum(t.numel() for t in saved) <= 2 * kv.numel() + ape.numel() + 2 * 4 * 32 + out.numel()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_previous_block_continues_a_stream(backend):
    """Pooling a prefix, then the rest with the prefix's last block as `previous` (scores with ape,
    as the compressor state holds them), gives the entries of pooling everything at once."""
    ratio, d = 4, 16
    kv, score, ape = inputs(2, 24, 2 * d, ratio, seed=1)
    whole = compress(kv, score, ape, ratio, True, backend="torch")
    cut = 12
    head = compress(kv[:, :cut], score[:, :cut], ape, ratio, True, backend=backend)
    previous = (kv[:, cut - ratio:cut], score[:, cut - ratio:cut] + ape)
    tail = compress(kv[:, cut:], score[:, cut:], ape, ratio, True, previous, backend=backend)
    assert_close("streamed", whole, torch.cat((head, tail), dim=1))
    got = run(backend, kv[:, cut:], score[:, cut:], ape, ratio, True, previous)
    expected = run("torch", kv[:, cut:], score[:, cut:], ape, ratio, True, previous)
    for name, ref, out in zip(("entries", "dkv", "dscore", "dape"), expected, got, strict=True):
        assert_close(name, ref, out)


@pytest.mark.parametrize("overlap", [True, False], ids=["csa", "hca"])
def test_reference_is_the_compressor_pooling(overlap):
    """The pooled entries the Compressor module builds (before its norm, RoPE and quantisation)."""
    torch.manual_seed(0)
    ratio, d, dim = (4 if overlap else 8), 16, 32
    module = Compressor(dim, d, ratio, overlap, rope_dim=8, norm_eps=1e-6)
    with torch.no_grad():
        module.ape.normal_()
    x = torch.randn(2, 27, dim)
    kv, score = module.wkv(x), module.wgate(x)
    module._finish = lambda entries, *rest: entries  # keep the pooled entries
    entries, _ = module(x, 0, module.new_state(2), freqs=None, quant="none")
    pooled = compress(kv, score, module.ape, ratio, overlap, backend="torch")
    assert_close("pooled", entries, pooled)


def test_short_chunks_emit_nothing():
    kv, score, ape = inputs(1, 3, 8, 4)
    for backend in ("torch", "triton"):
        assert compress(kv, score, ape, 4, True, backend=backend).shape == (1, 0, 4)


@pytest.mark.parametrize("bad, message", [
    (dict(ratio=0), "ratio must be"),
    (dict(kv=torch.randn(1, 8)), "kv must be"),
    (dict(kv=torch.randn(1, 8, 7), score=torch.randn(1, 8, 7), ape=torch.randn(4, 7)), "odd width"),
    (dict(score=torch.randn(1, 8, 6)), "score must be"),
    (dict(ape=torch.randn(2, 8)), "ape must be"),
    (dict(previous=(torch.randn(1, 3, 8), torch.randn(1, 4, 8))), "previous kv must be"),
    (dict(overlap=False, previous=(torch.randn(1, 4, 8), torch.randn(1, 4, 8))), "only with overlap"),
    (dict(backend="cuda-magic"), "backend must be"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(kv=torch.randn(1, 8, 8), score=torch.randn(1, 8, 8), ape=torch.randn(4, 8), ratio=4,
                overlap=True)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        compress(**args)

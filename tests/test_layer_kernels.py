"""The layer's kernel path (`backend="triton"`, what "auto" takes on CUDA): one KV buffer and explicit
row lists through `ops.indexer_topk` and `ops.sparse_attention`, run here by Triton's interpreter on
CPU tensors, against the layer's torch path: prefill, chunked streaming, decode; and the training
path on `ops.joint_attention`'s and `ops.compress`'s kernels, forward and backward."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import torch
import triton  # noqa: E402,F401  (a dev dependency: `make test` installs it; these tests must run)
from conftest import assert_close, layer_of_kind

from hybrid_attention import AttentionConfig, HybridAttention

TINY = AttentionConfig.preset("tiny")
KERNEL_KINDS = ("csa", "hca", "window")


def pair(kind: str, seed: int = 0):
    """The same layer twice: torch path and kernel path."""
    ref = layer_of_kind(TINY, kind, seed)
    kernel = HybridAttention(TINY, ref.layer_id, backend="triton")
    kernel.load_state_dict(ref.state_dict())
    return ref.eval(), kernel.eval()


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_prefill_equals_the_torch_path(kind, monkeypatch):
    from hybrid_attention.ops.sparse_attention import triton as kernels

    calls = []
    real = kernels.sparse_attention_triton
    monkeypatch.setattr(kernels, "sparse_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, kernel = pair(kind)
    x = torch.randn(2, 37, TINY.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(kind, ref(x), kernel(x))
    assert calls, "the kernel path did not run the Triton sparse attention"


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_chunked_streaming_and_decode_equal_the_torch_prefill(kind):
    ref, kernel = pair(kind, seed=2)
    x = torch.randn(2, 41, TINY.dim, generator=torch.Generator().manual_seed(3))
    state, outputs, pos = kernel.new_state(2), [], 0
    with torch.no_grad():
        for n in (13, 1, 1, 9, 16, 1):
            outputs.append(kernel(x[:, pos:pos + n], state=state))
            pos += n
        assert_close(kind, ref(x), torch.cat(outputs, dim=1))
    assert state.pos == 41


TRAIN_CASES = [("csa", 29, 0, False), ("csa", 23, 13, False), ("csa", 29, 0, True), ("hca", 37, 9, False),
               ("window", 29, 5, False)]


@pytest.mark.parametrize("kind, s, prefix_len, dense", TRAIN_CASES,
                         ids=[f"{k}-T{s}-after{p}" + ("-dense" if d else "") for k, s, p, d in TRAIN_CASES])
def test_training_step_equals_the_torch_path(kind, s, prefix_len, dense, monkeypatch):
    """The training path with backend="triton" (what CUDA takes): joint attention through the
    sparse-attention kernels and the compressors through the compress kernel, forward and backward.
    Output, indexer loss, and the gradients of x and of every parameter against the torch path;
    batch 2, lengths off the ratios, a chunk that continues a state, dense CSA."""
    from hybrid_attention.ops.compress import triton as compress_kernels
    from hybrid_attention.ops.joint_attention import triton as joint_kernels

    calls = {"joint": 0, "compress": 0}

    def counted(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(joint_kernels, "joint_attention_triton",
                        counted("joint", joint_kernels.joint_attention_triton))
    monkeypatch.setattr(compress_kernels, "compress_triton",
                        counted("compress", compress_kernels.compress_triton))
    ref, kernel = pair(kind, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, s, TINY.dim, generator=gen)
    prefix = torch.randn(2, prefix_len, TINY.dim, generator=gen)
    grad_out = torch.randn(2, s, TINY.dim, generator=gen)
    results = []
    for layer in (ref, kernel):
        layer.train().zero_grad(set_to_none=True)
        state = layer.new_state(2)
        if prefix_len:
            with torch.no_grad():
                layer(prefix, state=state)
        xi = x.clone().requires_grad_()
        y, aux = layer(xi, state=state, return_aux=True, dense_csa=dense)
        ((y * grad_out).sum() + aux["indexer_loss"]).backward()
        named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), aux["indexer_loss"].detach(), xi.grad, named))
    (y0, loss0, dx0, grads0), (y1, loss1, dx1, grads1) = results
    assert calls["joint"] >= 1 and (kind == "window" or calls["compress"] >= 1), calls
    assert_close(f"{kind} y", y0, y1)
    assert_close(f"{kind} indexer loss", loss0, loss1)
    assert_close(f"{kind} dx", dx0, dx1)
    assert grads0.keys() == grads1.keys() and grads0
    if kind == "csa":
        assert float(loss0) > 0 and any(n.startswith("indexer.") for n in grads0)
    for name in grads0:
        assert_close(f"{kind} d{name}", grads0[name], grads1[name])


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        HybridAttention(TINY, 0, backend="cuda")

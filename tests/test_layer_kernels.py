"""The layer's kernel path (`backend="triton"`, what "auto" takes on CUDA): one KV buffer and explicit
row lists through `ops.indexer_topk` and `ops.sparse_attention`, run here by Triton's interpreter on
CPU tensors, against the layer's torch path: prefill, chunked streaming, decode, and gradients."""

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


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_gradients_equal_the_torch_path(kind):
    ref, kernel = pair(kind, seed=4)
    x = torch.randn(1, 29, TINY.dim, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn(1, 29, TINY.dim, generator=torch.Generator().manual_seed(6))
    grads = []
    for layer in (ref, kernel):
        xi = x.clone().requires_grad_()
        (layer(xi) * grad_out).sum().backward()
        named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        grads.append((xi.grad, named))
        layer.zero_grad()
    assert_close(f"{kind} dx", grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name in grads[0][1]:
        assert_close(f"{kind} d{name}", grads[0][1][name], grads[1][1][name])


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        HybridAttention(TINY, 0, backend="cuda")

import pytest
import torch

from hybrid_attention.config import yarn_correction_range
from hybrid_attention.modules import normalize_and_rotate
from hybrid_attention.rope import apply_rope, rope_frequencies, rotate


def test_yarn_frequencies_match_the_spec_check_values():
    assert yarn_correction_range(64, 160000.0, 65536, 32.0, 1.0) == (15.0, 25.0)
    freqs = rope_frequencies(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    expected = {1: 0.687656, 15: 0.00363554, 16: 0.00226562, 25: 5.37231e-6, 31: 5.68053e-7}
    for k, value in expected.items():
        assert abs(freqs[k].item() - value) <= 1e-5 * value, k
    plain = rope_frequencies(64, 10000.0)
    assert abs(plain[1].item() - 0.749894) < 1e-6 and abs(plain[31].item() - 1.33352e-4) < 1e-9


def test_rope_rotates_interleaved_pairs_of_the_last_dims():
    freqs = torch.tensor([0.5, 0.25])
    x = torch.zeros(1, 2, 6)
    x[0, :, 2:] = torch.tensor([1.0, 0.0, 0.0, 2.0])
    x[0, :, :2] = 7.0
    out = apply_rope(x, torch.tensor([0, 3]), freqs)
    assert torch.equal(out[0, 0], x[0, 0])  # position 0: no rotation
    angle0, angle1 = torch.tensor(3 * 0.5), torch.tensor(3 * 0.25)
    # pair (a, b) = (1, 0) -> (cos, sin); pair (0, 2) -> (-2 sin, 2 cos)
    expected = torch.tensor([7.0, 7.0, angle0.cos(), angle0.sin(), -2 * angle1.sin(), 2 * angle1.cos()])
    torch.testing.assert_close(out[0, 1], expected)


def test_inverse_undoes_rope_and_relative_positions_survive():
    freqs = rope_frequencies(16, 160000.0, 16.0, 64, 32.0, 1.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 3, 32), torch.randn(1, 1, 32)
    back = apply_rope(apply_rope(q, torch.tensor([1234]), freqs), torch.tensor([1234]), freqs, inverse=True)
    torch.testing.assert_close(back, q, atol=1e-5, rtol=1e-5)
    # q at t and k at p: the score depends only on t - p
    s1 = apply_rope(q, torch.tensor([10]), freqs)[0, 0, 0] @ apply_rope(k, torch.tensor([4]), freqs)[0, 0]
    s2 = apply_rope(q, torch.tensor([106]), freqs)[0, 0, 0] @ apply_rope(k, torch.tensor([100]), freqs)[0, 0]
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_the_rotation_backward_equals_autograd_through_the_plain_ops(dtype, inverse, batched_positions):
    """apply_rope's backward (the opposite rotation, one op) gives bit for bit the gradient that
    autograd computes through `rotate`'s copies and complex views."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 16, generator=gen).to(dtype).requires_grad_()
    positions = torch.randint(0, 10**6, (2, 6) if batched_positions else (6,), generator=gen)
    freqs = rope_frequencies(8, 10000.0)
    grad = torch.randn(2, 6, 3, 16, generator=gen).to(dtype)
    (fast,) = torch.autograd.grad(apply_rope(x, positions, freqs, inverse), x, grad)
    (plain,) = torch.autograd.grad(rotate(x, positions, freqs, inverse), x, grad)
    assert fast.dtype == dtype and torch.equal(fast, plain)


def plain_normalize_and_rotate(q, positions, freqs):
    """The composition written out in plain ops, for autograd to differentiate."""
    y = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6)
    rd = 2 * freqs.numel()
    angles = (positions.float()[:, None, None] * freqs).to(q.dtype)  # [s, 1, rd / 2], as rope.py
    a, b = y[..., -rd::2], y[..., -rd + 1::2]
    pairs = torch.stack((a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()), -1)
    return torch.cat((y[..., :-rd], pairs.flatten(-2)), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_and_rotate_equals_autograd_through_plain_ops(dtype):
    gen = torch.Generator().manual_seed(4)
    q = (torch.randn(2, 5, 3, 32, generator=gen) * 3).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 3, 32, generator=gen).to(dtype)
    positions, freqs = torch.arange(7, 12), rope_frequencies(16, 10000.0)
    out = normalize_and_rotate(q, 1e-6, positions, freqs)
    (fast,) = torch.autograd.grad(out, q, grad)
    plain_out = plain_normalize_and_rotate(q, positions, freqs)
    (plain,) = torch.autograd.grad(plain_out, q, grad)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, plain_out, rtol=0, atol=atol)
    assert torch.allclose(fast, plain, rtol=0, atol=atol)
    with torch.no_grad():  # inference: the same op, in place on the normalised copy
        assert torch.equal(normalize_and_rotate(q, 1e-6, positions, freqs), out)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: normalize_and_rotate(t, 1e-6, positions, freqs), (q,))


def test_normalize_and_rotate_in_bf16_rounds_as_apply_rope_does():
    """bf16: the normalisation in bf16, the rotation in fp32 rounded back, as `apply_rope` does."""
    q = torch.randn(1, 6, 2, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    positions, freqs = torch.arange(6), rope_frequencies(8, 10000.0)
    normalized = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6)
    expected = apply_rope(normalized, positions, freqs)
    assert torch.equal(normalize_and_rotate(q, 1e-6, positions, freqs), expected)

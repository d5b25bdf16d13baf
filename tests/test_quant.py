import pytest
import torch

from hybrid_attention.quant import (
    FP4_GRID,
    ceil_pow2_exponent,
    dequantize_fp4,
    dequantize_fp8,
    dequantize_fp8_weight,
    fake_quant_fp4,
    fake_quant_fp8,
    fake_quant_nope_fp8,
    hadamard_matrix,
    hadamard_rotate,
    quantize_fp4,
    quantize_fp8,
)


def test_ceil_log2_from_the_bits_is_exact_around_powers_of_two():
    just_above = torch.nextafter(torch.tensor(0.125), torch.tensor(1.0))
    values = torch.stack([torch.tensor(0.125), just_above, torch.tensor(1.0), torch.tensor(3.0)])
    assert ceil_pow2_exponent(values).tolist() == [-3, -2, 0, 2]


def test_fp8_scale_is_the_power_of_two_above_amax_over_448():
    x = torch.zeros(1, 64)
    x[0, 5] = 448.0 * 4  # amax / 448 = 4 exactly -> scale 4
    x[0, 6] = 1.3
    values, exps = quantize_fp8(x, 64)
    assert exps.tolist() == [[2]]
    assert values.float()[0, 5].item() == 448.0
    # 1.3 / 4 = 0.325 rounds to the nearest e4m3 value (0.3125 or 0.34375) -> 0.3125 * 4 = 1.25
    assert fake_quant_fp8(x)[0, 6].item() == 1.25


def test_fp8_tiny_blocks_use_the_floor_amax():
    x = torch.full((1, 64), 1e-9)
    _, exps = quantize_fp8(x, 64)
    assert exps.item() == ceil_pow2_exponent(torch.tensor(1e-4 / 448)).item()


def test_fp4_rounds_to_nearest_with_ties_to_even():
    x = torch.zeros(1, 32)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 6.0, 0.3, -5.1]
    x[0, : len(ties)] = torch.tensor(ties)
    out = fake_quant_fp4(x)[0, : len(ties)].tolist()
    assert out == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 6.0, 0.5, -6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_storage_dequantises_to_the_fake_quant_values(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 128) * torch.logspace(-3, 3, 128)).to(dtype)
    v8, e8 = quantize_fp8(x, 64)
    assert v8.dtype == torch.float8_e4m3fn and e8.shape == (3, 5, 2)
    assert torch.equal(dequantize_fp8(v8, e8, dtype), fake_quant_fp8(x, 64))
    p4, e4 = quantize_fp4(x, 32)
    assert p4.dtype == torch.uint8 and p4.shape == (3, 5, 64) and e4.shape == (3, 5, 4)
    assert torch.equal(dequantize_fp4(p4, e4, dtype), fake_quant_fp4(x, 32))


def test_fake_quant_lands_on_the_grid_and_is_idempotent():
    torch.manual_seed(1)
    x = torch.randn(4, 64) * 10
    q4 = fake_quant_fp4(x[:, :32])
    scale = q4.abs().amax(-1, keepdim=True)  # each row's max lands on 6 * scale or below
    assert torch.equal(fake_quant_fp4(q4), q4)
    assert torch.equal(fake_quant_fp8(fake_quant_fp8(x)), fake_quant_fp8(x))
    _, exps = quantize_fp4(x[:, :32])
    units = q4 / torch.pow(2.0, exps.float())
    grid = torch.tensor(FP4_GRID)
    assert torch.isin(units.abs(), grid).all() and (scale > 0).all()
    rel = ((fake_quant_fp8(x) - x).norm() / x.norm()).item()
    assert 0.005 < rel < 0.05  # e4m3 keeps about 3 mantissa bits


def test_nope_fp8_leaves_the_rope_dims_alone():
    x = torch.randn(2, 128)
    out = fake_quant_nope_fp8(x, rope_dim=64)
    assert torch.equal(out[:, 64:], x[:, 64:]) and torch.equal(out[:, :64], fake_quant_fp8(x[:, :64]))


def test_hadamard_is_sylvester_and_orthogonal():
    h = hadamard_matrix(8)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    popcount = torch.tensor([bin(v).count("1") for v in range(8)])[(i & j)]
    assert torch.equal(h, (-1.0) ** popcount)
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close((hadamard_rotate(x) * hadamard_rotate(y)).sum(-1), (x * y).sum(-1),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(48)


def test_fp8_weight_dequantisation_uses_128_blocks():
    w = torch.ones(130, 256).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    out = dequantize_fp8_weight(w, scale)
    assert out[0, 0] == 1 and out[0, 200] == 2 and out[129, 0] == 4 and out[129, 255] == 8
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        dequantize_fp8_weight(w, torch.ones(1, 2))

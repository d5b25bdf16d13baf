"""Loading official-format tensors: FP8 e4m3 + ue8m0 128x128 scales, bf16, fp32 (SPEC 11)."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrid_attention import AttentionConfig, HybridAttention

CFG = AttentionConfig.preset("tiny", dim=256, q_lora_rank=128)
FP8_NAMES = {"wq_a.weight", "wq_b.weight", "wkv.weight", "wo_a.weight", "wo_b.weight", "indexer.wq_b.weight"}
FP32_NAMES = {"attn_sink", "compressor.ape", "indexer.compressor.ape"}


def to_fp8_with_scale(w: torch.Tensor):
    """Quantise a weight as the checkpoints store it: e4m3 values, a ue8m0 scale per 128x128 block."""
    out_f, in_f = w.shape
    blocks = (math.ceil(out_f / 128), math.ceil(in_f / 128))
    scale = torch.empty(blocks)
    q = torch.empty_like(w)
    for i in range(blocks[0]):
        for j in range(blocks[1]):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = 2.0 ** math.ceil(math.log2(tile.abs().max().item() / 448))
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = tile / s
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def official_checkpoint(layer_id: int, path) -> dict:
    torch.manual_seed(layer_id)
    source = HybridAttention(CFG, layer_id)
    tensors = {}
    for name, p in source.named_parameters():
        w = torch.randn_like(p) * 0.05
        if name in FP8_NAMES:
            tensors[f"layers.{layer_id}.attn.{name}"], tensors[f"layers.{layer_id}.attn.{name}.scale"] = \
                to_fp8_with_scale(w)
        elif name in FP32_NAMES:
            tensors[f"layers.{layer_id}.attn.{name}"] = w.float()
        else:
            tensors[f"layers.{layer_id}.attn.{name}"] = w.to(torch.bfloat16)
    save_file(tensors, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("layer_id", [0, 1], ids=["csa", "hca"])
def test_loads_and_dequantises(tmp_path, layer_id):
    state = official_checkpoint(layer_id, tmp_path / "attn.safetensors")
    prefix = f"layers.{layer_id}.attn."
    assert state[prefix + "wq_b.weight"].dtype == torch.float8_e4m3fn
    layer = HybridAttention(CFG, layer_id)
    layer.load_official_state_dict(state, prefix=prefix)
    w, s = state[prefix + "wq_b.weight"], state[prefix + "wq_b.weight.scale"]
    # one element per block, dequantised by hand
    for row, col in [(0, 0), (130, 5), (319, 127)]:
        expected = w[row, col].float() * s[row // 128, col // 128].float()
        assert layer.wq_b.weight[row, col] == expected
    assert torch.equal(layer.kv_norm.weight, state[prefix + "kv_norm.weight"].float())
    assert torch.equal(layer.attn_sink, state[prefix + "attn_sink"])
    y = layer(torch.randn(1, 20, CFG.dim))
    assert torch.isfinite(y).all()


def test_bad_checkpoints_name_the_tensor_and_change_nothing(tmp_path):
    state = official_checkpoint(0, tmp_path / "attn.safetensors")
    prefix = "layers.0.attn."
    layer = HybridAttention(CFG, 0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    cases = [
        ({k: v for k, v in state.items() if k != prefix + "indexer.weights_proj.weight"},
         "missing.*indexer.weights_proj.weight"),
        ({**state, prefix + "wq_c.weight": torch.zeros(2)}, "unexpected.*wq_c.weight"),
        ({**state, prefix + "kv_norm.weight": torch.ones(7, dtype=torch.bfloat16)},
         r"kv_norm.weight has shape \(7,\)"),
        ({**state, prefix + "wkv.weight.scale": torch.ones(1, 1)}, r"wkv.weight.scale.*expected \(1, 2\)"),
        ({k: v for k, v in state.items() if k != prefix + "wkv.weight.scale"}, "wkv.weight has no"),
    ]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message):
            layer.load_official_state_dict(broken, prefix=prefix)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a refused load"

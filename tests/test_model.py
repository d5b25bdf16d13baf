import pytest
import torch
from conftest import assert_close

from hybrid_attention import HybridTransformer, ModelConfig

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridTransformer(CFG)


def test_layers_follow_the_schedule(model):
    assert [block.attn.kind for block in model.layers] == ["csa", "hca", "window", "full"]
    names = dict(model.named_parameters())
    assert "layers.0.attn.indexer.compressor.ape" in names and "layers.3.ffn.w2.weight" in names


def test_streaming_logits_equal_the_full_forward(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 37))
    with torch.no_grad():
        whole = model(tokens)
        states = model.new_states(2)
        parts = [model(tokens[:, a:b], states) for a, b in [(0, 9), (9, 10), (10, 30), (30, 37)]]
    assert_close("logits", whole, torch.cat(parts, 1))


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[1, 2, 256]]), "token id 256 is outside the vocabulary"),
    (torch.tensor([[-1, 2]]), "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.ones(1, 3), "integer ids"),
    (torch.ones(3, dtype=torch.long), r"\[batch, seq\]"),
])
def test_bad_tokens_are_refused_without_touching_the_states(model, tokens, message):
    states = model.new_states(1)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), states)
    with pytest.raises(ValueError, match=message):
        model(tokens, states)
    assert all(s.pos == 3 for s in states)


def test_indexer_loss_is_summed_over_layers(model):
    logits, aux = model(torch.randint(0, CFG.vocab_size, (1, 24)), return_aux=True)
    assert logits.shape == (1, 24, CFG.vocab_size) and aux["indexer_loss"].item() > 0

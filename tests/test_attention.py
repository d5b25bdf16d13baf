"""HybridAttention: streaming = prefill, causality, the official index construction, errors."""

import pytest
import torch
from conftest import KINDS, assert_close, layer_of_kind
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_attention import AttentionConfig, HybridAttention, attention
from hybrid_attention.attention import window_indices_decode, window_indices_prefill
from hybrid_attention.ops.joint_attention.cpu import joint_attention_inference
from hybrid_attention.quant import fake_quant_fp4, fake_quant_fp8

TINY = AttentionConfig.preset("tiny")
LAYERS = {kind: layer_of_kind(TINY, kind) for kind in KINDS}


def stream(layer, x, cuts):
    state, outputs, pos = layer.new_state(x.size(0)), [], 0
    for n in cuts:
        outputs.append(layer(x[:, pos:pos + n], state=state))
        pos += n
    return torch.cat(outputs, 1), state


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), batch=st.integers(1, 2),
       cuts=st.lists(st.integers(1, 19), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_prefill_equals_chunked_streaming(kind, batch, cuts, seed):
    layer = LAYERS[kind]
    torch.manual_seed(seed)
    x = torch.randn(batch, sum(cuts), TINY.dim)
    with torch.no_grad():
        whole = layer(x)
        streamed, state = stream(layer, x, cuts)
    assert_close(f"{kind} cuts={cuts}", whole, streamed)
    assert state.pos == sum(cuts)


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decode_after_a_prefill(kind):
    layer = LAYERS[kind]
    torch.manual_seed(1)
    x = torch.randn(2, 45, TINY.dim)
    with torch.no_grad():
        whole = layer(x)
        streamed, _ = stream(layer, x, [13] + [1] * 32)
    assert_close(kind, whole, streamed)


@pytest.mark.parametrize("kind", KINDS)
def test_query_blocks_do_not_change_the_result(kind):
    layer = LAYERS[kind]
    blocked = HybridAttention(TINY.replace(query_block_size=3), layer.layer_id)
    blocked.load_state_dict(layer.state_dict())
    x = torch.randn(1, 40, TINY.dim)
    with torch.no_grad():
        assert_close(kind, layer(x), blocked(x))


def test_csa_sub_blocks_do_not_change_the_result(monkeypatch):
    """A CSA block's attention runs in sub-blocks of gathered rows (GATHER_BUDGET); the output,
    the indexer loss and the gradients must not depend on where they are cut."""
    from hybrid_attention import attention

    layer = LAYERS["csa"]
    x = torch.randn(2, 40, TINY.dim)

    def run():
        x_ = x.clone().requires_grad_()
        y, aux = layer(x_, return_aux=True)
        (y.square().mean() + aux["indexer_loss"]).backward()
        return y.detach(), aux["indexer_loss"].detach(), x_.grad

    whole = run()
    layer.zero_grad()
    # 3 queries per sub-block: [block 16] -> 3 + 3 + 3 + 3 + 3 + 1
    monkeypatch.setattr(attention, "GATHER_BUDGET", 3 * TINY.index_topk * TINY.head_dim)
    assert layer._block_size(TINY.window_size + TINY.index_topk, TINY.index_topk) == 3
    split = run()
    for name, a, b in zip(("y", "indexer loss", "x.grad"), whole, split, strict=True):
        assert_close(name, a, b)
    with torch.no_grad():
        assert_close("no_grad", whole[0], layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    layer = LAYERS[kind]
    torch.manual_seed(2)
    x = torch.randn(1, 40, TINY.dim)
    for t in (0, 7, 23, 39):
        changed = x.clone()
        changed[0, t] += 3.0
        with torch.no_grad():
            y, y2 = layer(x), layer(changed)
        assert torch.equal(y[0, :t], y2[0, :t]), f"{kind}: output before {t} changed"
        assert not torch.allclose(y[0, t], y2[0, t]), f"{kind}: output at {t} ignored its own token"


@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
@pytest.mark.parametrize("seq_len", [5, 8, 37, 64])
def test_matches_the_official_index_list_construction_in_prefill(kind, seq_len):
    layer = LAYERS[kind]
    x = torch.randn(2, seq_len, TINY.dim)
    with torch.no_grad():
        assert_close(f"{kind}-T{seq_len}", layer.reference_forward(x), layer(x))


@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
def test_matches_the_official_ring_buffer_decode(kind):
    layer = LAYERS[kind]
    x = torch.randn(2, 30, TINY.dim)
    with torch.no_grad():
        state = layer.new_state(2)
        layer(x[:, :11], state=state)
        for t in range(11, 30):
            entries = state.compressed.length if state.compressed is not None else 0
            expected = layer.reference_forward(x[:, t:t + 1], state)
            assert state.pos == t  # the reference path leaves the state alone
            assert (state.compressed.length if state.compressed is not None else 0) == entries
            assert_close(f"{kind}@{t}", expected, layer(x[:, t:t + 1], state=state))


def test_window_indices_match_the_spec():
    idx = window_indices_prefill(300, 16)
    assert idx.shape == (300, 16)
    assert idx[0].tolist() == [0] + [-1] * 15
    assert idx[20].tolist() == list(range(5, 21))
    assert window_indices_decode(300, 16).tolist() == [13, 14, 15] + list(range(0, 13))
    assert window_indices_decode(3, 16).tolist() == [0, 1, 2, 3] + [-1] * 12
    assert window_indices_decode(15, 16).tolist() == list(range(16))


WORKED = AttentionConfig(dim=256, n_heads=4, head_dim=128, rope_head_dim=64, q_lora_rank=128,
                         o_groups=2, o_lora_rank=64, window_size=16, compress_ratios=[4, 128, 0],
                         index_n_heads=4, index_head_dim=64, index_topk=8, max_seq_len=512,
                         quant="official")


def test_the_worked_example_shapes():
    """SPEC 10: the toy CSA / HCA / window layers, b=2, s=300, then decode at 300..303."""
    x = torch.randn(2, 304, WORKED.dim)
    csa, hca, window = (HybridAttention(WORKED, i) for i in range(3))
    with torch.no_grad():
        states = [layer.new_state(2) for layer in (csa, hca, window)]
        for layer, state in zip((csa, hca, window), states, strict=True):
            y = layer(x[:, :300], state=state)
            assert y.shape == (2, 300, 256)
        s_csa, s_hca, s_win = states
        assert s_csa.compressed.view().shape == (2, 75, 128)
        assert s_csa.index_keys.view().shape == (2, 75, 64)
        assert s_csa.compressor.kv.shape == (2, 8, 256) and s_csa.index_compressor.kv.shape == (2, 8, 128)
        assert s_hca.compressed.view().shape == (2, 2, 128) and s_hca.compressor.kv.shape == (2, 128, 128)
        assert torch.isfinite(s_hca.compressor.score[:, :44]).all()  # tokens 256..299 wait
        assert torch.isinf(s_hca.compressor.score[:, 44:]).all()
        assert s_win.window.shape == (2, 16, 128)
        _, aux = window(x[:, 300:301], state=s_win, return_aux=True)
        assert aux["attended_keys"] == 16
        for t in range(300, 304):
            _, aux = csa(x[:, t:t + 1], state=s_csa, return_aux=True)
            assert s_csa.compressed.length == (t + 1) // 4
            assert aux["attended_keys"] == 16 + 8
        # Entry 75 (rope position 300) arrived at p = 303; its non-rope dims sit on the FP8 grid.
        entry = s_csa.compressed.view()[:, 75]
        assert torch.equal(fake_quant_fp8(entry[:, :64]), entry[:, :64])
        keys = s_csa.index_keys.view()
        assert torch.equal(fake_quant_fp4(keys), keys)
        ring = s_csa.window
        assert torch.equal(fake_quant_fp8(ring[..., :64]), ring[..., :64])
        _, aux = hca(x[:, 300:301], state=s_hca, return_aux=True)
        assert aux["attended_keys"] == 16 + 2


def test_official_quant_in_bf16_matches_the_reference_construction():
    cfg = AttentionConfig.preset("tiny", quant="official")
    for kind in ("csa", "hca", "window"):
        layer = layer_of_kind(cfg, kind, dtype=torch.bfloat16)
        x = torch.randn(2, 50, cfg.dim, dtype=torch.bfloat16)
        with torch.no_grad():
            y, ref = layer(x), layer.reference_forward(x)
        assert y.dtype == torch.bfloat16
        assert_close(kind, ref, y)


def test_torch_port_mode_skips_the_in_place_rounding():
    cfg = AttentionConfig.preset("tiny", quant="official-torch-port")
    layer = layer_of_kind(cfg, "csa")
    official = HybridAttention(cfg.replace(quant="official"), layer.layer_id)
    official.load_state_dict(layer.state_dict())
    plain = HybridAttention(cfg.replace(quant="none"), layer.layer_id)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(1, 40, cfg.dim)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
        assert not torch.allclose(official(x), plain(x), atol=1e-3)


# Errors -------------------------------------------------------------------------------------


def snapshot(state):
    tensors = [state.window, state.compressor.kv, state.compressor.score, state.compressed.view()]
    return state.pos, [t.clone() for t in tensors]


@pytest.mark.parametrize("make_x, message", [
    (lambda: torch.randn(3, TINY.dim), "batch, seq, dim"),
    (lambda: torch.randn(2, 3, TINY.dim + 1), "width"),
    (lambda: torch.randn(2, 3, TINY.dim, dtype=torch.float64), "dtype"),
    (lambda: torch.randn(2, 0, TINY.dim), "at least one token"),
    (lambda: torch.randn(1, 3, TINY.dim), "batch 1"),
    (lambda: torch.randn(2, TINY.max_seq_len, TINY.dim), "max_seq_len"),
    (lambda: torch.full((2, 3, TINY.dim), float("nan")), "NaN"),
], ids=["rank", "width", "dtype", "empty", "batch", "too-long", "nan"])
def test_bad_input_is_refused_and_changes_nothing(make_x, message):
    layer = LAYERS["csa"]
    state = layer.new_state(2)
    with torch.no_grad():
        layer(torch.randn(2, 10, TINY.dim), state=state)
    before = snapshot(state)
    with pytest.raises(ValueError, match=message):
        layer(make_x(), state=state, check_finite=True)
    after = snapshot(state)
    assert before[0] == after[0] and all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))


def test_state_from_another_layer_is_refused():
    state = LAYERS["hca"].new_state(1)
    with pytest.raises(ValueError, match="belongs to layer"):
        LAYERS["csa"](torch.randn(1, 2, TINY.dim), state=state)
    other_cfg = HybridAttention(TINY.replace(window_size=4), LAYERS["csa"].layer_id)
    with pytest.raises(ValueError, match="belongs to layer"):
        other_cfg(torch.randn(1, 2, TINY.dim), state=LAYERS["csa"].new_state(1))
    with pytest.raises(TypeError, match="new_state"):
        LAYERS["csa"](torch.randn(1, 2, TINY.dim), state={"pos": 0})


def test_nan_passes_silently_only_without_check_finite():
    x = torch.randn(1, 4, TINY.dim)
    x[0, 2, 0] = float("nan")
    with torch.no_grad():
        y = LAYERS["window"](x)
    assert torch.isnan(y[0, 2:]).any() and not torch.isnan(y[0, :2]).any()


def test_state_reports_its_bytes():
    layer = LAYERS["csa"]
    state = layer.new_state(2)
    with torch.no_grad():
        layer(torch.randn(2, 21, TINY.dim), state=state)
    parts = state.nbytes_by_type()
    d, di, win = TINY.head_dim, TINY.index_head_dim, TINY.window_size
    assert parts["window"] == 2 * win * d * 4
    assert parts["compressed_kv"] == 2 * 5 * d * 4 and parts["indexer_keys"] == 2 * 5 * di * 4
    assert parts["compressor_tail"] == 2 * (2 * 8 * 2 * d + 2 * 8 * 2 * di) * 4
    assert state.nbytes() == sum(parts.values())


def test_full_kind_fused_inference_path_equals_the_blocked_path():
    layer = LAYERS["full"]
    x = torch.randn(2, 45, TINY.dim)
    with torch.no_grad():
        fused = layer(x)
        state = layer.new_state(2)
        streamed = torch.cat([layer(x[:, :20], state=state), layer(x[:, 20:21], state=state),
                              layer(x[:, 21:], state=state)], 1)
    state = layer.new_state(2)  # autograd on; a chunk from position 1 takes the blocked path
    blocked = torch.cat((layer(x[:, :1], state=state), layer(x[:, 1:], state=state)), 1)
    trained = layer(x)  # autograd on, from position 0: the fused training op
    assert blocked.requires_grad and trained.requires_grad
    assert_close("fused vs blocked", blocked.detach(), fused)
    assert_close("fused streamed", blocked.detach(), streamed)
    assert_close("training op", blocked.detach(), trained.detach())


def test_full_kind_training_op_gradients_equal_the_blocked_path(monkeypatch):
    layer = LAYERS["full"]
    x = torch.randn(2, 45, TINY.dim)
    grads = []
    for use_training_op in (True, False):
        if not use_training_op:  # the blocked construction through autograd
            monkeypatch.setattr(attention, "full_attention_train", lambda q, rows, sink, scale:
                                joint_attention_inference(q, torch.arange(q.size(1)), sink, scale, rows=rows))
        layer.zero_grad()
        leaf = x.clone().requires_grad_(True)
        layer(leaf).square().sum().backward()
        grads.append({"x": leaf.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}})
    for name in grads[0]:
        assert_close(name, grads[1][name], grads[0][name])

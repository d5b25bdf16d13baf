"""Every entry point refuses bad input with an error naming the argument, and changes nothing: the
layer, the model (all states as they were), the ops, the streaming state and the helpers."""

import numpy as np
import pytest
import torch
from conftest import KINDS, layer_of_kind
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention import AttentionConfig, HybridAttention, HybridTransformer, ModelConfig
from hybrid_attention.compressor import Compressor
from hybrid_attention.indexer import topk_lowest_index_ties
from hybrid_attention.modules import Linear, RMSNorm
from hybrid_attention.ops import FP8KV, FP4Keys, compress, dispatch, indexer_topk, sparse_attention
from hybrid_attention.quant import (
    dequantize_fp4,
    dequantize_fp8,
    dequantize_fp8_weight,
    fake_quant_nope_fp8,
    hadamard_matrix,
    hadamard_rotate,
    quantize_fp8,
)
from hybrid_attention.rope import apply_rope, rope_frequencies
from hybrid_attention.state import GrowingRows

TINY = AttentionConfig.preset("tiny")
LAYERS = {kind: layer_of_kind(TINY, kind) for kind in KINDS}
MODEL_CFG = ModelConfig.preset("tiny")


def snapshot(state) -> dict:
    """Every tensor a LayerState holds (and its position), copied."""
    parts = {"pos": state.pos}
    if state.window is not None:
        parts["window"] = state.window.clone()
    for name in ("kv", "compressed", "index_keys"):
        rows = getattr(state, name)
        if rows is not None:
            parts[name] = (rows.length, rows.view().clone())
    for name in ("compressor", "index_compressor"):
        tail = getattr(state, name)
        if tail is not None:
            parts[name] = (tail.kv.clone(), tail.score.clone())
    return parts


def assert_unchanged(before: dict, state) -> None:
    after = snapshot(state)
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        flat_old = old if isinstance(old, tuple) else (old,)
        flat_new = new if isinstance(new, tuple) else (new,)
        for a, b in zip(flat_old, flat_new, strict=True):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"state.{name} changed by a refused call"


def used_state(layer, batch=2, tokens=10):
    state = layer.new_state(batch)
    with torch.no_grad():
        layer(torch.randn(batch, tokens, TINY.dim), state=state)
    return state


# The layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, error, message", [
    (dict(cfg={"dim": 64}), TypeError, "cfg must be an AttentionConfig, got dict"),
    (dict(layer_id="0"), TypeError, "layer_id must be an int, got '0'"),
    (dict(layer_id=True), TypeError, "layer_id must be an int, got True"),
    (dict(layer_id=1.0), TypeError, "layer_id must be an int"),
    (dict(layer_id=-1), ValueError, "layer_id must be an int >= 0, got -1"),
    (dict(layer_id=4), ValueError, r"layer_id 4 is outside \[0, 4\)"),
    (dict(dtype="float32"), TypeError, "dtype must be a torch.dtype, got 'float32'"),
    (dict(dtype=torch.int32), ValueError, "dtype must be one of .*got torch.int32"),
    (dict(dtype=torch.float8_e4m3fn), ValueError, "dtype must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of .*got 'cuda'"),
    (dict(backend=None), ValueError, "backend must be one of"),
], ids=lambda v: str(v)[:30])
def test_layer_constructor_names_the_bad_argument(args, error, message):
    with pytest.raises(error, match=message):
        HybridAttention(**{"cfg": TINY, "layer_id": 0, **args})


def test_triton_backend_without_triton_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match='needs the triton package.*backend="torch"'):
        HybridAttention(TINY, 0, backend="triton")


@pytest.mark.parametrize("args, error, message", [
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=True), TypeError, "batch_size must be an int, got True"),
    (dict(batch_size=2.0), TypeError, "batch_size must be an int, got 2.0"),
    (dict(batch_size=1, device="gpu0"), ValueError, "device 'gpu0' is not a device"),
    (dict(batch_size=1, device=3.5), TypeError, "device must be a torch.device"),
], ids=lambda v: str(v)[:30])
def test_new_state_names_the_bad_argument(args, error, message):
    with pytest.raises(error, match=message):
        LAYERS["csa"].new_state(**args)


BAD_CALLS = [
    (dict(x=np.zeros((2, 3, TINY.dim), dtype=np.float32)), TypeError,
     "x must be a torch.Tensor, got ndarray"),
    (dict(x=[[0.0] * TINY.dim]), TypeError, "x must be a torch.Tensor, got list"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must be \[batch, seq, dim\], got 0 dims"),
    (dict(x=torch.randn(2, 3, TINY.dim, 1)), ValueError, "got 4 dims"),
    (dict(x=torch.ones(2, 3, TINY.dim, dtype=torch.long)), ValueError, "x has dtype torch.int64"),
    (dict(x=torch.randn(2, 3, TINY.dim).bfloat16()), ValueError, "x has dtype torch.bfloat16"),
    (dict(x=torch.randn(2, 3, 7)), ValueError, "x has width 7"),
    (dict(x=torch.randn(2, 0, TINY.dim)), ValueError, "at least one token"),
    (dict(x=torch.randn(2, 3, TINY.dim, device="meta")), ValueError, "x is on meta"),
    (dict(x=torch.full((2, 3, TINY.dim), float("inf")), check_finite=True), ValueError, "NaN or Inf"),
    (dict(return_aux="yes"), TypeError, "return_aux must be True or False, got 'yes'"),
    (dict(check_finite=1), TypeError, "check_finite must be True or False, got 1"),
    (dict(dense_csa=None), TypeError, "dense_csa must be True or False, got None"),
    (dict(state={"pos": 10}), TypeError, "state must come from new_state"),
    (dict(x=torch.randn(1, 3, TINY.dim)), ValueError, "state holds 2 sequences, x has batch 1"),
    (dict(x=torch.randn(2, TINY.max_seq_len, TINY.dim)), ValueError, "past max_seq_len"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call, error, message", BAD_CALLS, ids=lambda v: str(v)[:40])
def test_bad_calls_name_the_argument_and_leave_the_state(kind, call, error, message):
    layer = LAYERS[kind]
    state = used_state(layer)
    before = snapshot(state)
    args = {"x": torch.randn(2, 3, TINY.dim), "state": state, **call}
    with pytest.raises(error, match=message):
        layer(**args)
    assert_unchanged(before, state)


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_states_are_refused_and_left_alone(kind):
    layer = LAYERS[kind]
    other = next(k for k in KINDS if k != kind)
    foreign = used_state(LAYERS[other])
    bf16_layer = HybridAttention(TINY, layer.layer_id, dtype=torch.bfloat16)
    bf16_state = bf16_layer.new_state(2)
    cases = ((foreign, "state belongs to layer"), (bf16_state, "state holds torch.bfloat16 rows"))
    for state, message in cases:
        before = snapshot(state)
        with pytest.raises(ValueError, match=message):
            layer(torch.randn(2, 3, TINY.dim), state=state)
        assert_unchanged(before, state)


def test_triton_on_a_cpu_tensor_says_what_to_use(monkeypatch):
    assert dispatch.triton_available(), "make test installs triton (the dev extra) on Linux"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = HybridAttention(TINY, LAYERS["csa"].layer_id, backend="triton")
    layer.load_state_dict(LAYERS["csa"].state_dict())
    state = used_state(LAYERS["csa"])
    before = snapshot(state)
    with pytest.raises(ValueError, match='backend="triton" runs on CUDA tensors, got a tensor on cpu; use '
                                         'backend="torch" or backend="auto"'):
        layer(torch.randn(2, 3, TINY.dim), state=state)
    assert_unchanged(before, state)
    # The training path (return_aux) runs on the kernels too; the interpreter runs them on CPU tensors.
    with pytest.raises(ValueError, match='backend="triton" runs on CUDA tensors'):
        layer(torch.randn(2, 3, TINY.dim), state=state, return_aux=True)
    assert_unchanged(before, state)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("triton", torch.zeros(1)) == "triton"


def test_resolve_backend():
    assert dispatch.resolve_backend("torch", torch.zeros(1)) == "torch"
    assert dispatch.resolve_backend("auto", torch.zeros(1)) == "torch"
    with pytest.raises(ValueError, match="backend must be one of .*got 'cpu'"):
        dispatch.resolve_backend("cpu", torch.zeros(1))


def official_tensors(layer) -> dict:
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("make, error, message", [
    (lambda t: list(t.items()), TypeError, "state_dict must map names to tensors, got list"),
    (lambda t: {**t, 3: torch.zeros(1)}, TypeError, "keys must be tensor names .*got 3"),
    (lambda t: {**t, "wkv.weight": t["wkv.weight"].tolist()}, TypeError,
     r"state_dict\['wkv.weight'\] must be a torch.Tensor, got list"),
    (lambda t: {**t, "wkv.weight.scale": "1"}, TypeError, r"state_dict\['wkv.weight.scale'\]"),
    (lambda t: {**t, "attn_sink": torch.full_like(t["attn_sink"], float("nan"))}, ValueError,
     "tensor attn_sink holds NaN or Inf"),
    (lambda t: {**t, "kv_norm.weight": t["kv_norm.weight"].to(torch.float8_e4m3fn),
                "kv_norm.weight.scale": torch.ones(1, 1)}, ValueError,
     "FP8 tensor kv_norm.weight must be a 2-D"),
    (lambda t: {**t, "wkv.weight": t["wkv.weight"].long()}, ValueError, "wkv.weight has dtype torch.int64"),
], ids=lambda v: str(v)[:30])
def test_bad_official_state_dicts_change_no_parameter(make, error, message):
    layer = layer_of_kind(TINY, "csa", seed=1)
    before = official_tensors(layer)
    source = official_tensors(layer_of_kind(TINY, "csa", seed=2))
    with pytest.raises(error, match=message):
        layer.load_official_state_dict(make(source))
    for name, value in official_tensors(layer).items():
        assert torch.equal(value, before[name]), f"{name} changed by a refused load"
    with pytest.raises(TypeError, match="prefix must be a str, got 0"):
        layer.load_official_state_dict(source, prefix=0)


# The model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HybridTransformer(MODEL_CFG)


def used_states(model, batch=1):
    states = model.new_states(batch)
    with torch.no_grad():
        model(torch.randint(0, MODEL_CFG.vocab_size, (batch, 9)), states)
    return states


@pytest.mark.parametrize("tokens, error, message", [
    (np.array([[1, 2, 3]]), TypeError, "tokens must be a .*torch.Tensor of integer ids, got ndarray"),
    ([[1, 2, 3]], TypeError, "got list"),
    (5, TypeError, "got int"),
    (torch.tensor(5), ValueError, r"\[batch, seq\] integer tensor, got shape \(\)"),
    (torch.tensor([1, 2]), ValueError, r"got shape \(2,\)"),
    (torch.ones(1, 2, 3, dtype=torch.long), ValueError, r"got shape \(1, 2, 3\)"),
    (torch.tensor([[True, False]]), ValueError, "integer ids .*got dtype torch.bool"),
    (torch.tensor([[1.0, 2.0]]), ValueError, "got dtype torch.float32"),
    (torch.tensor([[1, 2]], dtype=torch.uint8), ValueError, "got dtype torch.uint8"),
    (torch.ones(1, 2, dtype=torch.long, device="meta"), ValueError, "tokens are on meta"),
    (torch.tensor([[1, 999]]), ValueError, "token id 999 is outside the vocabulary"),
], ids=lambda v: str(v)[:30])
def test_bad_tokens_name_the_argument_and_leave_every_state(model, tokens, error, message):
    states = used_states(model)
    before = [snapshot(s) for s in states]
    with pytest.raises(error, match=message):
        model(tokens, states)
    for b, s in zip(before, states, strict=True):
        assert_unchanged(b, s)


@pytest.mark.parametrize("layer_index", range(MODEL_CFG.n_layers))
@pytest.mark.parametrize("spoil, error, message", [
    (lambda states, i, model: states.__setitem__(i, {"pos": 9}), TypeError, r"states\[{i}\] must come from"),
    (lambda states, i, model: states.__setitem__(i, states[(i + 1) % len(states)]), ValueError,
     r"states\[{i}\] belongs to layer"),
    (lambda states, i, model: states.__setitem__(i, model.layers[i].attn.new_state(2)), ValueError,
     r"states\[{i}\] holds 2 sequences"),
    (lambda states, i, model: setattr(states[i], "pos", states[i].pos - 1), ValueError,
     "states are at different positions"),
], ids=["not-a-state", "other-layer", "batch", "position"])
def test_one_bad_state_leaves_every_state_as_it_was(model, layer_index, spoil, error, message):
    states = used_states(model)
    spoil(states, layer_index, model)
    before = [snapshot(s) if hasattr(s, "layer_id") else None for s in states]
    with pytest.raises(error, match=message.format(i=layer_index)):
        model(torch.tensor([[1, 2, 3]]), states)
    for b, s in zip(before, states, strict=True):
        if b is not None:
            assert_unchanged(b, s)


def test_bad_states_lists_and_flags(model):
    states = used_states(model)
    before = [snapshot(s) for s in states]
    tokens = torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match="states must be the list that new_states"):
        model(tokens, states[0])
    with pytest.raises(ValueError, match="states has 3 entries, the model has 4 layers"):
        model(tokens, states[:3])
    with pytest.raises(TypeError, match="return_aux must be True or False"):
        model(tokens, states, return_aux="no")
    with pytest.raises(ValueError, match="past max_seq_len"):
        model(torch.ones(1, MODEL_CFG.attention.max_seq_len, dtype=torch.long), states)
    for b, s in zip(before, states, strict=True):
        assert_unchanged(b, s)
    with pytest.raises(ValueError, match="past max_seq_len"):
        model(torch.ones(1, MODEL_CFG.attention.max_seq_len + 1, dtype=torch.long))
    with torch.no_grad():  # tuples are fine, and the states still work after the refused calls
        assert model(tokens, tuple(states)).shape == (1, 2, MODEL_CFG.vocab_size)


def test_model_constructor_and_new_states(model):
    with pytest.raises(TypeError, match="cfg must be a ModelConfig, got AttentionConfig"):
        HybridTransformer(TINY)
    with pytest.raises(ValueError, match="dtype must be one of"):
        HybridTransformer(MODEL_CFG, dtype=torch.int64)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        model.new_states(0)
    with pytest.raises(TypeError, match="batch_size must be an int, got 1.5"):
        model.new_states(1.5)


# The ops ------------------------------------------------------------------------------------


def sparse_args(**changes):
    args = dict(q=torch.randn(1, 2, 2, 8), kv=torch.randn(1, 4, 8), sink=torch.zeros(2),
                indices=torch.zeros(1, 2, 3, dtype=torch.int32), scale=0.5)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=np.zeros((1, 2, 2, 8))), TypeError, "q must be a torch.Tensor, got ndarray"),
    (dict(q=torch.ones(1, 2, 2, 8, dtype=torch.long)), ValueError, "q must be a float"),
    (dict(sink=[0.0, 0.0]), TypeError, "sink must be a torch.Tensor, got list"),
    (dict(sink=torch.zeros(2, dtype=torch.long)), ValueError, "sink must be a float"),
    (dict(indices=[[[0]]]), TypeError, "indices must be a torch.Tensor"),
    (dict(indices=torch.zeros(1, 2, 3)), ValueError, "indices must be int32 or int64"),
    (dict(kv=torch.ones(1, 4, 8, dtype=torch.long)), ValueError, "kv must be a float tensor"),
    (dict(kv=FP8KV("values", torch.zeros(1))), TypeError, "FP8KV.values must be a torch.Tensor"),
    (dict(kv=torch.randn(1, 4, 8, device="meta")), ValueError, "kv is on meta but q is on cpu"),
    (dict(sink=torch.zeros(2, device="meta")), ValueError, "sink is on meta"),
    (dict(block_table=[[0]]), TypeError, "block_table must be a torch.Tensor"),
    (dict(scale=float("nan")), ValueError, "scale must be a positive finite number, got nan"),
    (dict(scale=float("inf")), ValueError, "scale must be a positive finite number, got inf"),
    (dict(scale=0.0), ValueError, "scale must be a positive finite number, got 0.0"),
    (dict(scale=-1), ValueError, "scale must be a positive finite number, got -1"),
    (dict(scale="0.5"), TypeError, "scale must be a number, got '0.5'"),
    (dict(scale=True), TypeError, "scale must be a number, got True"),
    (dict(query_block=0), ValueError, "query_block must be an int >= 1, got 0"),
    (dict(query_block=2.0), TypeError, "query_block must be an int"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
], ids=lambda v: str(v)[:30])
def test_sparse_attention_names_the_bad_argument(changes, error, message):
    with pytest.raises(error, match=message):
        sparse_attention(**sparse_args(**changes))


def topk_args(**changes):
    args = dict(q=torch.randn(1, 2, 2, 32), weights=torch.randn(1, 2, 2), keys=torch.randn(1, 5, 32), k=2)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, message", [
    (dict(q=np.zeros((1, 2, 2, 32))), TypeError, "q must be a torch.Tensor, got ndarray"),
    (dict(weights=[[1.0, 1.0]]), TypeError, "weights must be a torch.Tensor, got list"),
    (dict(keys="keys"), TypeError, "keys must be a torch.Tensor or an FP4Keys, got str"),
    (dict(keys=FP4Keys(None, None)), TypeError, "FP4Keys.packed must be a torch.Tensor"),
    (dict(keys=torch.randn(1, 5, 32, device="meta")), ValueError, "keys is on meta but q is on cpu"),
    (dict(k=True), TypeError, "k must be an int, got True"),
    (dict(k=1.5), TypeError, "k must be an int, got 1.5"),
    (dict(k=-2), ValueError, "k must be an int >= 0, got -2"),
    (dict(query_block=0), ValueError, "query_block must be an int >= 1"),
    (dict(visible=[1, 2]), TypeError, "visible must be a torch.Tensor, got list"),
    (dict(visible=torch.ones(2, dtype=torch.int32, device="meta")), ValueError, "visible is on meta"),
], ids=lambda v: str(v)[:30])
def test_indexer_topk_names_the_bad_argument(changes, error, message):
    with pytest.raises(error, match=message):
        indexer_topk(**topk_args(**changes))


def compress_args(**changes):
    args = dict(kv=torch.randn(1, 8, 8), score=torch.randn(1, 8, 8), ape=torch.randn(4, 8), ratio=4,
                overlap=True)
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, message", [
    (dict(kv=np.zeros((1, 8, 8))), TypeError, "kv must be a torch.Tensor, got ndarray"),
    (dict(score=None), TypeError, "score must be a torch.Tensor, got NoneType"),
    (dict(score=torch.ones(1, 8, 8, dtype=torch.long)), ValueError, "score must be a float"),
    (dict(ape=torch.randn(4, 8, device="meta")), ValueError, "ape is on meta but kv is on cpu"),
    (dict(ratio=True), TypeError, "ratio must be an int, got True"),
    (dict(ratio=4.0), TypeError, "ratio must be an int, got 4.0"),
    (dict(overlap=1), TypeError, "overlap must be True or False, got 1"),
    (dict(previous=torch.zeros(1, 4, 8)), TypeError, r"previous must be a \(kv, score\) pair"),
    (dict(previous=(torch.zeros(1, 4, 8), "score")), TypeError, "previous score must be a torch.Tensor"),
], ids=lambda v: str(v)[:30])
def test_compress_names_the_bad_argument(changes, error, message):
    with pytest.raises(error, match=message):
        compress(**compress_args(**changes))


@pytest.mark.parametrize("call", [
    lambda: sparse_attention(**sparse_args(), backend="triton"),
    lambda: indexer_topk(**topk_args(), backend="triton"),
    lambda: compress(**compress_args(), backend="triton"),
], ids=["sparse_attention", "indexer_topk", "compress"])
def test_ops_refuse_triton_on_cpu_tensors_with_a_reason(monkeypatch, call):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match='backend="triton" (runs on CUDA tensors|needs the triton package)'):
        call()
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="needs the triton package, which is not installed"):
        call()


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=2), st.just(torch.tensor(0.5)))


def ape_for(ratio) -> torch.Tensor:
    """An ape that fits `ratio` when it is a small positive int (so only the ratio can be wrong)."""
    fits = isinstance(ratio, int) and not isinstance(ratio, bool) and 0 < ratio < 9
    return torch.randn(ratio if fits else 4, 8)


@settings(max_examples=80, deadline=None)
@given(scale=SCALARS, query_block=SCALARS, k=SCALARS)
def test_any_scalar_arguments_run_or_raise_a_named_error(scale, query_block, k):
    """Random scalars for the ops' number arguments: a result, or a TypeError / ValueError naming
    the argument; never an error from deep inside."""
    for name, call in (
        ("scale", lambda: sparse_attention(**sparse_args(scale=scale))),
        ("query_block", lambda: sparse_attention(**sparse_args(query_block=query_block))),
        ("k", lambda: indexer_topk(**topk_args(k=k))),
        ("query_block", lambda: indexer_topk(**topk_args(query_block=query_block))),
        ("ratio", lambda: compress(**compress_args(ratio=k, ape=ape_for(k)))),
    ):
        try:
            out = call()
        except (TypeError, ValueError) as err:
            assert str(err).startswith(name) or f"{name} must" in str(err), err
        else:
            assert isinstance(out, torch.Tensor)


# State, compressor, norms, quant and rope helpers -------------------------------------------


def test_state_rows_and_device():
    rows = GrowingRows(2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"rows must be \[2, n, 8\], got \(2, 3, 7\)"):
        rows.append(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="got list"):
        rows.append([[0.0]])
    assert rows.length == 0
    assert LAYERS["csa"].new_state(1).device == torch.device("cpu")
    assert LAYERS["full"].new_state(1).device == torch.device("cpu")


def test_compressor_arguments():
    with pytest.raises(TypeError, match="ratio must be an int, got 4.0"):
        Compressor(16, 8, 4.0, True, 4, 1e-6)
    with pytest.raises(ValueError, match="rope_dim must not exceed head_dim=8, got 16"):
        Compressor(16, 8, 4, True, 16, 1e-6)
    with pytest.raises(ValueError, match="norm_eps must be a positive finite number, got nan"):
        Compressor(16, 8, 4, True, 4, float("nan"))
    with pytest.raises(TypeError, match="overlap must be True or False"):
        Compressor(16, 8, 4, "yes", 4, 1e-6)
    comp = Compressor(16, 8, 4, True, 4, 1e-6)
    state = comp.new_state(1)
    freqs = rope_frequencies(4, 10000.0)
    x = torch.randn(1, 6, 16)
    with pytest.raises(ValueError, match=r"x must be a float \[batch, seq, 16\]"):
        comp(torch.randn(1, 6, 15), 0, state, freqs, "none")
    with pytest.raises(ValueError, match="start_pos must be an int >= 0, got -1"):
        comp(x, -1, state, freqs, "none")
    with pytest.raises(ValueError, match=r"state must hold kv and score of shape \(1, 8, 16\)"):
        comp(x, 0, comp.new_state(2), freqs, "none")
    with pytest.raises(TypeError, match="state must be a CompressorState"):
        comp(x, 0, None, freqs, "none")
    with pytest.raises(ValueError, match="quant must be one of"):
        comp(x, 0, state, freqs, "fp8")


def test_norm_and_linear_arguments():
    with pytest.raises(ValueError, match="eps must be a positive finite number, got 0"):
        RMSNorm(8, 0)
    with pytest.raises(TypeError, match="dim must be an int, got 8.0"):
        RMSNorm(8.0, 1e-6)
    with pytest.raises(ValueError, match="in_features must be an int >= 1, got 0"):
        Linear(0, 4)


def test_quant_helpers():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="block must be an int >= 1, got 0"):
        quantize_fp8(x, block=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        quantize_fp8([1.0], block=1)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        quantize_fp8(torch.ones(2, 64, dtype=torch.long))
    values, exponents = quantize_fp8(x, 64)
    with pytest.raises(ValueError, match="exponents must be"):
        dequantize_fp8(values, exponents[:, :0], torch.float32)
    with pytest.raises(ValueError, match="exponents must be"):
        dequantize_fp8(values, exponents[:1], torch.float32)
    with pytest.raises(ValueError, match="exponents must be"):
        dequantize_fp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.int8),
                       torch.float32)
    with pytest.raises(ValueError, match="rope_dim=80 exceeds the width"):
        fake_quant_nope_fp8(x, 80)
    with pytest.raises(ValueError, match="power of two, got 3"):
        hadamard_matrix(3)
    with pytest.raises(TypeError, match="n must be an int, got 4.0"):
        hadamard_matrix(4.0)
    with pytest.raises(ValueError, match="power of two, got 6"):
        hadamard_rotate(torch.randn(2, 6))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dequantize_fp8_weight(torch.zeros(4), torch.ones(1))


def test_rope_helpers():
    with pytest.raises(ValueError, match="rope_dim must be even"):
        rope_frequencies(5, 10000.0)
    with pytest.raises(ValueError, match="theta must be a positive finite number, got -1.0"):
        rope_frequencies(8, -1.0)
    with pytest.raises(ValueError, match="theta must be > 1 with YaRN"):
        rope_frequencies(8, 1.0, 16.0, 64)
    with pytest.raises(ValueError, match="beta_slow must be a positive finite number"):
        rope_frequencies(8, 1e4, 16.0, 64, 32.0, 0.0)
    freqs = rope_frequencies(8, 10000.0)
    with pytest.raises(ValueError, match=r"positions must be \[3\]"):
        apply_rope(torch.randn(1, 3, 8), torch.arange(4), freqs)
    with pytest.raises(ValueError, match="rope_dim <= 6"):
        apply_rope(torch.randn(1, 3, 6), torch.arange(3), freqs)
    with pytest.raises(TypeError, match="positions must be a torch.Tensor"):
        apply_rope(torch.randn(1, 3, 8), [0, 1, 2], freqs)


def test_top_k_with_ties_checks_k():
    with pytest.raises(ValueError, match="k=6 must not exceed"):
        topk_lowest_index_ties(torch.zeros(1, 5), 6)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        topk_lowest_index_ties(torch.zeros(1, 5), 0)

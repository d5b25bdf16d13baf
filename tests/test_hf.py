"""The project's layer against transformers' DeepseekV4 on random tiny models: per-layer parity
(prefill and decode, top-k ties counted and left out), apply_to (logits, greedy generate, left
padding), checkpoints saved by transformers in and out."""

import copy

import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask

from hybrid_attention import AttentionConfig, HybridAttention, HybridTransformer, ModelConfig, hf
from hybrid_attention.indexer import index_scores

TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
KIND_LAYER = {"window": 0, "csa": 1, "hca": 2}
FP32_PARITY = 1e-6  # transformers' own fp32 rounding (SPEC: its layer and ours agree to ~5e-7)
BF16_FACTOR = 1.5  # our bf16 error may be 1.5x transformers' bf16 error, both against float64
LOGITS_PARITY = 1e-5
SEQ = 37  # past the window (8) and several CSA (4) and HCA (8) blocks, not a multiple of either
TIE_MARGIN = {torch.float32: 1e-6, torch.bfloat16: 3e-2}  # k-th and (k+1)-th scores this close: a tie


def tiny_config(**changes) -> DeepseekV4Config:
    values = dict(vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, head_dim=32, q_lora_rank=16, qk_rope_head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=16,
                  index_topk=3, sliding_window=8, layer_types=TYPES, hc_mult=2,
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                   "beta_fast": 32, "beta_slow": 1},
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    return DeepseekV4Config(**{**values, **changes})


def random_model(config: DeepseekV4Config, seed: int = 0) -> DeepseekV4ForCausalLM:
    """transformers initialises sinks and position biases to zero and norms to one: randomise them."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_bias" in name or "sinks" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
            elif "embed" in name:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def native() -> DeepseekV4ForCausalLM:
    return random_model(tiny_config())


def project_config(config, **changes) -> AttentionConfig:
    return AttentionConfig.from_hf_config(config, quant="none", hadamard=False, **changes)


def tie_tokens(layer: HybridAttention, x: torch.Tensor, start: int = 0, state=None) -> torch.Tensor:
    """[s] bool: queries whose k-th and (k+1)-th index scores tie (within TIE_MARGIN of the
    dtype), where transformers' torch.topk may pick either entry and the project the lower one."""
    s = x.size(1)
    if layer.kind != "csa":
        return torch.zeros(s, dtype=torch.bool)
    with torch.no_grad():
        positions = torch.arange(start, start + s)
        freqs = layer._freqs
        qr = layer.q_norm(layer.wq_a(x))
        compressor_state = state.index_compressor if state is not None else \
            layer.indexer.compressor.new_state(x.size(0))
        new_keys, _ = layer.indexer.compressor(x, start, compressor_state, freqs, "none")
        keys = new_keys if state is None else torch.cat((state.index_keys.view(), new_keys), 1)
        qi = layer.indexer.queries(qr, positions, freqs)
        scores = index_scores(qi.float(), layer.indexer.head_weights(x).float(), keys.float())  # [b, s, t]
    visible = (positions + 1) // layer.ratio
    k = layer.cfg.index_topk
    ties = torch.zeros(s, dtype=torch.bool)
    for t in range(s):
        if visible[t] > k:
            top = scores[:, t, : visible[t]].sort(dim=-1, descending=True).values  # [b, n]
            gap = top[:, k - 1] - top[:, k]
            ties[t] = bool((gap <= TIE_MARGIN[x.dtype] * top[:, 0].abs().clamp_min(1e-30)).any())
    return ties


def run_native(attn, x: torch.Tensor, config, chunks: list[int]) -> torch.Tensor:
    """transformers' layer over x in `chunks` (prefill, then decode steps) through its own cache."""
    model = attn.__dict__.get("_rotary_owner")
    cache = DynamicCache(config=config)
    outs, start = [], 0
    for n in chunks:
        part = x[:, start:start + n]
        pos = torch.arange(start, start + n)[None]
        embeddings = {k: model(part, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=config, inputs_embeds=part, attention_mask=None,
                                                 cache=cache, position_ids=pos, layer_idx=attn.layer_idx)
        with torch.no_grad():
            outs.append(attn(part, position_embeddings=embeddings, position_ids=pos, attention_mask=mask,
                             cache=cache)[0])
        start += n
    return torch.cat(outs, 1)


def native_layer(native_model, kind: str, dtype: torch.dtype):
    attn = copy.deepcopy(native_model.model.layers[KIND_LAYER[kind]].self_attn).to(dtype)
    rotary = copy.deepcopy(native_model.model.rotary_emb)
    attn.__dict__["_rotary_owner"] = rotary
    return attn


def our_layer(native_model, kind: str, dtype=None) -> HybridAttention:
    layer = HybridAttention(project_config(native_model.config), KIND_LAYER[kind], dtype=dtype)
    hf.load_state_dict(layer, native_model.state_dict())
    return layer


def run_ours(layer: HybridAttention, x: torch.Tensor, chunks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our layer over x in `chunks` with a streaming state: (output, tie tokens)."""
    state = layer.new_state(x.size(0))
    outs, ties, start = [], [], 0
    for n in chunks:
        part = x[:, start:start + n]
        ties.append(tie_tokens(layer, part, start, state))
        with torch.no_grad():
            outs.append(layer(part, state=state))
        start += n
    return torch.cat(outs, 1), torch.cat(ties)


CHUNKS = [SEQ - 5, 1, 1, 1, 1, 1]  # a prefill, then five decode steps


def rel_err(ref: torch.Tensor, out: torch.Tensor, keep: torch.Tensor) -> float:
    ref, out = ref[:, keep].double(), out[:, keep].double()
    return float((ref - out).norm() / ref.norm())


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_layer_matches_transformers_fp32_prefill_and_decode(native, kind):
    torch.manual_seed(1)
    x = torch.randn(2, SEQ, 32)
    ref = run_native(native_layer(native, kind, torch.float32), x, native.config, CHUNKS)
    out, ties = run_ours(our_layer(native, kind), x, CHUNKS)
    keep = ~ties
    assert int(keep.sum()) >= SEQ - 4, f"{int(ties.sum())} of {SEQ} queries tie"
    err = rel_err(ref, out, keep)
    print(f"{kind}: fp32 relative error {err:.2e}, {int(ties.sum())} tied queries left out")
    assert err <= FP32_PARITY, f"{kind}: relative error {err:.2e} > {FP32_PARITY}"
    decode = torch.zeros(SEQ, dtype=torch.bool)
    decode[SEQ - 5:] = True
    assert rel_err(ref, out, keep & decode) <= FP32_PARITY  # the decode steps alone


def test_tied_index_scores_are_counted_and_left_out():
    """One indexer head: a query whose ReLU kills it for several entries scores them all 0, so the
    k-th and (k+1)-th scores tie and torch.topk may pick either. Those queries are counted and left
    out; every other query still agrees to fp32 rounding."""
    tied = random_model(tiny_config(index_n_heads=1), seed=5)
    torch.manual_seed(6)
    x = torch.randn(2, SEQ, 32)
    ref = run_native(native_layer(tied, "csa", torch.float32), x, tied.config, CHUNKS)
    out, ties = run_ours(our_layer(tied, "csa"), x, CHUNKS)
    print(f"csa, one indexer head: {int(ties.sum())} of {SEQ} queries tie")
    assert 0 < int(ties.sum()) < SEQ - 10
    assert rel_err(ref, out, ~ties) <= FP32_PARITY


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_layer_bf16_is_within_transformers_own_bf16_error(native, kind):
    torch.manual_seed(2)
    x64 = torch.randn(1, SEQ, 32, dtype=torch.float64)
    x16 = x64.to(torch.bfloat16)
    oracle = run_native(native_layer(native, kind, torch.float64), x16.double(), native.config, CHUNKS)
    theirs = run_native(native_layer(native, kind, torch.bfloat16), x16, native.config, CHUNKS)
    ours, ties = run_ours(our_layer(native, kind, dtype=torch.bfloat16), x16, CHUNKS)
    keep = ~ties
    assert int(keep.sum()) >= SEQ - 8
    their_err, our_err = rel_err(oracle, theirs.double(), keep), rel_err(oracle, ours.double(), keep)
    print(f"{kind}: bf16 vs float64 transformers {their_err:.2e}, project {our_err:.2e}")
    assert our_err <= BF16_FACTOR * their_err + 1e-4, (kind, our_err, their_err)


def test_names_match_what_transformers_has_and_writes(native, tmp_path):
    theirs = {n.split(".self_attn.", 1)[1] for n, _ in native.named_parameters() if ".self_attn." in n}
    assert theirs == set(hf.HF_ATTENTION_NAMES)
    cfg = project_config(native.config)
    ours = {n for i in range(3) for n, _ in HybridAttention(cfg, i).named_parameters()}
    assert ours == set(hf.HF_ATTENTION_NAMES.values())
    native.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "model.layers.0.attn.norm.weight" in saved  # the spelling the loader must accept
    model = HybridTransformer(ModelConfig.from_hf_config(native.config, quant="none", hadamard=False))
    attention = {n for n, _ in model.named_parameters() if ".attn." in n}
    assert attention <= {hf.official_name(n) for n in saved}
    for name in attention:
        assert hf.official_name(hf.transformers_name(name)) == name


def test_apply_to_matches_native_logits_and_greedy_generate(native):
    patched = copy.deepcopy(native)
    before = patched.model.layers[1].self_attn.compressor.indexer.q_b_proj.weight
    hf.apply_to(patched)
    layer = patched.model.layers[1].self_attn
    assert isinstance(layer, HybridAttention) and layer.indexer.wq_b.weight is before  # moved, not copied
    assert not any(p.is_meta for p in patched.parameters())
    torch.manual_seed(3)
    ids = torch.randint(1, 96, (2, SEQ))
    with torch.no_grad():
        assert_close("logits", native(ids).logits, patched(ids).logits, LOGITS_PARITY)
    want = native.generate(ids, max_new_tokens=12, do_sample=False)
    got = patched.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(want, got), (want[:, SEQ:], got[:, SEQ:])
    # the cache behind transformers' API holds the project's states
    out = patched(ids[:, :20], use_cache=True)
    states = out.cache.layers
    assert [type(s).__name__ for s in states] == ["StateCacheLayer"] * 3 and states[1].get_seq_length() == 20
    step = patched(ids[:, 20:21], cache=out.cache, use_cache=True)
    with torch.no_grad():
        assert_close("decode logits", native(ids[:, :21]).logits[:, -1], step.logits[:, -1], LOGITS_PARITY)


def test_apply_to_left_padding_sees_only_real_tokens(native):
    patched = hf.apply_to(copy.deepcopy(native))
    torch.manual_seed(4)
    long, short = torch.randint(1, 96, (1, SEQ)), torch.randint(1, 96, (1, SEQ - 9))
    ids = torch.cat((long, torch.cat((torch.zeros(1, 9, dtype=torch.long), short), 1)))
    mask = (torch.arange(SEQ) >= torch.tensor([[0], [9]])).long()
    with torch.no_grad():
        batch = patched(ids, attention_mask=mask).logits
        alone = patched(short).logits
    assert_close("padded row", alone[0], batch[1, 9:], LOGITS_PARITY)
    got = patched.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = patched.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(got[1, SEQ:], want[0, SEQ - 9:])
    with pytest.raises(ValueError, match="only left padding"):
        patched(ids, attention_mask=mask.flip(-1))


def test_apply_to_refuses_what_it_cannot_do(native):
    with pytest.raises(TypeError, match="DeepseekV4 model"):
        hf.apply_to(torch.nn.Linear(2, 2))
    patched = hf.apply_to(copy.deepcopy(native))
    with pytest.raises(ValueError, match="no DeepseekV4Attention"):
        hf.apply_to(patched)
    with pytest.raises(ValueError, match="beam search"):
        patched.generate(torch.randint(1, 96, (1, 12)), max_new_tokens=3, num_beams=2, do_sample=False)


def test_a_checkpoint_saved_by_transformers_loads_into_the_project_and_back(native, tmp_path):
    native.save_pretrained(tmp_path / "one")
    native.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for folder in ("one", "sharded"):
        cfg = ModelConfig.from_hf_config(tmp_path / folder, quant="none", hadamard=False)
        model = HybridTransformer(cfg)
        hf.load_state_dict(model, tmp_path / folder, attention_only=True)
        theirs = native.state_dict()
        for name, p in model.named_parameters():
            if ".attn." in name:
                assert torch.equal(p, theirs[hf.transformers_name(name)]), name
    # and back: transformers reads what the project writes, under the names it writes itself
    hf.save_for_transformers(model, tmp_path / "back", config=native.config)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys() if ".attn." in k}  # the rest was not loaded
    assert set(ours) == {k for k in theirs if ".attn." in k}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    save_file({**theirs, **ours}, str(tmp_path / "back" / "model.safetensors"))  # + the MoE and mHC
    again = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(1, 96, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, native(ids).logits)
    layer = our_layer(native, "csa")
    exported = hf.to_transformers_state_dict(layer)
    assert set(exported) == {k for k in native.state_dict() if k.startswith("model.layers.1.self_attn.")}


def fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One e4m3 tensor and its 128x128 block scale (one block here) as transformers stores it."""
    scale = weight.abs().max() / 448.0
    return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(1, 1).float()


@pytest.mark.parametrize("suffix", [".weight_scale_inv", ".scale"])
def test_fp8_weights_with_either_scale_name_are_dequantised(native, suffix):
    tensors = {k: v.clone() for k, v in native.state_dict().items()
               if k.startswith("model.layers.1.self_attn.")}
    name = "model.layers.1.self_attn.q_b_proj.weight"
    tensors[name], scale = fp8(tensors[name])
    tensors[name.removesuffix(".weight") + suffix] = scale
    layer = HybridAttention(project_config(native.config), 1)
    hf.load_state_dict(layer, tensors)
    assert torch.equal(layer.wq_b.weight, tensors[name].float() * scale)


def test_errors_name_the_tensor_and_nothing_is_written(native):
    good = {k: v.clone() for k, v in native.state_dict().items()
            if k.startswith("model.layers.1.self_attn.")}
    layer = HybridAttention(project_config(native.config), 1)
    hf.load_state_dict(layer, good)
    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    q = "model.layers.1.self_attn.q_b_proj.weight"
    bad_cases = [
        ({k: v for k, v in good.items() if not k.endswith("sinks")}, "missing tensors.*attn_sink"),
        ({**good, "model.layers.1.self_attn.extra.weight": torch.ones(2)},
         "unexpected .*self_attn.extra.weight"),
        ({**good, q: good[q][:-1]}, f"tensor {q} has shape"),
        ({**good, q: fp8(good[q])[0]}, f"FP8 tensor {q} has no scale"),
        ({**good, "model.layers.1.self_attn.kv_norm.weight": torch.full((32,), float("nan"))},
         "kv_norm.weight holds NaN"),
        ({**good, "model.layers.1.attn.kv_norm.weight": good["model.layers.1.self_attn.kv_norm.weight"]},
         "both name"),
    ]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    changed = {k: v.clone() for k, v in layer.state_dict().items()}
    for tensors, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            hf.load_state_dict(layer, tensors)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, changed[k]), f"{k} was written by a failing load"
    assert not torch.equal(changed["wq_b.weight"], snapshot["wq_b.weight"])
    model = HybridTransformer(ModelConfig.from_hf_config(native.config, quant="none", hadamard=False))
    with pytest.raises(ValueError, match="unexpected tensors .*hc"):  # a DeepSeek MoE without attention_only
        hf.load_state_dict(model, native.state_dict())

"""Engine: greedy = one request at a time, ragged batching, context files, faults."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_attention import AttentionConfig, HybridTransformer, ModelConfig
from hybrid_attention.engine import ContextFileError, Engine

CFG = ModelConfig.preset("tiny")
torch.manual_seed(0)
MODEL = HybridTransformer(CFG).eval()


def greedy_alone(model, prompt, n):
    """The growing sequence through the full forward, one token at a time."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), chunk=st.integers(1, 24),
       max_batch=st.integers(1, 3), new=st.integers(1, 6), seed=st.integers(0, 1000))
def test_greedy_equals_one_request_at_a_time(lengths, chunk, max_batch, new, seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    engine = Engine(MODEL, cache_bytes=8 << 20, max_batch=max_batch, prefill_chunk=chunk)
    results = engine.generate(prompts, max_new_tokens=new)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.finish_reason == "length" and result.error is None
        assert result.tokens == greedy_alone(MODEL, prompt, new)


def test_real_fp8_storage_generates_what_the_fake_quant_model_does():
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", attention=AttentionConfig.preset("tiny", quant="official"))
    model = HybridTransformer(cfg).to(torch.bfloat16).eval()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (23, 9)]
    results = Engine(model, cache_bytes=4 << 20, max_batch=2, prefill_chunk=8).generate(prompts, 6)
    for prompt, result in zip(prompts, results, strict=True):
        seq, states = list(prompt), model.new_states(1)  # plain bf16 states, same chunks
        with torch.no_grad():
            for start in range(0, len(prompt), 8):
                logits = model(torch.tensor([prompt[start:start + 8]]), states)
            for _ in range(6):
                seq.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[seq[-1]]]), states)
        assert result.tokens == seq[len(prompt):]
        assert result.cache_bytes["csa_indexer_keys"] == (len(prompt) + 5) // 4 * 20  # fp4, 20-byte rows


def test_streaming_callback_and_stop_tokens():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    engine = Engine(MODEL, cache_bytes=4 << 20, max_batch=2)
    full = engine.generate(prompts, max_new_tokens=8)
    seen = []
    stop = full[0].tokens[2]
    results = engine.generate(prompts, max_new_tokens=8, stop_tokens=[stop],
                              on_token=lambda i, t: seen.append((i, t)))
    assert results[0].tokens == full[0].tokens[:3] and results[0].finish_reason == "stop"
    assert [t for i, t in seen if i == 0] == results[0].tokens
    assert [t for i, t in seen if i == 1] == results[1].tokens
    assert list(engine.stream(prompts, max_new_tokens=2)) != []
    assert all(r.time_to_first_token <= r.total_time for r in results)


def test_sampling_is_seeded_per_request_and_independent_of_batching():
    prompts = [[7, 8, 9], [10, 11], [12]]
    kwargs = dict(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=5)
    together = Engine(MODEL, cache_bytes=4 << 20, max_batch=3).generate(prompts, **kwargs)
    one_by_one = Engine(MODEL, cache_bytes=4 << 20, max_batch=1).generate(prompts, **kwargs)
    assert [r.tokens for r in together] == [r.tokens for r in one_by_one]
    other_seed = Engine(MODEL, cache_bytes=4 << 20, max_batch=3).generate(prompts, **{**kwargs, "seed": 6})
    assert [r.tokens for r in other_seed] != [r.tokens for r in together]


def test_context_file_continues_like_never_saved(tmp_path):
    engine = Engine(MODEL, cache_bytes=4 << 20, max_batch=2, prefill_chunk=7)
    prefix = torch.randint(0, 256, (45,)).tolist()
    suffixes = [[3, 4, 5], [9]]
    path = tmp_path / "doc.ctx"
    info = engine.save_context(prefix, path)
    assert info["tokens"] == 45 and path.stat().st_size == info["file_bytes"]
    continued = engine.generate(suffixes, max_new_tokens=5, context=path)
    for suffix, result in zip(suffixes, continued, strict=True):
        assert result.tokens == greedy_alone(MODEL, prefix + suffix, 5) and result.context_tokens == 45
    straight = engine.generate([[]], max_new_tokens=4, context=path)[0]
    assert straight.tokens == greedy_alone(MODEL, prefix, 4)


def test_bad_context_files_are_refused(tmp_path):
    engine = Engine(MODEL, cache_bytes=4 << 20, max_batch=2)
    path = tmp_path / "doc.ctx"
    engine.save_context(list(range(30)), path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-100] ^= 0x40
    cases = {
        "corrupted": (bytes(flipped), "checksum"),
        "truncated": (data[:-10], "truncated"),
        "not ours": (b"hello world" * 3, "not a hybrid-attention context"),
        "newer": (data.replace(b'"format_version": 2', b'"format_version": 9'), "format version 9"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.ctx"
        bad.write_bytes(content)
        with pytest.raises(ContextFileError, match=message):
            engine.generate([[1]], max_new_tokens=2, context=bad)
    other = HybridTransformer(ModelConfig.preset("tiny", ffn_hidden=64)).eval()
    with pytest.raises(ContextFileError, match="another model"):
        Engine(other, cache_bytes=4 << 20).generate([[1]], max_new_tokens=2, context=path)
    # a refused file leaves the engine usable and its cache empty
    assert engine.generate([[1, 2]], max_new_tokens=2)[0].finish_reason == "length"
    assert all(pool.reserved == 0 for pool in engine.cache.pools.values())


def test_faulty_requests_fail_alone():
    engine = Engine(MODEL, cache_bytes=4 << 20, max_batch=2, max_seq_len=64)
    good = [5, 6, 7, 8]
    prompts = [good, [], [1, 300], list(range(100)), good[:2]]
    results = engine.generate(prompts, max_new_tokens=4)
    assert results[1].error.startswith("empty prompt")
    assert "token id 300" in results[2].error
    assert "exceeds max_seq_len=64" in results[3].error
    for i in (0, 4):
        assert results[i].error is None and results[i].tokens == greedy_alone(MODEL, prompts[i], 4)


def test_requests_wait_for_pages_and_one_that_never_fits_is_refused():
    # the compressed-entry pool holds two of these requests at a time, not three
    engine = Engine(MODEL, cache_bytes=300_000, max_batch=3, prefill_chunk=64, page_entries=16)
    prompts = [torch.randint(0, 256, (150,)).tolist() for _ in range(3)] + [[1] * 3000]
    results = engine.generate(prompts, max_new_tokens=3)
    assert "more than the whole cache budget" in results[3].error
    for prompt, result in zip(prompts[:3], results[:3], strict=True):
        assert result.tokens == greedy_alone(MODEL, prompt, 3)
    assert engine.last_run["peak_running"] == 2
    assert all(pool.reserved == 0 for pool in engine.cache.pools.values())


def test_requests_on_one_context_share_its_full_pages(tmp_path):
    engine = Engine(MODEL, cache_bytes=8 << 20, max_batch=3, page_entries=16)
    prefix = torch.randint(0, 256, (256,)).tolist()
    path = tmp_path / "doc.ctx"
    engine.save_context(prefix, path)
    pool = engine.cache.pools["full_kv"]
    peak = []
    suffixes = [[1, 2], [3], [4, 5, 6]]
    results = engine.generate(suffixes, max_new_tokens=4, context=path,
                              on_token=lambda i, t: peak.append(pool.n_pages - len(pool.free)))
    # 256 context rows = 16 full pages held once; each request adds one page of its own
    assert max(peak) <= 16 + 3
    for suffix, result in zip(suffixes, results, strict=True):
        assert result.tokens == greedy_alone(MODEL, prefix + suffix, 4)
    assert len(pool.free) == pool.n_pages and all(r == 0 for r in pool.refs)


def test_prompts_with_a_common_prefix_process_it_once_and_share_its_pages():
    engine = Engine(MODEL, cache_bytes=8 << 20, max_batch=3, page_entries=16, share_prefix_min=32)
    common = torch.randint(0, 256, (200,)).tolist()
    prompts = [common + [1, 2], common + [3], common]  # the last one is the prefix itself
    pool = engine.cache.pools["full_kv"]
    peak = []
    results = engine.generate(prompts, max_new_tokens=4,
                              on_token=lambda i, t: peak.append(pool.n_pages - len(pool.free)))
    assert [r.shared_prefix_tokens for r in results] == [200, 200, 200]
    assert max(peak) <= 12 + 3 + 3  # 12 shared full pages + per request its partial and new pages
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == greedy_alone(MODEL, prompt, 4)
    unshared = Engine(MODEL, cache_bytes=8 << 20, max_batch=3, share_prefix_min=10_000)
    assert [r.shared_prefix_tokens for r in unshared.generate(prompts, max_new_tokens=1)] == [0, 0, 0]

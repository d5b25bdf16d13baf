"""Engine edges: arguments, per-request isolation, one call at a time, context files bound to the
weights and checked before anything is allocated."""

import re
import threading

import numpy as np
import pytest
import torch

from hybrid_attention import HybridTransformer, ModelConfig
from hybrid_attention.context_file import MAGIC
from hybrid_attention.engine import ContextFileError, Engine, EngineBusyError

CFG = ModelConfig.preset("tiny")
torch.manual_seed(0)
MODEL = HybridTransformer(CFG).eval()
SAMPLED = dict(max_new_tokens=5, temperature=0.9, top_p=0.9, seed=11)


def engine(**kwargs) -> Engine:
    return Engine(MODEL, **{"cache_bytes": 4 << 20, "max_batch": 3, **kwargs})


def cache_is_empty(eng: Engine) -> bool:
    return all(p.reserved == 0 and len(p.free) == p.n_pages for p in eng.cache.pools.values())


# Constructor ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    pytest.param(dict(cache_bytes=0), ValueError, "cache_bytes must be >= 1", id="cache-zero"),
    pytest.param(dict(cache_bytes=2.5e6), TypeError, "cache_bytes must be an integer", id="cache-float"),
    pytest.param(dict(max_batch=0), ValueError, "max_batch must be >= 1", id="batch-zero"),
    pytest.param(dict(max_batch=True), TypeError, "max_batch must be an integer", id="batch-bool"),
    pytest.param(dict(prefill_chunk=-3), ValueError, "prefill_chunk must be >= 1", id="chunk-negative"),
    pytest.param(dict(page_entries=0), ValueError, "page_entries must be >= 1", id="pages-zero"),
    pytest.param(dict(max_seq_len=0), ValueError, "max_seq_len must be >= 2", id="len-zero"),
    pytest.param(dict(max_seq_len=10**9), ValueError, "the model's max_seq_len=4096", id="len-too-long"),
    pytest.param(dict(share_prefix_min=-1), ValueError, "share_prefix_min must be >= 0", id="share-negative"),
    pytest.param(dict(share_prefix_min="8"), TypeError, "share_prefix_min must be an integer",
                 id="share-str"),
])
def test_bad_engine_arguments_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        engine(**kwargs)


def test_the_model_must_be_a_hybrid_transformer():
    with pytest.raises(TypeError, match="model must be a HybridTransformer"):
        Engine(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("share", [0, 1, None])
def test_share_prefix_min_zero_one_and_none_work(share):
    prompts = [[1, 2, 3, 4], [1, 2, 5], [7, 8]]
    results = engine(share_prefix_min=share).generate(prompts, max_new_tokens=3)
    alone = [engine().generate([p], max_new_tokens=3)[0].tokens for p in prompts]
    assert [r.tokens for r in results] == alone
    assert all(r.shared_prefix_tokens == 0 for r in results)  # the three share no first token
    shared = engine(share_prefix_min=share).generate(prompts[:2], max_new_tokens=3)
    assert [r.shared_prefix_tokens for r in shared] == ([0, 0] if share is None else [2, 2])
    assert [r.tokens for r in shared] == alone[:2]


# Requests are isolated ------------------------------------------------------------------------

def test_same_prompt_and_seed_give_the_same_tokens_anywhere_in_a_batch_and_alone():
    prompt = [9, 8, 7, 6, 5]
    alone = engine().generate([prompt], **SAMPLED)[0].tokens
    for others in ([], [[1, 2]], [[3], [4, 5, 6, 7]]):
        for place in range(len(others) + 1):
            prompts = others[:place] + [prompt] + others[place:]
            results = engine(max_batch=2).generate(prompts, **SAMPLED)
            assert results[place].tokens == alone
    # every copy of the prompt with the same seed samples the same tokens
    copies = engine().generate([prompt] * 3, **SAMPLED)
    assert all(r.tokens == alone for r in copies)
    other_seed = engine().generate([prompt], **{**SAMPLED, "seed": 12})[0].tokens
    assert other_seed != alone


def test_per_request_settings_and_their_lengths():
    prompts = [[1, 2, 3], [1, 2, 3]]
    results = engine().generate(prompts, max_new_tokens=[2, 4], temperature=[0.0, 0.8], seed=[0, 3])
    assert [len(r.tokens) for r in results] == [2, 4]
    assert results[0].tokens == engine().generate([prompts[0]], max_new_tokens=2)[0].tokens
    assert results[1].tokens == engine().generate([prompts[1]], max_new_tokens=4, temperature=0.8,
                                                  seed=3)[0].tokens
    with pytest.raises(ValueError, match="seed has 3 values for 2 prompts"):
        engine().generate(prompts, seed=[1, 2, 3])


@pytest.mark.parametrize("settings, message", [
    pytest.param(dict(temperature=float("nan")), "temperature must be a finite number", id="temp-nan"),
    pytest.param(dict(temperature=float("inf")), "temperature must be a finite number", id="temp-inf"),
    pytest.param(dict(temperature=-0.5), "temperature must be a finite number >= 0", id="temp-negative"),
    pytest.param(dict(temperature="hot"), "temperature must be a finite number", id="temp-str"),
    pytest.param(dict(top_p=0.0), r"top_p must be a number in \(0, 1\]", id="top-p-zero"),
    pytest.param(dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]", id="top-p-nan"),
    pytest.param(dict(top_p=1.5), r"top_p must be a number in \(0, 1\]", id="top-p-big"),
    pytest.param(dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\)", id="seed-negative"),
    pytest.param(dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*63\)", id="seed-huge"),
    pytest.param(dict(seed=True), "seed must be an integer", id="seed-bool"),
    pytest.param(dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1", id="new-zero"),
    pytest.param(dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 1", id="new-float"),
])
def test_bad_sampling_settings_fail_that_request_alone(settings, message):
    good = dict(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1)
    per_request = {name: [good[name], value, good[name]] for name, value in settings.items()}
    prompts = [[4, 5, 6], [7, 8], [9]]
    results = engine().generate(prompts, **{**good, **per_request})
    assert results[1].finish_reason == "error" and results[1].tokens == []
    assert re.search(message, results[1].error), results[1].error
    for i in (0, 2):
        assert results[i].error is None
        assert results[i].tokens == engine().generate([prompts[i]], **good)[0].tokens


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing():
    greedy = engine().generate([[3, 1, 4]], max_new_tokens=4)[0]
    cold = engine().generate([[3, 1, 4]], max_new_tokens=4, temperature=1e-30, seed=5)[0]
    assert cold.error is None and cold.tokens == greedy.tokens


def test_non_finite_logits_fail_that_request_alone():
    torch.manual_seed(3)
    model = HybridTransformer(CFG).eval()
    with torch.no_grad():
        model.head.weight[7].fill_(float("nan"))  # every logit of token 7 is NaN
    eng = Engine(model, cache_bytes=4 << 20, max_batch=2)
    results = eng.generate([[1, 2], [3]], max_new_tokens=3, temperature=[0.5, 0.5])
    assert all(r.error == "the model produced non-finite logits" for r in results)
    assert cache_is_empty(eng)


@pytest.mark.parametrize("prompt", [
    pytest.param([np.int64(5), np.int32(9), 3], id="numpy-scalars"),
    pytest.param([torch.tensor(5), torch.tensor(9), 3], id="0d-tensors"),
    pytest.param(torch.tensor([5, 9, 3]), id="1d-tensor"),
    pytest.param(np.array([5, 9, 3]), id="1d-array"),
    pytest.param(iter([5, 9, 3]), id="iterator"),
])
def test_token_ids_of_any_integer_type(prompt):
    expected = engine().generate([[5, 9, 3]], max_new_tokens=3)[0].tokens
    result = engine().generate([prompt], max_new_tokens=3)[0]
    assert result.error is None and result.tokens == expected and result.prompt_tokens == 3


@pytest.mark.parametrize("prompt, message", [
    pytest.param([1, True, 3], "token 1 is a bool", id="bool"),
    pytest.param([1, np.bool_(False)], "token 1 is a bool", id="numpy-bool"),
    pytest.param([1, 2.0], "token 1 is 2.0 (float), expected an integer id", id="float"),
    pytest.param([1, "2"], "token 1 is '2' (str)", id="str-token"),
    pytest.param("hello", "got a string (tokenize it first)", id="string"),
    pytest.param(torch.tensor([[1, 2]]), "must be 1-D with an integer dtype", id="2d-tensor"),
    pytest.param(torch.tensor([1.0, 2.0]), "must be 1-D with an integer dtype", id="float-tensor"),
    pytest.param([1, 256], "token id 256 (position 1) is outside the vocabulary [0, 256)", id="vocab"),
    pytest.param([-1], "token id -1", id="negative"),
    pytest.param(7, "a prompt must be a sequence of token ids, got int", id="int-prompt"),
])
def test_bad_token_ids_fail_that_request_alone(prompt, message):
    results = engine().generate([[1, 2], prompt], max_new_tokens=2)
    assert results[1].finish_reason == "error"
    assert message in results[1].error, results[1].error
    assert results[0].tokens == engine().generate([[1, 2]], max_new_tokens=2)[0].tokens


def test_call_level_mistakes_raise_before_anything_runs():
    eng = engine()
    with pytest.raises(TypeError, match=r"pass \[prompt\]"):
        eng.generate([1, 2, 3])
    with pytest.raises(TypeError, match="prompts must be a list of prompts"):
        eng.generate("abc")
    with pytest.raises(TypeError, match="stop_tokens entry must be an integer"):
        eng.generate([[1]], stop_tokens=["a"])
    with pytest.raises(TypeError, match="context must be a path"):
        eng.generate([[1]], context=3)
    with pytest.raises(TypeError, match="on_token must be callable"):
        eng.generate([[1]], on_token=5)
    with pytest.raises(TypeError, match="unknown arguments"):
        list(eng.stream([[1]], on_token=print))
    assert cache_is_empty(eng)


# One call at a time ---------------------------------------------------------------------------

def test_a_generate_while_a_stream_is_open_is_refused_and_works_after_it_closes():
    eng = engine()
    stream = eng.stream([[1, 2, 3]], max_new_tokens=6)
    first = next(stream)
    with pytest.raises(EngineBusyError, match="close it first"):
        eng.generate([[4, 5]], max_new_tokens=2)
    with pytest.raises(EngineBusyError):
        eng.save_context([1, 2, 3], "/tmp/never-written.ctx")
    rest = list(stream)
    assert [first] + rest == [(0, t) for t in eng.generate([[1, 2, 3]], max_new_tokens=6)[0].tokens]
    half_read = eng.stream([[1, 2, 3]], max_new_tokens=6)
    next(half_read)
    half_read.close()
    assert cache_is_empty(eng)
    assert eng.generate([[4, 5]], max_new_tokens=2)[0].error is None


def test_a_call_from_another_thread_is_refused_while_one_runs():
    eng = engine()
    started, release, outcome = threading.Event(), threading.Event(), {}

    def on_token(request, token):
        started.set()
        release.wait(10)

    def serve():
        outcome["tokens"] = eng.generate([[1, 2]], max_new_tokens=2, on_token=on_token)[0].tokens

    worker = threading.Thread(target=serve)
    worker.start()
    assert started.wait(30)
    with pytest.raises(EngineBusyError):
        eng.generate([[3]], max_new_tokens=1)
    release.set()
    worker.join(30)
    assert len(outcome["tokens"]) == 2 and cache_is_empty(eng)


def test_on_prefill_reports_every_chunk_up_to_the_prompt_length():
    eng = engine(prefill_chunk=4, share_prefix_min=3)
    seen = []
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 11]]
    results = eng.generate(prompts, max_new_tokens=2, on_prefill=lambda *a: seen.append(a))
    assert [r.shared_prefix_tokens for r in results] == [5, 5]
    for request, prompt in enumerate(prompts):
        reports = [(done, total) for r, done, total in seen if r == request]
        assert {total for _, total in reports} == {len(prompt)}
        done = [d for d, _ in reports]
        assert done == sorted(done) and done[-1] == len(prompt)


# Context files --------------------------------------------------------------------------------

def test_a_context_file_from_a_model_with_other_weights_is_refused(tmp_path):
    path = tmp_path / "doc.ctx"
    engine().save_context(list(range(40)), path)
    torch.manual_seed(1)
    other = HybridTransformer(CFG).eval()  # same configuration, other weights
    with pytest.raises(ContextFileError, match="a model with other weights"):
        Engine(other, cache_bytes=4 << 20).generate([[1]], max_new_tokens=2, context=path)
    # the same model after a change in place, then with its weights put back
    model = HybridTransformer(CFG).eval()
    model.load_state_dict(MODEL.state_dict())
    eng = Engine(model, cache_bytes=4 << 20)
    assert eng.generate([[1]], max_new_tokens=2, context=path)[0].error is None
    saved = model.layers[1].attn.attn_sink.detach().clone()
    with torch.no_grad():
        model.layers[1].attn.attn_sink.add_(0.5)
    with pytest.raises(ContextFileError, match="other weights"):
        eng.generate([[1]], max_new_tokens=2, context=path)
    with torch.no_grad():
        model.layers[1].attn.attn_sink.copy_(saved)
    assert eng.generate([[1]], max_new_tokens=2, context=path)[0].error is None
    assert cache_is_empty(eng)


def test_a_context_that_no_engine_could_continue_is_refused_when_saved(tmp_path):
    eng = engine(max_seq_len=32)
    path = tmp_path / "full.ctx"
    with pytest.raises(ValueError, match="leaves no room for a new token within max_seq_len=32"):
        eng.save_context(list(range(32)), path)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.save_context([], path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.save_context([1, 999], path)
    with pytest.raises(ValueError, match="does not exist"):
        eng.save_context([1, 2], tmp_path / "missing" / "doc.ctx")
    assert not path.exists() and list(tmp_path.iterdir()) == [] and cache_is_empty(eng)
    info = eng.save_context(list(range(31)), path)
    assert info["tokens"] == 31
    assert len(eng.generate([[]], max_new_tokens=1, context=path)[0].tokens) == 1


def _header_edit(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace in the header, keeping its length field right."""
    head_len = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    head = data[len(MAGIC) + 8:len(MAGIC) + 8 + head_len]
    assert old in head
    head = head.replace(old, new)
    return MAGIC + len(head).to_bytes(8, "little") + head + data[len(MAGIC) + 8 + head_len:]


def test_headers_are_checked_before_the_payload_is_read(tmp_path):
    eng = engine()
    path = tmp_path / "doc.ctx"
    eng.save_context(list(range(30)), path)
    data = path.read_bytes()
    cases = {
        "huge header length": (MAGIC + (1 << 40).to_bytes(8, "little") + data[len(MAGIC) + 8:],
                               "header is corrupted"),
        "cut in the header": (data[:len(MAGIC) + 20], "ends inside the header"),
        "header is a list": (MAGIC + (2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        "old format": (_header_edit(data, b'"format_version": 2', b'"format_version": 1'),
                       "save the context again"),
        "tokens changed": (_header_edit(data, b'"tokens": 30', b'"tokens": 31'), "payload bytes"),
        "tokens too many": (_header_edit(data, b'"tokens": 30', b'"tokens": 99999'), "this engine continues"),
        "tokens a string": (_header_edit(data, b'"tokens": 30', b'"tokens": "30"'), "'tokens' is '30'"),
        "trailing bytes": (data + b"\0", "after the payload"),
        "no checksum": (_header_edit(data, b'"sha256"', b'"sha257"'), "'sha256' is None"),
    }
    for content, message in cases.values():
        bad = tmp_path / "bad.ctx"
        bad.write_bytes(content)
        with pytest.raises(ContextFileError, match=message):
            eng.generate([[1]], max_new_tokens=2, context=bad)
    with pytest.raises(ContextFileError, match="cannot read context file"):
        eng.generate([[1]], max_new_tokens=2, context=tmp_path / "missing.ctx")
    assert cache_is_empty(eng)


def test_every_flipped_byte_of_a_context_file_is_refused(tmp_path):
    eng = engine()
    path = tmp_path / "doc.ctx"
    eng.save_context(list(range(20)), path)
    data = path.read_bytes()
    bad = tmp_path / "bad.ctx"
    for position in range(0, len(data), max(1, len(data) // 300)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ContextFileError):
            eng.generate([[1]], max_new_tokens=1, context=bad)
    assert cache_is_empty(eng)


def test_a_prefix_keeps_only_what_is_not_on_its_shared_pages(tmp_path):
    eng = Engine(MODEL, cache_bytes=8 << 20, max_batch=2, page_entries=16)
    path = tmp_path / "doc.ctx"
    eng.save_context(torch.randint(0, 256, (200,)).tolist(), path)
    restored = eng._load_context(path)
    prefix = eng.cache.add_prefix(restored.pop("layers"))
    try:
        rows = [data for snapshot in prefix.snapshots for key, data in snapshot.items()
                if key.startswith("rows:")]
        assert rows and all(data.size(0) < 16 for data in rows)  # full pages live in the pool only
    finally:
        eng.cache.drop_prefix(prefix)
    assert cache_is_empty(eng)


# The cache ------------------------------------------------------------------------------------

def test_cache_arguments_and_unknown_sequences_are_refused():
    from hybrid_attention.cache import PagedKVCache

    for kwargs, error, message in [(dict(cache_bytes=0), ValueError, "cache_bytes must be >= 1"),
                                   (dict(cache_bytes=1 << 20, page_entries=0), ValueError,
                                    "page_entries must be >= 1"),
                                   (dict(cache_bytes=1 << 20, max_sequences=1.0), TypeError,
                                    "max_sequences must be an integer")]:
        with pytest.raises(error, match=message):
            PagedKVCache(MODEL, **kwargs)
    with pytest.raises(TypeError, match="model must be a HybridTransformer"):
        PagedKVCache(object(), 1 << 20)
    cache = PagedKVCache(MODEL, 1 << 20, max_sequences=2)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        cache.allocate(0)
    seq = cache.allocate(10)
    for call in (cache.free, cache.states, cache.nbytes_by_type):
        with pytest.raises(ValueError, match="no sequence 7 in this cache"):
            call(7)
    cache.free(seq)
    with pytest.raises(ValueError, match="no sequence"):
        cache.free(seq)  # freeing twice would corrupt the free lists
    assert all(p.reserved == 0 and len(p.free) == p.n_pages for p in cache.pools.values())

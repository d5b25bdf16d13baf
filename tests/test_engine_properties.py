"""Property test of the engine's isolation: random workloads mixing valid and hostile requests.

For every request of a batch, its result (tokens, finish reason, error) equals the result of the
same request served alone by a fresh engine of the same configuration; a hostile request gets an
error result that names its problem, and never changes what the others get."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_attention import HybridTransformer, ModelConfig
from hybrid_attention.engine import Engine

CFG = ModelConfig.preset("tiny")
torch.manual_seed(0)
MODEL = HybridTransformer(CFG).eval()
MAX_SEQ_LEN = 48
VOCAB = CFG.vocab_size

HOSTILE_PROMPTS = {
    "empty": ([], "empty prompt"),
    "past the vocabulary": ([1, VOCAB], "outside the vocabulary"),
    "negative id": ([-3, 2], "outside the vocabulary"),
    "bool id": ([1, True], "is a bool"),
    "float id": ([1.0, 2], "expected an integer id"),
    "string": ("tokens", "got a string"),
    "none": (None, "a prompt must be a sequence"),
    "too long": (list(range(MAX_SEQ_LEN)), "exceeds max_seq_len"),
}
HOSTILE_SETTINGS = {
    "temperature": ([math.nan, math.inf, -1.0, "warm", None], "temperature must be"),
    "top_p": ([0.0, -0.5, 1.01, math.nan, None], "top_p must be"),
    "seed": ([-1, 2**63, True, 1.5], "seed must be"),
    "max_new_tokens": ([0, -2, 1.5, None, True], "max_new_tokens must be"),
}


@st.composite
def valid_request(draw, prefix):
    own = draw(st.lists(st.integers(0, VOCAB - 1), min_size=0 if prefix else 1, max_size=16))
    sampled = draw(st.booleans())
    return dict(prompt=prefix + own, max_new_tokens=draw(st.integers(1, 4)),
                temperature=draw(st.floats(0.1, 2.0)) if sampled else 0.0,
                top_p=draw(st.floats(0.05, 1.0)) if sampled else 1.0,
                seed=draw(st.integers(0, 2**40)), expect=None)


@st.composite
def hostile_request(draw, prefix):
    request = draw(valid_request(prefix))
    if draw(st.booleans()):
        prompt, message = HOSTILE_PROMPTS[draw(st.sampled_from(sorted(HOSTILE_PROMPTS)))]
        request.update(prompt=prompt, expect=message)
    else:
        name = draw(st.sampled_from(sorted(HOSTILE_SETTINGS)))
        values, message = HOSTILE_SETTINGS[name]
        request.update({name: draw(st.sampled_from(values)), "expect": message})
    return request


@st.composite
def workload(draw):
    prefix = draw(st.sampled_from([[], [5, 6, 7, 8, 9, 10]]))  # a common prefix may be shared
    requests = draw(st.lists(st.one_of(valid_request(prefix), hostile_request(prefix)),
                             min_size=1, max_size=5))
    engine = dict(max_batch=draw(st.integers(1, 3)), prefill_chunk=draw(st.integers(1, 12)),
                  page_entries=draw(st.sampled_from([8, 16, 64])),
                  cache_bytes=draw(st.sampled_from([1 << 20, 4 << 20])),
                  share_prefix_min=draw(st.sampled_from([None, 0, 4])))
    stop = draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))
    return requests, engine, stop


def serve(requests, engine_kwargs, stop):
    engine = Engine(MODEL, max_seq_len=MAX_SEQ_LEN, **engine_kwargs)
    per_request = {name: [r[name] for r in requests]
                   for name in ("max_new_tokens", "temperature", "top_p", "seed")}
    results = engine.generate([r["prompt"] for r in requests], stop_tokens=stop, **per_request)
    assert all(p.reserved == 0 and len(p.free) == p.n_pages for p in engine.cache.pools.values())
    return [(r.tokens, r.finish_reason, r.error) for r in results]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=workload())
def test_each_request_gets_what_it_gets_alone(case):
    requests, engine_kwargs, stop = case
    together = serve(requests, engine_kwargs, stop)
    for request, got in zip(requests, together, strict=True):
        tokens, reason, error = got
        if request["expect"] is not None:
            assert reason == "error" and request["expect"] in error and tokens == []
        else:
            assert error is None and reason in ("length", "stop") and 1 <= len(tokens)
        assert got == serve([request], engine_kwargs, stop)[0]

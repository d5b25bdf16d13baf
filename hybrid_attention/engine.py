"""Engine: serve many prompts from one paged KV cache with continuous batching.

Every step, each running request contributes one chunk: up to `prefill_chunk` prompt tokens while
its prompt lasts, then one token per decode step. New requests join as soon as the cache can hold
their worst case (prompt + max_new_tokens), so prefill chunks of new requests interleave with the
decode steps of running ones. Results come back per request, in submission order.

Requests are isolated: a request that is invalid (its tokens, its length, its sampling settings),
can never fit the cache, or whose sampling fails, gets an error result and the others carry on.
Each request samples from its own generator seeded with its own seed, so its tokens depend only
on its prompt, its seed and its sampling settings, not on the other requests or its place among
them. One engine serves one call at a time: a `generate` while a `stream` is still open (or from
another thread) is refused with `EngineBusyError`.

Context files (`save_context`) hold a processed prompt's whole cache state (every pool of every
layer, the compressor tails, the position and the last logits) so that `generate(..., context=)`
continues after it without recomputing the prefix. They are bound to the model that wrote them:
its configuration, dtype and weights (see `context_file`).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import context_file
from .cache import CacheFullError, PagedKVCache
from .context_file import ContextFileError
from .model import HybridTransformer, forward_ragged

__all__ = ["ContextFileError", "Engine", "EngineBusyError", "GenerationResult"]

MAX_SEED = 2**63  # torch.Generator.manual_seed takes up to 64 bits; keep seeds non-negative


class EngineBusyError(RuntimeError):
    """The engine is serving another call (an open `stream`, or a call from another thread)."""


@dataclass
class GenerationResult:
    request: int  # index in the prompts given to generate()
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "length", "stop" or "error"
    error: str | None = None
    context_tokens: int = 0  # tokens restored from a context file
    shared_prefix_tokens: int = 0  # leading prompt tokens processed once for all requests
    cache_bytes: dict[str, int] = field(default_factory=dict)  # by storage type, at the end
    time_to_first_token: float = 0.0  # seconds from generate() to this request's first token
    total_time: float = 0.0


@dataclass
class _Request:
    result: GenerationResult
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator
    seq_id: int | None = None
    fed: int = 0  # prompt tokens already processed
    logits: torch.Tensor | None = None  # last logits, when restored from a context


class _SamplingError(ValueError):
    pass


class Engine:
    """Continuous-batching generation for a `HybridTransformer` over a `PagedKVCache`.

    cache_bytes: the memory budget of the cache; max_batch: requests running at once;
    prefill_chunk: prompt tokens a request feeds per step; max_seq_len: the longest request
    (context + prompt + new tokens), by default the model's; page_entries: entries per cache page;
    share_prefix_min: prompts that all start with at least this many equal tokens have that prefix
    processed once and shared (0 or 1: any common prefix; None: never)."""

    def __init__(self, model: HybridTransformer, cache_bytes: int = 256 << 20, max_batch: int = 8,
                 prefill_chunk: int = 512, max_seq_len: int | None = None, page_entries: int = 64,
                 share_prefix_min: int | None = 256) -> None:
        if not isinstance(model, HybridTransformer):
            raise TypeError(f"model must be a HybridTransformer, got {type(model).__name__}")
        model_limit = model.cfg.attention.max_seq_len
        cache_bytes = _integer("cache_bytes", cache_bytes, 1)
        max_batch = _integer("max_batch", max_batch, 1)
        prefill_chunk = _integer("prefill_chunk", prefill_chunk, 1)
        page_entries = _integer("page_entries", page_entries, 1)
        if max_seq_len is not None:
            max_seq_len = _integer("max_seq_len", max_seq_len, 2, model_limit,
                                   f"the model's max_seq_len={model_limit}")
        if share_prefix_min is not None:
            share_prefix_min = _integer("share_prefix_min", share_prefix_min, 0)
        self.model = model.eval()
        self.cfg = model.cfg
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.share_prefix_min = share_prefix_min
        self.max_seq_len = max_seq_len or model_limit
        self.cache = PagedKVCache(model, cache_bytes, max_sequences=max_batch, page_entries=page_entries)
        self.last_run = {"steps": 0, "peak_running": 0}
        self._busy = threading.Lock()
        self._weights: tuple[tuple, str] | None = None  # (weights_version, weights_digest)

    # Public API -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 32,
                 temperature: float | Sequence[float] = 0.0, top_p: float | Sequence[float] = 1.0,
                 seed: int | Sequence[int] = 0, stop_tokens: Sequence[int] = (),
                 context: str | Path | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 on_prefill: Callable[[int, int, int], None] | None = None) -> list[GenerationResult]:
        """Generate for every prompt (each a sequence of token ids: ints, numpy integers, or a 1-D
        integer tensor). `max_new_tokens`, `temperature`, `top_p` and `seed` are one value for all
        requests or one per request. `on_token(request, token)` is called as each token arrives,
        `on_prefill(request, done, total)` after each prompt chunk a request has processed."""
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be callable, got {type(on_token).__name__}")
        results = None
        for item in self._run(prompts, max_new_tokens, temperature, top_p, seed, stop_tokens, context,
                              on_prefill):
            if isinstance(item, list):
                results = item
            elif on_token is not None:
                on_token(*item)
        return results

    def stream(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[tuple[int, int]]:
        """Yield (request, token) pairs as they are generated (same arguments as generate, but
        on_token). The engine is busy until the stream is exhausted or closed (`.close()`)."""
        kwargs = _stream_arguments(kwargs)
        for item in self._run(prompts, **kwargs):
            if not isinstance(item, list):
                yield item

    @torch.no_grad()
    def save_context(self, prompt_tokens: Sequence[int], path: str | Path) -> dict:
        """Process a prompt and write its whole cache state to `path`; returns a summary.

        Refused (ValueError, nothing written) when no engine of this model could continue it: the
        prompt must leave room for at least one more token within max_seq_len."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str or a Path, got {type(path).__name__}")
        prompt, problem = _token_ids(prompt_tokens, self.cfg.vocab_size)
        if problem is None and not prompt:
            problem = "empty prompt: a context holds at least one token"
        if problem is None and len(prompt) >= self.max_seq_len:
            problem = (f"a context of {len(prompt)} tokens leaves no room for a new token within "
                       f"max_seq_len={self.max_seq_len}")
        if problem is None and not self.cache.fits_at_all(len(prompt)):
            problem = f"a {len(prompt)}-token context is more than the whole cache budget holds"
        if problem:
            raise ValueError(problem)
        if not Path(path).parent.is_dir():
            raise ValueError(f"cannot write {path}: the folder {Path(path).parent} does not exist")
        with self._exclusive("save_context"):
            processed = self._process(prompt)
        return self._write_context(prompt, processed, path)

    def save_states(self, prompt_tokens: Sequence[int], logits: torch.Tensor, states: list,
                    path: str | Path, row: int = 0) -> dict:
        """Write a context file for a prompt processed elsewhere (e.g. by
        `distributed.context_parallel_prefill`): `states` are the model's per-layer `LayerState`s
        after the prompt (sequence `row` of their batch), `logits` [vocab] those of its last
        token. The rows go through this engine's cache (its FP8 / FP4 storage), so
        `generate(..., context=path)` continues as after its own prefill of the prompt."""
        prompt, problem = _token_ids(prompt_tokens, self.cfg.vocab_size)
        if problem is None and (not prompt or len(prompt) >= self.max_seq_len):
            problem = f"a context holds 1 to {self.max_seq_len - 1} tokens, got {len(prompt)}"
        if problem is None and (len(states) != len(self.model.layers)
                                or any(state.pos != len(prompt) for state in states)):
            problem = (f"states must be the model's {len(self.model.layers)} layer states after the "
                       f"prompt's {len(prompt)} tokens")
        if problem is None and tuple(logits.shape) != (self.cfg.vocab_size,):
            problem = f"logits must be [{self.cfg.vocab_size}], got {tuple(logits.shape)}"
        if problem:
            raise ValueError(problem)
        with self._exclusive("save_states"):
            seq_id = self.cache.allocate(len(prompt))
            try:
                paged = self.cache.states(seq_id)
                for target, state in zip(paged, states, strict=True):
                    _copy_state(target, state, row)
                processed = {"logits": logits, "layers": [state.snapshot() for state in paged]}
            finally:
                self.cache.free(seq_id)
        return self._write_context(prompt, processed, path)

    def _write_context(self, prompt: list[int], processed: dict, path: str | Path) -> dict:
        arrays = [torch.tensor(prompt, dtype=torch.int64), processed["logits"].float()]
        layout = self.cache.snapshot_layout(len(prompt))
        for parts, snapshot in zip(layout, processed["layers"], strict=True):
            for name, shape in parts.items():
                array = snapshot[name]
                if tuple(array.shape) != shape or array.dtype != torch.uint8:  # a bug, not a user error
                    raise RuntimeError(f"state part {name} is {array.dtype} {tuple(array.shape)}, "
                                       f"the context layout says uint8 {shape}")
                arrays.append(array)
        header = {"model": self._model_fingerprint(), "weights": self.weights_digest(),
                  "tokens": len(prompt)}
        size = context_file.write(path, header, arrays)
        return {"tokens": len(prompt), "file_bytes": size}

    def weights_digest(self) -> str:
        """`context_file.weights_digest` of the model, recomputed only when its weights changed."""
        version = context_file.weights_version(self.model)
        if self._weights is None or self._weights[0] != version:
            self._weights = (version, context_file.weights_digest(self.model))
        return self._weights[1]

    # Scheduling -----------------------------------------------------------------------------

    @contextmanager
    def _exclusive(self, call: str):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError(f"{call}: this engine is serving another call (a stream() that was "
                                  "not exhausted or closed, or a call from another thread); finish or "
                                  "close it first, or use a second Engine")
        try:
            yield
        finally:
            self._busy.release()

    def _process(self, prompt: list[int], progress: Callable[[int], None] | None = None) -> dict:
        """Run a prompt through a temporary sequence: {"tokens", "logits" (of its last token),
        "layers" (every state's bytes)}, the content of a context file."""
        seq_id = self.cache.allocate(len(prompt))
        try:
            states = self.cache.states(seq_id)
            for start in range(0, len(prompt), self.prefill_chunk):
                chunk = torch.tensor(prompt[start:start + self.prefill_chunk])
                logits = forward_ragged(self.model, [chunk], [states])[0]
                if progress is not None:
                    progress(start + chunk.numel())
            return {"tokens": len(prompt), "logits": logits.clone(),
                    "layers": [state.snapshot() for state in states]}
        finally:
            self.cache.free(seq_id)

    @torch.no_grad()
    def _run(self, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0, stop_tokens=(),
             context=None, on_prefill=None):
        if isinstance(prompts, (str, bytes, dict)) or not hasattr(prompts, "__len__"):
            raise TypeError(f"prompts must be a list of prompts (each a list of token ids), got "
                            f"{type(prompts).__name__}")
        if len(prompts) and all(isinstance(p, numbers.Integral) for p in prompts):
            raise TypeError("prompts must be a list of prompts, got a list of token ids; "
                            "for one prompt pass [prompt]")
        n = len(prompts)
        settings = list(zip(_per_request("max_new_tokens", max_new_tokens, n),
                            _per_request("temperature", temperature, n),
                            _per_request("top_p", top_p, n), _per_request("seed", seed, n),
                            strict=True))
        stop = {_integer("stop_tokens entry", t, -(2**63)) for t in _sequence("stop_tokens", stop_tokens)}
        if context is not None and not isinstance(context, (str, Path)):
            raise TypeError(f"context must be a path (str or Path), got {type(context).__name__}")
        if on_prefill is not None and not callable(on_prefill):
            raise TypeError(f"on_prefill must be callable, got {type(on_prefill).__name__}")

        with self._exclusive("generate/stream"):
            start_time = time.perf_counter()
            restored = self._load_context(context) if context is not None else None
            context_len = restored["tokens"] if restored else 0
            results, waiting = [], deque()
            for i, (prompt, (new, temp, p, request_seed)) in enumerate(zip(prompts, settings, strict=True)):
                ids, problem = _token_ids(prompt, self.cfg.vocab_size)
                result = GenerationResult(request=i, prompt_tokens=len(ids or ()), context_tokens=context_len)
                results.append(result)
                problem = problem or _sampling_problem(new, temp, p, request_seed)
                if problem is None and not ids and restored is None:
                    problem = "empty prompt: give at least one token (or a context file)"
                problem = problem or self._length_problem(context_len, len(ids), new)
                if problem is None and not self.cache.fits_at_all(context_len + len(ids) + new):
                    problem = (f"request needs {context_len + len(ids) + new} tokens of cache, "
                               "more than the whole cache budget holds")
                if problem:
                    result.finish_reason, result.error = "error", problem
                    continue
                generator = torch.Generator().manual_seed(int(request_seed))
                waiting.append(_Request(result, ids, int(new), float(temp), float(p), generator))

            if restored is None and len(waiting) >= 2 and self.share_prefix_min is not None:
                restored = self._shared_prefix(waiting, on_prefill)
                context_len = restored["tokens"] if restored else 0

            running: list[_Request] = []
            self.last_run = {"steps": 0, "peak_running": 0}
            # Requests continuing a context share its full pages; each copies the window and tails.
            prefix = None
            if restored and waiting:
                prefix = self.cache.add_prefix(restored.pop("layers"))
            try:
                yield from self._schedule(waiting, running, prefix, restored, context_len, stop,
                                          start_time, on_prefill)
            finally:
                for req in running:
                    self.cache.free(req.seq_id)
                if prefix is not None:
                    self.cache.drop_prefix(prefix)
        yield results

    def _shared_prefix(self, waiting, on_prefill) -> dict | None:
        """When every waiting prompt starts with the same `share_prefix_min`+ tokens, process them
        once; the requests then continue from it, sharing its full pages. Keeps each request at
        least one token of its own (unless its prompt is the prefix: it samples from the prefix's
        logits)."""
        prompts = [req.prompt for req in waiting]
        common = 0
        shortest = min(len(p) for p in prompts)
        while common < shortest and all(p[common] == prompts[0][common] for p in prompts):
            common += 1
        if common == 0 or common < self.share_prefix_min:
            return None

        def progress(done: int) -> None:
            if on_prefill is not None:
                for req in waiting:
                    on_prefill(req.result.request, done, len(req.prompt))

        try:
            shared = self._process(prompts[0][:common], progress)
        except CacheFullError:
            return None  # not enough room to hold it on the side: serve the requests unshared
        for req in waiting:
            req.prompt = req.prompt[common:]
            req.result.shared_prefix_tokens = common
        return shared

    def _schedule(self, waiting, running, prefix, restored, context_len, stop, start_time, on_prefill):
        while waiting or running:
            while waiting and len(running) < self.max_batch:
                req = waiting[0]
                need = context_len + len(req.prompt) + req.max_new_tokens
                if not self.cache.can_admit(need, prefix):
                    break
                waiting.popleft()
                req.seq_id = self.cache.allocate(need, prefix)
                if restored is not None:
                    req.logits = restored["logits"]
                running.append(req)
            if not running:  # cannot happen: fits_at_all was checked and nothing else holds pages
                raise RuntimeError("scheduler stalled with an empty batch")
            self.last_run["steps"] += 1
            self.last_run["peak_running"] = max(self.last_run["peak_running"], len(running))

            # Requests with a restored context and no prompt sample straight from its logits.
            ready = [r for r in running if r.fed == len(r.prompt) and r.logits is not None]
            work = [r for r in running if not (r.fed == len(r.prompt) and r.logits is not None)]
            chunks = []
            for req in work:
                if req.fed < len(req.prompt):
                    chunks.append(torch.tensor(req.prompt[req.fed:req.fed + self.prefill_chunk]))
                else:
                    chunks.append(torch.tensor(req.result.tokens[-1:]))
            if work:
                logits = forward_ragged(self.model, chunks, [self.cache.states(r.seq_id) for r in work])
            for req, chunk in zip(work, chunks, strict=True):
                if req.fed < len(req.prompt):
                    req.fed += chunk.numel()
                    if on_prefill is not None:
                        shared = req.result.shared_prefix_tokens
                        on_prefill(req.result.request, shared + req.fed, shared + len(req.prompt))
            samples = [(r, r.logits) for r in ready]
            samples += [(r, logits[i]) for i, r in enumerate(work) if r.fed == len(r.prompt)]
            for req, row in samples:
                req.logits = None
                res = req.result
                now = time.perf_counter() - start_time
                try:
                    token = _sample(row, req.temperature, req.top_p, req.generator)
                except _SamplingError as err:
                    res.finish_reason, res.error, res.total_time = "error", str(err), now
                    self.cache.free(req.seq_id)
                    running.remove(req)
                    continue
                res.tokens.append(token)
                if len(res.tokens) == 1:
                    res.time_to_first_token = now
                yield res.request, token
                if token in stop or len(res.tokens) >= req.max_new_tokens:
                    res.finish_reason = "stop" if token in stop else "length"
                    res.cache_bytes = self.cache.nbytes_by_type(req.seq_id)
                    res.total_time = now
                    self.cache.free(req.seq_id)
                    running.remove(req)

    def _length_problem(self, context_len: int, prompt_len: int, max_new_tokens: int) -> str | None:
        total = context_len + prompt_len + max_new_tokens
        if total > self.max_seq_len:
            return (f"request of {total} tokens (context {context_len} + prompt {prompt_len} + "
                    f"{max_new_tokens} new) exceeds max_seq_len={self.max_seq_len}")
        return None

    # Context files --------------------------------------------------------------------------

    def _model_fingerprint(self) -> str:
        dtype = str(next(self.model.parameters()).dtype)
        return hashlib.sha256((self.cfg.fingerprint() + dtype).encode()).hexdigest()

    def _load_context(self, path) -> dict:
        """Check a context file against this engine (everything before allocating), then read it."""
        path = Path(path)
        try:
            f = path.open("rb")
        except OSError as err:
            raise ContextFileError(f"cannot read context file {path}: {err.strerror or err}") from None
        with f:
            header, offset = context_file.read_header(f, path)
            if header["model"] != self._model_fingerprint():
                raise ContextFileError(f"{path} was written for another model configuration or dtype")
            if header["weights"] != self.weights_digest():
                raise ContextFileError(f"{path} was written by a model with other weights")
            tokens = header["tokens"]
            if not 1 <= tokens < self.max_seq_len:
                raise ContextFileError(f"{path} holds {tokens} tokens; this engine continues contexts of "
                                       f"1 to {self.max_seq_len - 1} (max_seq_len={self.max_seq_len})")
            shapes = self.cache.snapshot_layout(tokens)
            layout = [("prompt", torch.int64, (tokens,)), ("logits", torch.float32, (self.cfg.vocab_size,))]
            for i, parts in enumerate(shapes):
                layout += [(f"{i}/{name}", torch.uint8, shape) for name, shape in parts.items()]
            arrays = context_file.read_payload(f, path, header, offset, layout)
        layers = [{"pos": tokens, **{name: arrays[f"{i}/{name}"] for name in parts}}
                  for i, parts in enumerate(shapes)]
        return {"tokens": tokens, "prompt": arrays["prompt"].tolist(), "logits": arrays["logits"],
                "layers": layers}


def _copy_state(target, state, row: int) -> None:
    """Sequence `row` of a plain `LayerState` into an empty paged state of the same layer."""
    if state.kv is not None:
        target.kv.append(state.kv.view()[row:row + 1])
    else:
        count = min(state.pos, state.window.size(1))
        target.write_window(state.pos, state.window_rows(count)[row:row + 1])
    for name in ("compressed", "index_keys"):
        if getattr(state, name) is not None:
            getattr(target, name).append(getattr(state, name).view()[row:row + 1])
    for name in ("compressor", "index_compressor"):
        tail = getattr(state, name)
        if tail is not None:
            setattr(target, name, type(tail)(tail.kv[row:row + 1], tail.score[row:row + 1]))
    target.pos = state.pos


# Arguments ------------------------------------------------------------------------------------


def _integer(name: str, value, low: int, high: int | None = None, high_name: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high_name or high}, got {value}")
    return value


def _sequence(name: str, value) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset, torch.Tensor)):
        raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
    return list(value.tolist() if isinstance(value, torch.Tensor) else value)


def _per_request(name: str, value, n: int) -> list:
    """One value per request: `value` for each, or the n values of a list / tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sampling_problem(max_new_tokens, temperature, top_p, seed) -> str | None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        return f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}"
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        return f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
    if not _real(top_p) or not 0 < top_p <= 1:
        return f"top_p must be a number in (0, 1], got {top_p!r}"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        return f"seed must be an integer in [0, 2**63), got {seed!r}"
    return None


def _token_ids(prompt, vocab_size: int) -> tuple[list[int], str | None]:
    """(ids, None) for a valid prompt, ([], problem) otherwise. Accepts ints, numpy integers,
    0-d integer tensors, and 1-D integer tensors or arrays; refuses bools, floats and strings."""
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        dtype = prompt.dtype
        is_int = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
                  if isinstance(dtype, torch.dtype) else dtype.kind in "iu")
        if prompt.ndim != 1 or not is_int:
            return [], f"a prompt tensor must be 1-D with an integer dtype, got {dtype} {tuple(prompt.shape)}"
        ids = prompt.tolist()
    elif isinstance(prompt, (str, bytes)):
        return [], "a prompt must be a sequence of token ids, got a string (tokenize it first)"
    elif not isinstance(prompt, (Sequence, Iterator)):
        return [], f"a prompt must be a sequence of token ids, got {type(prompt).__name__}"
    else:
        ids = list(prompt)
    if not all(type(token) is int for token in ids):  # numpy ints, 0-d tensors, or wrong types
        items, ids = ids, []
        for position, token in enumerate(items):
            if isinstance(token, torch.Tensor) and token.dim() == 0 and not token.dtype.is_floating_point \
                    and token.dtype != torch.bool:
                token = int(token)
            is_bool_tensor = isinstance(token, torch.Tensor) and token.dtype == torch.bool
            if isinstance(token, bool) or type(token).__name__ in ("bool", "bool_") or is_bool_tensor:
                return [], f"token {position} is a bool ({token!r}), expected an integer id"
            if not isinstance(token, numbers.Integral):
                return [], f"token {position} is {token!r} ({type(token).__name__}), expected an integer id"
            ids.append(int(token))
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        position = next(i for i, token in enumerate(ids) if not 0 <= token < vocab_size)
        return [], (f"token id {ids[position]} (position {position}) is outside the vocabulary "
                    f"[0, {vocab_size})")
    return ids, None


def _stream_arguments(kwargs: dict) -> dict:
    allowed = {"max_new_tokens", "temperature", "top_p", "seed", "stop_tokens", "context", "on_prefill"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; expected some of {sorted(allowed)}")
    return kwargs


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token from `logits` [vocab]: greedy at temperature 0, else softmax(logits / temperature)
    cut to the smallest set reaching `top_p`, sampled by one uniform draw from the request's own
    generator (inverse CDF). In float64 after subtracting the maximum, so no temperature > 0
    overflows."""
    if not bool(torch.isfinite(logits).all()):
        raise _SamplingError("the model produced non-finite logits")
    if temperature == 0:
        return int(logits.argmax())
    scaled = (logits.double() - logits.max().double()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True, stable=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    cdf = probs.cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_max(probs.numel() - 1))

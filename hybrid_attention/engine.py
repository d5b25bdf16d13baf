"""Engine: serve many prompts from one paged KV cache with continuous batching.

Every step, each running request contributes one chunk: up to `prefill_chunk` prompt tokens while
its prompt lasts, then one token per decode step. New requests join as soon as the cache can hold
their worst case (prompt + max_new_tokens), so prefill chunks of new requests interleave with the
decode steps of running ones. Results come back per request, in submission order; a request that
is invalid, or can never fit the cache, gets an error result and the others carry on.

Context files (`save_context`) hold a processed prompt's whole cache state (every pool of every
layer, the compressor tails, the position and the last logits) so that `generate(..., context=)`
continues after it without recomputing the prefix.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import CacheFullError, PagedKVCache
from .model import HybridTransformer, forward_ragged

CONTEXT_MAGIC = b"HYBRIDCTX\n"
CONTEXT_FORMAT_VERSION = 1


class ContextFileError(ValueError):
    """A context file that cannot be used: corrupted, truncated, another model, a newer format."""


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
    generator: torch.Generator
    seq_id: int | None = None
    fed: int = 0  # prompt tokens already processed
    logits: torch.Tensor | None = None  # last logits, when restored from a context


class Engine:
    """Continuous-batching generation for a `HybridTransformer` over a `PagedKVCache`.

    cache_bytes: the memory budget of the cache; max_batch: requests running at once;
    prefill_chunk: prompt tokens a request feeds per step; max_seq_len: the longest request
    (context + prompt + new tokens), by default the model's; share_prefix_min: prompts that all
    start with at least this many equal tokens have that prefix processed once and shared."""

    def __init__(self, model: HybridTransformer, cache_bytes: int = 256 << 20, max_batch: int = 8,
                 prefill_chunk: int = 512, max_seq_len: int | None = None, page_entries: int = 64,
                 share_prefix_min: int = 256) -> None:
        if prefill_chunk < 1 or max_batch < 1:
            raise ValueError(f"prefill_chunk and max_batch must be >= 1, got {prefill_chunk}, {max_batch}")
        self.model = model.eval()
        self.cfg = model.cfg
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.share_prefix_min = share_prefix_min
        self.max_seq_len = max_seq_len or self.cfg.attention.max_seq_len
        if self.max_seq_len > self.cfg.attention.max_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's "
                             f"{self.cfg.attention.max_seq_len}")
        self.cache = PagedKVCache(model, cache_bytes, max_sequences=max_batch, page_entries=page_entries)

    # Public API -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
                 context: str | Path | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Generate for every prompt; `on_token(request, token)` is called as each token arrives."""
        results = None
        for item in self._run(prompts, max_new_tokens, temperature, top_p, seed, stop_tokens, context):
            if isinstance(item, list):
                results = item
            elif on_token is not None:
                on_token(*item)
        return results

    def stream(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[tuple[int, int]]:
        """Yield (request, token) pairs as they are generated (same arguments as generate)."""
        for item in self._run(prompts, **_defaults(kwargs)):
            if not isinstance(item, list):
                yield item

    @torch.no_grad()
    def save_context(self, prompt_tokens: Sequence[int], path: str | Path) -> dict:
        """Process a prompt and write its whole cache state to `path`; returns a summary."""
        prompt = list(prompt_tokens)
        problem = self._check_prompt(prompt, 0, 0)
        if problem:
            raise ValueError(problem)
        buffer = io.BytesIO()
        torch.save(self._process(prompt), buffer)
        payload = buffer.getvalue()
        header = {"format_version": CONTEXT_FORMAT_VERSION, "model": self._fingerprint(),
                  "tokens": len(prompt), "sha256": hashlib.sha256(payload).hexdigest(),
                  "payload_bytes": len(payload)}
        head = json.dumps(header).encode()
        Path(path).write_bytes(CONTEXT_MAGIC + struct.pack("<Q", len(head)) + head + payload)
        return {"tokens": len(prompt), "file_bytes": len(CONTEXT_MAGIC) + 8 + len(head) + len(payload)}

    def _process(self, prompt: list[int]) -> dict:
        """Run a prompt through a temporary sequence: {"tokens", "prompt", "logits" (of its last
        token), "layers" (every state's bytes)}, the content of a context file."""
        seq_id = self.cache.allocate(len(prompt))
        try:
            states = self.cache.states(seq_id)
            for start in range(0, len(prompt), self.prefill_chunk):
                chunk = torch.tensor(prompt[start:start + self.prefill_chunk])
                logits = forward_ragged(self.model, [chunk], [states])[0]
            return {"tokens": len(prompt), "prompt": prompt, "logits": logits.clone(),
                    "layers": [state.snapshot() for state in states]}
        finally:
            self.cache.free(seq_id)

    # Scheduling -----------------------------------------------------------------------------

    @torch.no_grad()
    def _run(self, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=0, stop_tokens=(),
             context=None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        start_time = time.perf_counter()
        restored = self._load_context(context) if context is not None else None
        context_len = restored["tokens"] if restored else 0
        stop = set(stop_tokens)
        results, waiting = [], deque()
        for i, prompt in enumerate(prompts):
            prompt = list(prompt)
            result = GenerationResult(request=i, prompt_tokens=len(prompt), context_tokens=context_len)
            results.append(result)
            problem = self._check_prompt(prompt, context_len, max_new_tokens,
                                         allow_empty=restored is not None)
            if problem is None and not self.cache.fits_at_all(context_len + len(prompt) + max_new_tokens):
                problem = (f"request needs {context_len + len(prompt) + max_new_tokens} tokens of cache, "
                           "more than the whole cache budget holds")
            if problem:
                result.finish_reason, result.error = "error", problem
                continue
            generator = torch.Generator().manual_seed(seed + i)
            waiting.append(_Request(result, prompt, max_new_tokens, generator))

        if restored is None and len(waiting) >= 2:
            restored = self._shared_prefix(waiting)
            context_len = restored["tokens"] if restored else 0

        running: list[_Request] = []
        self.last_run = {"steps": 0, "peak_running": 0}
        # Requests continuing a context share its full pages; each copies the window and tails.
        prefix = self.cache.add_prefix(restored["layers"]) if restored and waiting else None
        try:
            yield from self._schedule(waiting, running, prefix, restored, context_len, temperature, top_p,
                                      stop, start_time)
        finally:
            for req in running:
                self.cache.free(req.seq_id)
            if prefix is not None:
                self.cache.drop_prefix(prefix)
        yield results

    def _shared_prefix(self, waiting) -> dict | None:
        """When every waiting prompt starts with the same `share_prefix_min`+ tokens, process them
        once; the requests then continue from it, sharing its full pages. Keeps each request at
        least one token of its own (unless its prompt is the prefix: it samples from the prefix's
        logits)."""
        prompts = [req.prompt for req in waiting]
        common = 0
        shortest = min(len(p) for p in prompts)
        while common < shortest and all(p[common] == prompts[0][common] for p in prompts):
            common += 1
        if common < self.share_prefix_min:
            return None
        try:
            shared = self._process(prompts[0][:common])
        except CacheFullError:
            return None  # not enough room to hold it on the side: serve the requests unshared
        for req in waiting:
            req.prompt = req.prompt[common:]
            req.result.shared_prefix_tokens = common
        return shared

    def _schedule(self, waiting, running, prefix, restored, context_len, temperature, top_p, stop,
                  start_time):
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
            if not running:  # cannot happen: fits_at_all was checked and nothing holds pages
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
                    if req.fed < len(req.prompt):
                        continue  # more prompt to feed: no token yet
            samples = [(r, r.logits) for r in ready]
            samples += [(r, logits[i]) for i, r in enumerate(work) if r.fed == len(r.prompt)]
            for req, row in samples:
                req.logits = None
                token = _sample(row, temperature, top_p, req.generator)
                res = req.result
                res.tokens.append(token)
                now = time.perf_counter() - start_time
                if len(res.tokens) == 1:
                    res.time_to_first_token = now
                yield res.request, token
                if token in stop or len(res.tokens) >= req.max_new_tokens:
                    res.finish_reason = "stop" if token in stop else "length"
                    res.cache_bytes = self.cache.nbytes_by_type(req.seq_id)
                    res.total_time = now
                    self.cache.free(req.seq_id)
                    running.remove(req)

    def _check_prompt(self, prompt: list, context_len: int, max_new_tokens: int,
                      allow_empty: bool = False) -> str | None:
        if not prompt and not allow_empty:
            return "empty prompt: give at least one token (or a context file)"
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            return f"token id {bad[0]!r} is outside the vocabulary [0, {self.cfg.vocab_size})"
        total = context_len + len(prompt) + max_new_tokens
        if total > self.max_seq_len:
            return (f"request of {total} tokens (context {context_len} + prompt {len(prompt)} + "
                    f"{max_new_tokens} new) exceeds max_seq_len={self.max_seq_len}")
        return None

    # Context files --------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        dtype = str(next(self.model.parameters()).dtype)
        return hashlib.sha256((self.cfg.fingerprint() + dtype).encode()).hexdigest()

    def _load_context(self, path) -> dict:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ContextFileError(f"cannot read context file {path}: {err}") from None
        if not data.startswith(CONTEXT_MAGIC) or len(data) < len(CONTEXT_MAGIC) + 8:
            raise ContextFileError(f"{path} is not a hybrid-attention context file")
        (head_len,) = struct.unpack("<Q", data[len(CONTEXT_MAGIC):len(CONTEXT_MAGIC) + 8])
        body = data[len(CONTEXT_MAGIC) + 8:]
        try:
            header = json.loads(body[:head_len])
        except (ValueError, UnicodeDecodeError):
            raise ContextFileError(f"{path}: the header is corrupted") from None
        version = header.get("format_version")
        if not isinstance(version, int) or version > CONTEXT_FORMAT_VERSION:
            raise ContextFileError(f"{path} has format version {version!r}; this library reads up to "
                                   f"{CONTEXT_FORMAT_VERSION} (upgrade hybrid-attention)")
        if header.get("model") != self._fingerprint():
            raise ContextFileError(f"{path} was written for another model configuration or dtype")
        payload = body[head_len:]
        if len(payload) != header.get("payload_bytes"):
            raise ContextFileError(f"{path} is truncated: {len(payload)} of {header.get('payload_bytes')} "
                                   "payload bytes")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise ContextFileError(f"{path} is corrupted: the checksum does not match")
        restored = torch.load(io.BytesIO(payload), weights_only=True)
        if restored["tokens"] + 1 > self.max_seq_len:
            raise ContextFileError(f"{path} holds {restored['tokens']} tokens, "
                                   f"max_seq_len is {self.max_seq_len}")
        return restored


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _defaults(kwargs: dict) -> dict:
    allowed = {"max_new_tokens", "temperature", "top_p", "seed", "stop_tokens", "context"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; expected some of {sorted(allowed)}")
    return kwargs

"""A prepared GPU session: Triton kernels against their references, then speed, memory and training.

At DeepSeek-V4-Flash attention shapes, in one command, written to one markdown report (and printed):

    bash benchmarks/gpu_session.sh                              # all five parts, about 8 min (H100 / H200)
    bash benchmarks/gpu_session.sh --parts kernels              # the correctness checks alone
    bash benchmarks/gpu_session.sh --budget million=240         # give one part more time
    bash benchmarks/gpu_session.sh --cpu-smoke --out /tmp/x.md  # the same code path on a CPU, toy shapes

The five parts, each under its own time budget (`--budget PART=SECONDS`):
  kernels  every Triton kernel against its torch reference (ops/*/reference.py), at V4-Flash shapes:
           sparse_attention (forward, backward, FP8 KV), indexer_topk (prefill, decode with the entries
           split and merged), compress (CSA with overlap, HCA), within bounds after the tests' (TOLERANCES)
  layers   prefill and decode of one CSA and one HCA layer against dense SDPA (flash backend where it
           takes head_dim 512) at 32K and 128K tokens: `bench_kernels_gpu.py`'s layers, timing and
           useful-work counts
  million  a 1M-token CSA layer: decode steps of --decode-batch sequences that each hold 1M tokens
           (FP8 KV, FP4 indexer keys) and one prefill; time, peak memory, TFLOP/s and GB/s against the
           peaks measured at start-up
  train    forward + backward of one CSA, HCA and window layer and of dense SDPA at 32K and 64K
           tokens: `bench_train.py`'s steps, on the GPU under bf16 autocast
  context  a context-parallel prefill of the "small" model over 2 processes (`cp_check.py` under
           torchrun) against one process on the same device: NCCL with a GPU per rank where the
           machine has 2 GPUs; on one GPU both ranks share it and exchange through gloo (host memory)

A row that fails (out of memory, a compile error) shows the error's first line and the part goes on;
a part that runs past its budget is stopped at its next return to Python (a GPU call in flight
finishes first) and the rows it did not reach are marked skipped. The report is rewritten after every
part, so a session that is killed keeps what it finished. Exit status: 0 when every kernel check
passed, 1 when one failed or could not run, 2 for a usage error or no CUDA device.

--cpu-smoke runs every part at toy shapes on the CPU: the kernels under Triton's interpreter
(TRITON_INTERPRET=1, set here when the variable is unset), the timing parts on the torch backends.
Its numbers say nothing about speed; it checks that the session will run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_kernels_gpu import (  # benchmarks/ is on sys.path when a script runs
    FP4_KEY_BYTES,
    FP8_ROW_BYTES,
    TOY,
    V4_FLASH,
    DecodeCache,
    Layer,
    Shapes,
    Timer,
    bytes_moved,
    compressed_lists,
    decode,
    measure_peaks,
    prefill,
    run_dense,
    useful_flops,
    window_lists,
)
from bench_train import DENSE, TRAIN_KINDS, dense_step, layer_step

from hybrid_attention import HybridAttention
from hybrid_attention.demo import KINDS, PeakMemory, demo_config
from hybrid_attention.ops import FP8KV, FP4Keys, compress, indexer_topk, sparse_attention
from hybrid_attention.ops.dispatch import interpreting, triton_available
from hybrid_attention.ops.joint_attention import joint_attention
from hybrid_attention.quant import fake_quant_fp4

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
PARTS = ("kernels", "layers", "million", "train", "context")
# Seconds per part on the GPU: 440 of the session's 480, the rest for start-up (CUDA, the peaks) and
# a row that overruns in a GPU call. The kernel checks compile most of the Triton kernels.
GPU_BUDGETS = {"kernels": 110.0, "layers": 125.0, "million": 100.0, "train": 70.0, "context": 35.0}
SMOKE_BUDGETS = {part: 60.0 for part in PARTS}

# Bounds of the kernel checks, after the tests' (tests/conftest.py, tests/test_ops_*.py): errors are
# measured against the reference's RMS, so they do not depend on scale. The relative RMSE must stay
# within the tests' tolerance (bf16 2e-2, fp32 1e-5), and every element within RTOL of its own value
# plus ATOL of the RMS. The tests bound the largest error by 5x the bf16 tolerance and by 1e-5 in
# fp32 against the RMS alone; at these sizes (10^7 elements, heavy-tailed softmax weights) the
# largest elements alone can differ by a rounding that exceeds that (1 bf16 ulp is 2^-8..2^-7 of the
# value), so the elementwise bound scales with the value. A wrong row still misses it by far.
TOLERANCES = {torch.bfloat16: dict(rmse=2e-2, rtol=2.0**-6, atol=0.1),
              torch.float32: dict(rmse=1e-5, rtol=1e-4, atol=1e-4)}
# Two correct bf16 evaluations of an indexer score round each head term (relu(q . k) and its
# weighted value) and the sum; they differ by at most a few 2^-8 of the sum of the terms'
# magnitudes. Picks that differ within this share of it are near-ties resolved differently.
PICK_ROUNDING = 2.0**-5


@dataclass(frozen=True)
class Sizes:
    """Token counts and batch sizes of one session: the GPU's, or toy ones for --cpu-smoke."""

    check_queries: int  # sparse_attention prefill checks: queries 0 .. n-1 of a prefill
    check_context: int  # indexer prefill check: a prefill this long; compress checks: tokens pooled
    index_queries: int  # indexer prefill check: the last queries of that prefill
    decode_context: int  # decode checks: tokens of context per sequence
    decode_check_batch: int
    layer_lengths: tuple[int, ...]  # part "layers": prefill lengths and decode contexts
    million: int  # part "million"
    context_preset: str  # part "context": the model and prompt of the 2-process prefill
    context_length: int
    train_lengths: tuple[int, ...]
    decode_batch: int  # parts "layers" and "million": sequences decoded together
    chunk: int  # prefill queries per chunk (bench_kernels_gpu.prefill)
    train_preset: str
    train_rounds: int


GPU_SIZES = Sizes(check_queries=2048, check_context=32768, index_queries=1024, decode_context=131072,
                  decode_check_batch=4, layer_lengths=(32768, 131072), million=1 << 20,
                  context_preset="small", context_length=65536,
                  train_lengths=(32768, 65536), decode_batch=16, chunk=65536, train_preset="v4-flash",
                  train_rounds=1)
SMOKE_SIZES = Sizes(check_queries=32, check_context=128, index_queries=16, decode_context=256,
                    decode_check_batch=2, layer_lengths=(128, 256), million=512, train_lengths=(64, 128),
                    context_preset="tiny", context_length=300,
                    decode_batch=2, chunk=64, train_preset="tiny", train_rounds=1)


class BudgetExceeded(Exception):
    """Raised inside a row that is still running when its part's budget ends."""


class PartClock:
    """A part's time budget. Rows ask `spent()` before they start; when the budget ends while a row
    runs, SIGALRM raises BudgetExceeded in it (at its next return to Python). Outside the main
    thread, where signals cannot be used, only the check before each row applies."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.in_row = False
        self.expired = False  # the alarm went off
        self._previous = None

    def __enter__(self) -> PartClock:
        self.start = time.perf_counter()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.budget_s)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._previous = None

    def _alarm(self, signum, frame) -> None:
        self.expired = True
        if self.in_row:  # between rows the next `spent()` stops the part
            raise BudgetExceeded

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.budget_s


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the report."""
    print(message, file=sys.stderr, flush=True)


def first_line(err: BaseException, limit: int = 200) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def release_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back, after what a failed row left behind is
    collected. Only on CUDA: on a CPU freed tensors go back by themselves, and a collection costs
    about 0.1 s with torch and triton loaded."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def attempt(session: Session, clock: PartClock, what: str, fn: Callable[[], object]):
    """(fn(), None), or (None, why there is no result): the part's budget is spent, or fn raised
    (the first line of its error). Broad on purpose: an OOM or a compile error in one row is
    reported in the table and the session goes on."""
    if clock.spent():
        return None, f"skipped: the part's {clock.budget_s:g} s budget is spent"
    began = time.perf_counter()
    value, reason = None, None
    clock.in_row = True
    try:
        value = fn()
    except Exception as err:  # broad: see the docstring
        # Code that catches and wraps errors (Triton's interpreter, autograd) can hand the
        # BudgetExceeded back as another exception: the alarm says which it was.
        if isinstance(err, BudgetExceeded) or clock.expired:
            reason = f"stopped: the part's {clock.budget_s:g} s budget ran out"
        else:
            reason = f"failed: {first_line(err)}"
    finally:
        clock.in_row = False
    if reason is not None:
        value = None
        release_memory(session.device)
    log(f"  {what}: {reason or 'done'} ({time.perf_counter() - began:.1f} s)")
    return value, reason


@dataclass
class CheckOutcome:
    op: str
    case: str
    status: str  # "pass", "FAIL", or why it did not run


@dataclass
class Session:
    args: argparse.Namespace
    sizes: Sizes
    shapes: Shapes
    device: torch.device
    timer: Timer
    peaks: tuple[float, float] = (math.nan, math.nan)  # bf16 matmul TFLOP/s, copy GB/s
    checks: list[CheckOutcome] = field(default_factory=list)
    part_times: dict[str, str] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def run_measured(session: Session, fn: Callable[[], object], memory: bool = True) -> tuple[float, int | None]:
    """(seconds, peak bytes or None) of one call of fn. CUDA: the allocator's peak over the call,
    everything allocated included (inputs, weights); CPU: the growth of the resident set
    (`PeakMemory`, which first collects garbage: `memory=False` skips it for timed repeats)."""
    if not memory:
        session.sync()
        start = time.perf_counter()
        fn()
        session.sync()
        return time.perf_counter() - start, None
    if session.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated()
    with PeakMemory() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, rss.peak


@dataclass
class TensorCheck:
    """One output or gradient of a kernel against the reference's."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the precision whose bounds apply
    max_abs: float
    max_rel: float  # largest error / RMS of the reference
    rel_rmse: float
    worst: float  # largest error / its allowance (RTOL |ref| + ATOL RMS): at most 1
    passed: bool

    def bound(self) -> str:
        tol = TOLERANCES[self.dtype]
        return f"rel RMSE <= {tol['rmse']:g}; err <= {tol['rtol']:.3g} |ref| + {tol['atol']:g} RMS"


def compare_tensors(name: str, ref: torch.Tensor, out: torch.Tensor, precision: torch.dtype) -> TensorCheck:
    """Errors of `out` relative to the reference's RMS, bounded per `precision` (TOLERANCES): the
    inputs' dtype for sparse attention, the tensor's own for the compressor, as in the tests."""
    if ref.shape != out.shape:
        raise ValueError(f"{name}: the kernel returned shape {tuple(out.shape)}, the reference "
                         f"{tuple(ref.shape)}")
    tol = TOLERANCES[precision]
    ref64, out64 = ref.detach().double(), out.detach().double()
    diff = (out64 - ref64).abs()
    rms = ref64.square().mean().sqrt().clamp_min(1e-30)
    if not diff.numel():
        return TensorCheck(name, tuple(ref.shape), precision, 0.0, 0.0, 0.0, 0.0, True)
    max_abs = float(diff.max())
    rel_rmse = float(diff.square().mean().sqrt() / rms)
    worst = float((diff / (tol["rtol"] * ref64.abs() + tol["atol"] * rms)).max())
    passed = bool(torch.isfinite(out64).all()) and rel_rmse <= tol["rmse"] and worst <= 1.0
    return TensorCheck(name, tuple(ref.shape), precision, max_abs, max_abs / float(rms), rel_rmse, worst,
                       passed)


@dataclass
class PickCheck:
    """indexer_topk's ids against the reference's, query by query."""

    shape: tuple[int, ...]  # [b, s, k]
    queries: int
    identical: int  # queries whose lists are equal
    kth_ties: int  # queries whose k-th and (k+1)-th best scores are equal: the tie rule decides
    near_ties: int  # queries that differ only in picks whose scores agree within the rounding
    wrong: int
    exact: bool  # exact scores: every list must be identical
    passed: bool


def scores_float64(q, weights, keys, visible, chunk: int = 64):
    """The indexer scores I[t, i] = sum_h w[t, h] relu(q[t, h] . K[i]) (SPEC 6) of the same inputs in
    float64, -inf where entry i is hidden from query t, and the sum of the head terms' magnitudes:
    both [b, s, t]. `chunk` queries at a time bound the [b, chunk, hi, t] per-head products."""
    keys64 = keys.dequantize(torch.float64) if isinstance(keys, FP4Keys) else keys.double()  # [b, t, di]
    b, s = q.shape[:2]
    n_keys = keys64.size(1)
    scores = torch.empty(b, s, n_keys, dtype=torch.float64, device=q.device)
    magnitude = torch.empty_like(scores)
    for a in range(0, s, chunk):
        dots = torch.einsum("bchd,btd->bcht", q[:, a:a + chunk].double(), keys64).clamp_min_(0)
        terms = dots * weights[:, a:a + chunk].double()[..., None]  # [b, c, hi, t]
        scores[:, a:a + chunk] = terms.sum(2)
        magnitude[:, a:a + chunk] = terms.abs().sum(2)
    hidden = torch.arange(n_keys, device=q.device) >= visible.expand(b, s)[..., None]
    return scores.masked_fill_(hidden, float("-inf")), magnitude


def compare_picks(q, weights, keys, visible, ref: torch.Tensor, out: torch.Tensor, exact: bool) -> PickCheck:
    """Count the kernel's lists that equal the reference's, the queries where ties decide (k-th
    score = (k+1)-th), and, among the others, those whose differing picks all score within
    PICK_ROUNDING of each other in float64 (near-ties that the two roundings resolve differently).
    With exact scores (`exact`) a difference is always wrong: the lower id wins ties."""
    if ref.shape != out.shape:
        raise ValueError(f"the kernel returned ids of shape {tuple(out.shape)}, the reference "
                         f"{tuple(ref.shape)}")
    b, s, k = ref.shape
    scores, magnitude = scores_float64(q, weights, keys, visible)
    kth_ties = 0
    if k and scores.size(-1) > k:
        top = scores.topk(k + 1, dim=-1).values  # [b, s, k + 1]
        kth_ties = int((torch.isfinite(top[..., k]) & (top[..., k - 1] == top[..., k])).sum())
    same = (ref == out).all(dim=-1)  # [b, s]
    where = (~same).nonzero().cpu()
    near, wrong = 0, 0
    if len(where):
        rows_ref = ref[where[:, 0], where[:, 1]].cpu().tolist()
        rows_out = out[where[:, 0], where[:, 1]].cpu().tolist()
        rows_score = scores[where[:, 0], where[:, 1]].cpu()
        rows_mag = magnitude[where[:, 0], where[:, 1]].cpu()
        for r, o, score, mag in zip(rows_ref, rows_out, rows_score, rows_mag, strict=True):
            r_set, o_set = {i for i in r if i >= 0}, {i for i in o if i >= 0}
            swapped = sorted(r_set ^ o_set)
            # Exact scores leave nothing to rounding; a list of another length, a repeated id or the
            # same set in another order breaks the op's contract (ascending ids, each once).
            if exact or not swapped or len(r_set) != len(o_set) or len(o_set) != sum(i >= 0 for i in o):
                wrong += 1
                continue
            values = score[swapped]
            if not bool(torch.isfinite(values).all()):  # a hidden entry was picked
                wrong += 1
            elif float(values.max() - values.min()) <= PICK_ROUNDING * float(mag[swapped].max()):
                near += 1
            else:
                wrong += 1
    identical = int(same.sum())
    return PickCheck((b, s, k), b * s, identical, kth_ties, near, wrong, exact, wrong == 0)


def _random_picks(positions: torch.Tensor, ratio: int, n_entries: int, k: int) -> torch.Tensor:
    """k distinct random entries among those each query sees ((t + 1) // ratio), -1 where it sees
    fewer: [n, k]. Stands in for the indexer's picks in the attention checks."""
    visible = (positions + 1) // ratio
    entry = torch.arange(n_entries, device=positions.device)
    rank = torch.rand(len(positions), n_entries, device=positions.device)
    rank = rank.masked_fill(entry >= visible[:, None], -1.0)
    value, ids = rank.topk(min(k, n_entries), dim=-1)
    return torch.where(value >= 0, ids, -1)


def _sparse_run(backend: str, q, kv, sink, indices, scale: float, grad: torch.Tensor) -> dict:
    """Output and the gradients of <out, grad> with respect to q, kv and sink."""
    leaves = [t.detach().requires_grad_() for t in (q, kv, sink)]
    out = sparse_attention(*leaves, indices, scale, backend=backend)
    (out.float() * grad).sum().backward()
    return dict(out=out.detach(), dq=leaves[0].grad, dkv=leaves[1].grad, dsink=leaves[2].grad)


def check_sparse_prefill(session: Session, kind: str) -> list[TensorCheck]:
    """A prefill's lists (SPEC 4): window rows, then CSA's top-k (random distinct visible entries,
    -1 where fewer are visible) or every visible HCA entry; bf16, forward and every gradient."""
    sh, n, dev = session.shapes, session.sizes.check_queries, session.device
    ratio = sh.ratio(kind)
    n_entries = n // ratio
    positions = torch.arange(n, device=dev)
    q = torch.randn(1, n, sh.heads, sh.head_dim, device=dev).bfloat16()
    kv = torch.randn(1, n + n_entries, sh.head_dim, device=dev).bfloat16()  # rows: tokens, then entries
    sink = torch.randn(sh.heads, device=dev)
    if kind == "csa":
        picks = _random_picks(positions, ratio, n_entries, sh.topk)
        compressed = torch.where(picks >= 0, picks + n, -1)
    else:
        compressed = compressed_lists(positions, ratio, n)
    indices = torch.cat((window_lists(positions, sh.window), compressed), dim=-1).to(torch.int32)[None]
    grad = torch.randn(q.shape, device=dev)
    scale = sh.head_dim ** -0.5
    ref = _sparse_run("torch", q, kv, sink, indices, scale, grad)
    out = _sparse_run("triton", q, kv, sink, indices, scale, grad)
    return [compare_tensors(name, ref[name], out[name], torch.bfloat16) for name in ref]


def check_sparse_decode_fp8(session: Session) -> list[TensorCheck]:
    """Decode over an FP8 cache (FP8 values + bf16 rope dims, SPEC 12): each sequence's window ring,
    then top-k compressed rows; one sequence with a quarter of its picks -1."""
    sh, dev = session.shapes, session.device
    b, n_entries = session.sizes.decode_check_batch, session.sizes.decode_context // session.shapes.csa_ratio
    kv = FP8KV.quantize(torch.randn(b, sh.window + n_entries, sh.head_dim, device=dev).bfloat16(),
                        sh.rope_dim)
    q = torch.randn(b, 1, sh.heads, sh.head_dim, device=dev).bfloat16()
    sink = torch.randn(sh.heads, device=dev)
    k = min(sh.topk, n_entries)
    picks = torch.rand(b, n_entries, device=dev).topk(k, dim=-1).indices + sh.window  # [b, k]
    picks[0, k - k // 4:] = -1
    window = torch.arange(sh.window, device=dev).expand(b, -1)
    indices = torch.cat((window, picks), dim=-1)[:, None].to(torch.int32)  # [b, 1, win + k]
    scale = sh.head_dim ** -0.5
    ref = sparse_attention(q, kv, sink, indices, scale, backend="torch")
    out = sparse_attention(q, kv, sink, indices, scale, backend="triton")
    return [compare_tensors("out", ref, out, torch.bfloat16)]


def indexer_inputs(session: Session, b: int, s: int, n_keys: int, exact: bool):
    """q [b, s, hi, di] and keys [b, t, di] on the FP4 grid (as the official precision mode has them),
    bf16. exact: weights in steps of 1/8 and every third key a repeat, so every score is exact in
    fp32 whatever the summation order and ties are exact (tests/test_ops_indexer_topk.py); else
    random bf16 weights."""
    sh, dev = session.shapes, session.device
    q = fake_quant_fp4(torch.randn(b, s, sh.index_heads, sh.index_dim, device=dev)).bfloat16()
    keys = fake_quant_fp4(torch.randn(b, n_keys, sh.index_dim, device=dev))
    if exact:
        keys[:, 1::3] = keys[:, 0::3][:, : keys[:, 1::3].size(1)]
        weights = torch.randint(-8, 9, (b, s, sh.index_heads), device=dev) / 8
    else:
        weights = torch.randn(b, s, sh.index_heads, device=dev)
    return q, weights.bfloat16(), keys.bfloat16()


def check_indexer_prefill(session: Session, exact: bool) -> list[PickCheck]:
    """The last queries of a causal prefill, each seeing (t + 1) // 4 entries; exact scores with
    bf16 keys, or FP4Keys storage with random weights."""
    sh, sizes, dev = session.shapes, session.sizes, session.device
    context, n_q = sizes.check_context, sizes.index_queries
    positions = torch.arange(context - n_q, context, device=dev)
    n_keys = context // sh.csa_ratio
    visible = (positions + 1) // sh.csa_ratio  # [s]
    q, weights, keys = indexer_inputs(session, 1, n_q, n_keys, exact)
    stored = keys if exact else FP4Keys.quantize(keys.float())
    k = min(sh.topk, n_keys)
    ref = indexer_topk(q, weights, stored, k, visible, backend="torch")
    out = indexer_topk(q, weights, stored, k, visible, backend="triton")
    return [compare_picks(q, weights, stored, visible, ref, out, exact)]


def check_indexer_decode(session: Session) -> list[PickCheck]:
    """One query per sequence over every FP4 key of a long context: the kernel splits the entries
    over programs and a second kernel merges the splits; exact scores."""
    from hybrid_attention.ops.indexer_topk.triton import indexer_topk_triton

    sh, sizes, dev = session.shapes, session.sizes, session.device
    b, n_keys = sizes.decode_check_batch, sizes.decode_context // sh.csa_ratio
    q, weights, keys = indexer_inputs(session, b, 1, n_keys, exact=True)
    stored = FP4Keys.quantize(keys.float())
    k = min(sh.topk, n_keys)
    visible = torch.full((b, 1), n_keys, dtype=torch.int32, device=dev)
    ref = indexer_topk(q, weights, stored, k, backend="torch")
    # On a GPU the launcher picks the splits from the number of SMs; under the interpreter it would
    # take one, so three are asked for to run the merge kernel too.
    out = indexer_topk_triton(q, weights, stored, k, visible, splits=None if session.cuda else 3)
    return [compare_picks(q, weights, stored, visible, ref, out, exact=True)]


def _compress_run(backend: str, kv, score, ape, ratio, overlap, previous, grad) -> dict:
    leaves = [t.detach().requires_grad_() for t in (kv, score, ape)]
    out = compress(*leaves, ratio, overlap, previous, backend=backend)
    (out * grad).sum().backward()
    return dict(entries=out.detach(), dkv=leaves[0].grad, dscore=leaves[1].grad, dape=leaves[2].grad)


def check_compress(session: Session, kind: str) -> list[TensorCheck]:
    """The main compressor's pooling of bf16 projections (fp32 entries); CSA continues a stream
    from a `previous` block. Forward and every gradient."""
    sh, tokens, dev = session.shapes, session.sizes.check_context, session.device
    ratio, overlap = sh.ratio(kind), kind == "csa"
    width = (2 if overlap else 1) * sh.head_dim
    kv = torch.randn(1, tokens, width, device=dev).bfloat16()  # [b, s, c*d]
    score = (2 * torch.randn(1, tokens, width, device=dev)).bfloat16()
    ape = torch.randn(ratio, width, device=dev)
    previous = (torch.randn(1, ratio, width, device=dev), torch.randn(1, ratio, width, device=dev)) \
        if overlap else None
    grad = torch.randn(1, tokens // ratio, sh.head_dim, device=dev)
    ref = _compress_run("torch", kv, score, ape, ratio, overlap, previous, grad)
    out = _compress_run("triton", kv, score, ape, ratio, overlap, previous, grad)
    return [compare_tensors(name, ref[name], out[name], ref[name].dtype) for name in ref]


def _joint_run(backend: str, q, kv, sink, compressed, ratio, picks, scale, window, grad) -> dict:
    """Output, teacher and the gradients of <out, grad> with respect to q, kv, compressed and sink."""
    leaves = [t.detach().requires_grad_() for t in (q, kv, compressed, sink)]
    out, teacher = joint_attention(leaves[0], leaves[1], leaves[3], scale, window, 0, leaves[2], ratio, picks,
                                   want_teacher=True, backend=backend)
    (out * grad).sum().backward()
    return dict(out=out.detach(), teacher=teacher, dq=leaves[0].grad, dkv=leaves[1].grad,
                dcompressed=leaves[2].grad, dsink=leaves[3].grad)


def check_joint_attention(session: Session, kind: str) -> list[TensorCheck]:
    """The training path's op: window rows + compressed entries (CSA: random distinct visible picks,
    -1 where fewer are visible; HCA: every visible entry) + sink, bf16 inputs, with the indexer
    loss's teacher; forward and every gradient against the torch backend."""
    sh, n, dev = session.shapes, session.sizes.check_queries, session.device
    ratio = sh.ratio(kind)
    n_entries = n // ratio
    q = torch.randn(1, n, sh.heads, sh.head_dim, device=dev).bfloat16()
    kv = torch.randn(1, n, sh.head_dim, device=dev).bfloat16()
    compressed = torch.randn(1, n_entries, sh.head_dim, device=dev).bfloat16()
    sink = torch.randn(sh.heads, device=dev)
    picks = None
    if kind == "csa":
        picks = _random_picks(torch.arange(n, device=dev), ratio, n_entries, sh.topk)[None]
    grad = torch.randn(q.shape, device=dev)
    scale = sh.head_dim ** -0.5
    ref = _joint_run("torch", q, kv, sink, compressed, ratio, picks, scale, sh.window, grad)
    out = _joint_run("triton", q, kv, sink, compressed, ratio, picks, scale, sh.window, grad)
    return [compare_tensors(name, ref[name], out[name], torch.bfloat16) for name in ref]


def kernel_checks(sh: Shapes, sizes: Sizes) -> list[tuple[str, str, Callable[[Session], list]]]:
    """(op, case, check) for every Triton kernel: sparse attention forward (plain and FP8 rows) and
    backward, the indexer's top-k kernel and its split merge, the compressor forward and backward, the
    training path's joint attention (over the sparse-attention kernels) forward and backward."""
    k = f"top-{sh.topk}"
    return [
        ("sparse_attention", f"CSA prefill lists (window {sh.window} + {k}), bf16, fwd + bwd",
         lambda s: check_sparse_prefill(s, "csa")),
        ("sparse_attention", f"HCA prefill lists (window + every entry, r{sh.hca_ratio}), bf16, fwd + bwd",
         lambda s: check_sparse_prefill(s, "hca")),
        ("sparse_attention", f"decode over an FP8 KV cache ({sizes.decode_context} tokens), bf16, fwd",
         check_sparse_decode_fp8),
        ("indexer_topk", f"prefill, exact scores and exact ties, {k}",
         lambda s: check_indexer_prefill(s, True)),
        ("indexer_topk", f"prefill, FP4 keys, bf16 weights, {k}", lambda s: check_indexer_prefill(s, False)),
        ("indexer_topk", f"decode, FP4 keys ({sizes.decode_context} tokens), entries split + merged",
         check_indexer_decode),
        ("compress", f"CSA: overlap, r{sh.csa_ratio}, continuing a stream, fwd + bwd",
         lambda s: check_compress(s, "csa")),
        ("compress", f"HCA: r{sh.hca_ratio}, fwd + bwd", lambda s: check_compress(s, "hca")),
        ("joint_attention", f"CSA training op (window + {k} + sink, teacher), bf16, fwd + bwd",
         lambda s: check_joint_attention(s, "csa")),
        ("joint_attention", f"HCA training op (window + every entry, r{sh.hca_ratio}), bf16, fwd + bwd",
         lambda s: check_joint_attention(s, "hca")),
    ]


def has_triton_backend(op: str) -> bool:
    """Whether ops/<op>/ holds a Triton file (triton.py or triton_*.py)."""
    spec = importlib.util.find_spec(f"hybrid_attention.ops.{op}")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    return folder is not None and any(folder.glob("triton*.py"))


def part_kernels(session: Session, clock: PartClock) -> list[str]:
    sh, sizes = session.shapes, session.sizes
    lines = ["## 1. Kernel checks: Triton against the torch reference", "",
             f"Each op with `backend=\"triton\"` against `backend=\"torch\"` (its `reference.py`) on the "
             f"same random inputs. Shapes: {sh.heads} heads x {sh.head_dim} (rope {sh.rope_dim}), window "
             f"{sh.window}, CSA r{sh.csa_ratio} {'top-' + str(sh.topk)}, indexer {sh.index_heads} x "
             f"{sh.index_dim}, HCA r{sh.hca_ratio}; {sizes.check_queries} prefill queries for the "
             f"attention, the last {sizes.index_queries} queries of a {sizes.check_context}-token "
             f"prefill for the indexer, {sizes.check_context} tokens for the compressor, "
             f"{sizes.decode_check_batch} sequences for decode. Errors are relative to the reference's "
             f"RMS; a check passes when the relative RMSE is within the tests' tolerance and every "
             f"element's error within its allowance (RTOL of its value + ATOL of the RMS: `worst err / "
             f"allowed` <= 1). Picks: a query counts as a near-tie "
             f"when the picks that differ all score within {PICK_ROUNDING:g} of the sum of their head "
             f"terms' magnitudes (float64 scores); with exact scores every list must be identical.", ""]
    skip_reason = None
    if not triton_available():
        skip_reason = "skipped: triton is not installed"
    elif not session.cuda and not interpreting():
        skip_reason = "skipped: TRITON_INTERPRET is not 1, so the kernels cannot run on the CPU"
    tensor_rows, pick_rows, by_op = [], [], {}
    for op, case, check in kernel_checks(sh, sizes):
        if skip_reason:
            results, reason = None, skip_reason
        else:
            torch.manual_seed(session.args.seed)
            results, reason = attempt(session, clock, f"{op}: {case}", lambda check=check: check(session))
        if reason is not None:
            status = reason
            tensor_rows.append([op, case, "-", "-", "-", "-", "-", "-", "-", reason])
        else:
            status = "pass" if all(r.passed for r in results) else "FAIL"
            for r in results:
                verdict = "pass" if r.passed else "FAIL"
                if isinstance(r, PickCheck):
                    pick_rows.append([op, case, "x".join(map(str, r.shape)),
                                      f"{r.identical} / {r.queries} ({100 * r.identical / r.queries:.1f}%)",
                                      str(r.kth_ties), str(r.near_ties), str(r.wrong),
                                      "identical" if r.exact else "identical or near-tie", verdict])
                else:
                    tensor_rows.append([op, case, r.name, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}",
                                        f"{r.max_rel:.3e}", f"{r.rel_rmse:.3e}", f"{r.worst:.3f}", r.bound(),
                                        verdict])
        session.checks.append(CheckOutcome(op, case, status))
        by_op.setdefault(op, []).append(status)
    summary = []
    for op in ("sparse_attention", "indexer_topk", "compress", "joint_attention", "indexer_loss"):
        statuses = by_op.get(op)
        if statuses:
            passed = sum(s == "pass" for s in statuses)
            result = "pass" if passed == len(statuses) else "FAIL"
            summary.append([op, f"{passed} / {len(statuses)} cases passed", result])
        elif has_triton_backend(op):
            why = "not checked: it has a Triton backend, and gpu_session.py has no check of it yet"
            summary.append([op, why, "FAIL"])
            session.checks.append(CheckOutcome(op, "its Triton backend", why))
        else:
            summary.append([op, "no Triton backend (torch only): nothing to compare", "-"])
    lines += markdown_table(["op", "cases", "result"], summary) + [""]
    lines += markdown_table(["op", "case", "tensor", "shape", "max abs err", "max err / RMS", "rel RMSE",
                             "worst err / allowed", "bound", "result"], tensor_rows) + [""]
    if pick_rows:
        lines += markdown_table(["op", "case", "ids [b x s x k]", "queries identical", "k-th score ties",
                                 "near-ties", "wrong", "required", "result"], pick_rows) + [""]
    return lines


LAYER_OPS = {"csa": ("compress", "indexer_topk", "sparse_attn", "layer"),
             "hca": ("compress", "sparse_attn", "layer")}


def _layer_inputs(session: Session, phase: str, kind: str, length: int):
    """(layer, step(op)) for one phase of one layer kind: a prefill of x [1, L, dim] in chunks, or a
    decode step of x [batch, 1, dim] over a cache of L tokens per sequence."""
    sh, dev = session.shapes, session.device
    layer = Layer(sh, kind, dev)
    if phase == "prefill":
        x = torch.randn(1, length, sh.dim, device=dev, dtype=torch.bfloat16)
        return layer, lambda op: prefill(layer, x, session.sizes.chunk, op)
    batch = session.sizes.decode_batch
    cache = DecodeCache(layer, batch, length, dev)
    x = torch.randn(batch, 1, sh.dim, device=dev, dtype=torch.bfloat16)
    return layer, lambda op: decode(layer, cache, x, op)


def _rates(session: Session, op: str, kind: str, length: int, layer: Layer, batch: int, ms: float):
    """TFLOP/s and GB/s cells (with their share of the measured peaks) from bench_kernels_gpu's
    useful_flops / bytes_moved."""
    tflops = useful_flops(op, kind, session.shapes, length, layer, batch) / ms / 1e9
    gbps = bytes_moved(op, kind, session.shapes, length, layer, batch) / ms / 1e6
    return [fmt(tflops, 1), fmt(100 * tflops / session.peaks[0], 1), fmt(gbps, 0),
            fmt(100 * gbps / session.peaks[1], 1)]


def part_layers(session: Session, clock: PartClock) -> list[str]:
    sh, sizes = session.shapes, session.sizes
    rows = []
    with torch.no_grad():
        for length in sizes.layer_lengths:
            for phase in ("prefill", "decode"):
                rows += _layers_at(session, clock, phase, length)
    lines = ["## 2. Prefill and decode against dense SDPA", "",
             f"`bench_kernels_gpu.py`'s layers (bf16, random weights): prefill of batch 1 in chunks of "
             f"{sizes.chunk} queries, decode of {sizes.decode_batch} sequences that each hold the whole "
             f"context (FP8 KV, FP4 indexer keys). `compress`, `indexer_topk` and `sparse_attn` time "
             f"one op alone, `layer` the whole layer (projections included). Dense: causal "
             f"`scaled_dot_product_attention` with the same {sh.heads} x {sh.head_dim} heads and one "
             f"shared KV head, its flash backend where that takes head_dim {sh.head_dim}, else the next "
             f"fused one (the note says which); speed-up = dense time / time. Time: median of "
             f"`do_bench` (one run after a warm-up for calls over a second). TFLOP/s and GB/s count "
             f"useful work (`useful_flops` / `bytes_moved`), with their share of the measured peaks.", ""]
    lines += markdown_table(["phase", "kind", "tokens", "op", "time ms", "TFLOP/s", "% peak", "GB/s",
                             "% peak", "speed-up vs dense", "note"], rows)
    return lines + [""]


def _layers_at(session: Session, clock: PartClock, phase: str, length: int) -> list[list]:
    """Rows of one phase at one length: dense SDPA, then each op of a CSA and an HCA layer."""
    sh, sizes = session.shapes, session.sizes
    batch = sizes.decode_batch if phase == "decode" else 0
    dense_args = SimpleNamespace(max_dense=max(sizes.layer_lengths), decode_batch=sizes.decode_batch)
    dense, reason = attempt(session, clock, f"{phase} dense SDPA at {length}",
                            lambda: run_dense(dense_args, sh, phase, length, session.device, session.timer))
    dense_ms, note = dense if dense is not None else (None, reason)
    if dense_ms:  # run_dense's note reads "<ms> ms with SDPA <backend>, <TFLOP/s> TFLOP/s": keep the backend
        note = note.split(" with ", 1)[-1].rsplit(", ", 1)[0]
        pairs = batch * length if batch else length * (length + 1) / 2
        tflops = 4 * sh.heads * sh.head_dim * pairs / dense_ms / 1e9
        rows = [[phase, "dense", length, "SDPA", fmt_ms(dense_ms), fmt(tflops, 1),
                 fmt(100 * tflops / session.peaks[0], 1), "-", "-", "1.00x", note]]
    else:
        rows = [[phase, "dense", length, "SDPA", "-", "-", "-", "-", "-", "-", note]]
    for kind in ("csa", "hca"):
        rows += _kind_rows(session, clock, phase, kind, length, dense_ms)
        release_memory(session.device)  # the layer and its inputs went with _kind_rows' frame
    return rows


def _kind_rows(session: Session, clock: PartClock, phase: str, kind: str, length: int,
               dense_ms: float | None) -> list[list]:
    """Rows of each op of one layer kind (LAYER_OPS), timed on one layer and one set of inputs."""
    batch = session.sizes.decode_batch if phase == "decode" else 0
    built, reason = attempt(session, clock, f"{phase} {kind} inputs at {length}",
                            lambda: _layer_inputs(session, phase, kind, length))
    if built is None:
        return [[phase, kind, length, op, "-", "-", "-", "-", "-", "-", reason] for op in LAYER_OPS[kind]]
    layer, step = built
    rows = []
    for op in LAYER_OPS[kind]:
        ms, why = attempt(session, clock, f"{phase} {kind} {op} at {length}",
                          lambda op=op: session.timer(lambda: step(op)))
        if ms is None:
            rows.append([phase, kind, length, op, "-", "-", "-", "-", "-", "-", why])
            continue
        versus = f"{dense_ms / ms:.2f}x" if dense_ms and op in ("sparse_attn", "layer") else "-"
        rates = _rates(session, op, kind, length, layer, batch, ms)
        rows.append([phase, kind, length, op, fmt_ms(ms), *rates, versus, ""])
    return rows


def part_million(session: Session, clock: PartClock) -> list[str]:
    sh, sizes, dev = session.shapes, session.sizes, session.device
    length, batch = sizes.million, sizes.decode_batch
    rows = []
    with torch.no_grad():
        layer, reason = attempt(session, clock, "CSA layer weights", lambda: Layer(sh, "csa", dev))
        if layer is None:
            rows.append(["prefill", "layer", length, "-", "-", "-", "-", "-", "-", reason])
            rows.append(["decode", "layer", length, "-", "-", "-", "-", "-", "-", reason])
        else:  # decode first: it is quick, and a prefill that overruns the budget cannot stop it
            decode_rows = _million_decode(session, clock, layer, length, batch)
            release_memory(dev)
            rows += _million_prefill(session, clock, layer, length) + decode_rows
    lines = ["## 3. One CSA layer at 1M tokens", "",
             f"One CSA layer (`bench_kernels_gpu.Layer`, bf16): decode steps of {batch} sequences that "
             f"each hold {length} tokens ({FP8_ROW_BYTES} B FP8 rows, {FP4_KEY_BYTES} B FP4 indexer keys; "
             f"run first), and a {length}-token prefill in chunks of {sizes.chunk} (one timed run, after "
             f"a warm-up prefill of one chunk that compiles the kernels). Peak memory: "
             + ("the CUDA allocator's peak over the call, inputs and weights included. "
                if session.cuda else "the growth of the resident set over the call. ")
             + "GB/s counts the bytes an ideal kernel must move (`bytes_moved`), against the "
             f"measured copy bandwidth ({fmt(session.peaks[1], 0)} GB/s); the decode target is the "
             "cache read (indexer + sparse attention) at >= 50% of it.", ""]
    lines += markdown_table(["phase", "op", "tokens", "time ms", "TFLOP/s", "% peak", "GB/s",
                             "% of measured GB/s", "peak memory GiB", "note"], rows)
    return lines + [""]


def _million_prefill(session: Session, clock: PartClock, layer: Layer, length: int) -> list[list]:
    sh, chunk = session.shapes, session.sizes.chunk
    x, reason = attempt(session, clock, f"prefill input [1, {length}, {sh.dim}]",
                        lambda: torch.randn(1, length, sh.dim, device=session.device, dtype=torch.bfloat16))
    if x is None:
        return [["prefill", "layer", length, "-", "-", "-", "-", "-", "-", reason]]
    _, reason = attempt(session, clock, f"warm-up prefill of {min(chunk, length)} tokens",
                        lambda: (prefill(layer, x[:, :chunk], chunk, "layer"), session.sync()))
    if reason is not None:
        return [["prefill", "layer", length, "-", "-", "-", "-", "-", "-", f"warm-up {reason}"]]
    measured, reason = attempt(session, clock, f"prefill of {length} tokens",
                               lambda: run_measured(session, lambda: prefill(layer, x, chunk, "layer")))
    if measured is None:
        return [["prefill", "layer", length, "-", "-", "-", "-", "-", "-", reason]]
    seconds, peak = measured
    ms = 1e3 * seconds
    return [["prefill", "layer", length, fmt_ms(ms), *_rates(session, "layer", "csa", length, layer, 0, ms),
             fmt_gib(peak), "one run"]]


def _million_decode(session: Session, clock: PartClock, layer: Layer, length: int, batch: int) -> list[list]:
    sh, dev = session.shapes, session.device
    cache, reason = attempt(session, clock, f"decode cache of {batch} x {length} tokens",
                            lambda: DecodeCache(layer, batch, length, dev))
    if cache is None:
        return [["decode", "layer", length, "-", "-", "-", "-", "-", "-", reason]]
    x = torch.randn(batch, 1, sh.dim, device=dev, dtype=torch.bfloat16)
    rows, times = [], {}
    for op in ("layer", "indexer_topk", "sparse_attn"):
        ms, reason = attempt(session, clock, f"decode {op} at {length}",
                             lambda op=op: session.timer(lambda: decode(layer, cache, x, op)))
        if ms is None:
            rows.append(["decode", op, length, "-", "-", "-", "-", "-", "-", reason])
            continue
        times[op] = ms
        peak, note = "-", f"batch {batch}"
        if op == "layer":
            measured, why = attempt(session, clock, "decode step memory",
                                    lambda: run_measured(session, lambda: decode(layer, cache, x, "layer")))
            peak = fmt_gib(measured[1]) if measured else "-"
            note = f"batch {batch}" + (f"; memory {why}" if why else "")
        rows.append(["decode", op, length, fmt_ms(ms), *_rates(session, op, "csa", length, layer, batch, ms),
                     peak, note])
    if "indexer_topk" in times and "sparse_attn" in times:
        ms = times["indexer_topk"] + times["sparse_attn"]
        moved = sum(bytes_moved(op, "csa", sh, length, layer, batch)
                    for op in ("indexer_topk", "sparse_attn"))
        gbps = moved / ms / 1e6
        rows.append(["decode", "cache read (indexer_topk + sparse_attn)", length, fmt_ms(ms), "-", "-",
                     fmt(gbps, 0), fmt(100 * gbps / session.peaks[1], 1), "-", "target >= 50%"])
    return rows


def part_train(session: Session, clock: PartClock) -> list[str]:
    sizes, dev = session.sizes, session.device
    cfg = demo_config(sizes.train_preset).replace(quant="none")
    layers, reason = attempt(session, clock, f"{sizes.train_preset} layers",
                             lambda: {kind: HybridAttention(cfg, KINDS.index(kind)).to(dev).train()
                                      for kind in TRAIN_KINDS})
    rows = []
    for length in sizes.train_lengths:
        dense = None  # (seconds, peak bytes) of the baseline at this length
        for name in (DENSE, *TRAIN_KINDS):
            if layers is None:
                rows.append([length, name, "-", "-", "-", "-", reason])
                continue
            measured, why = attempt(session, clock, f"train {name} at {length}",
                                    lambda name=name, length=length: _train_step(session, cfg, layers, name,
                                                                                 length))
            if measured is None:
                rows.append([length, name, "-", "-", "-", "-", why])
                continue
            seconds, peak = measured
            if name == DENSE:
                dense = measured
            time_ratio = f"{seconds / dense[0]:.3f}" if dense else "-"
            peak_ratio = f"{peak / dense[1]:.3f}" if dense and dense[1] and peak else "-"
            rows.append([length, name, f"{seconds:.3f}", time_ratio, fmt_gib(peak), peak_ratio, ""])
    lines = ["## 4. Training step: forward + backward", "",
             f"`bench_train.py`'s steps: one layer of each kind of the `{sizes.train_preset}` preset "
             f"({cfg.n_heads} heads x {cfg.head_dim}, dim {cfg.dim}, quant none), batch 1, train mode; the "
             f"loss is <y, g> plus the indexer's KL loss for CSA, and backward fills the gradients of x "
             f"and every parameter. Dense: causal SDPA forward + backward with {cfg.n_heads} query and "
             f"as many K / V heads (the attention core alone, so the ratios favour it). "
             + ("bf16 autocast, fp32 weights. " if session.cuda else "fp32. ")
             + f"Time: median of {sizes.train_rounds} step(s) after a warm-up step, which also measures "
             "the peak memory.", ""]
    lines += markdown_table(["tokens", "step", "time s", "/ dense", "peak memory GiB", "/ dense", "note"],
                            rows)
    return lines + [""]


def part_context(session: Session, clock: PartClock) -> list[str]:
    sizes = session.sizes
    gpus = torch.cuda.device_count() if session.cuda else 0
    ranks = 2
    report, reason = attempt(session, clock, f"context-parallel prefill over {ranks} processes",
                             lambda: _context_check(session, clock, ranks))
    setup = ("CPU, gloo" if not session.cuda else f"{ranks} GPUs, NCCL" if gpus >= ranks
             else "one GPU shared by both ranks, gloo (the exchange through host memory)")
    lines = ["## 5. Context-parallel prefill over 2 processes", "",
             f"`cp_check.py` under `torchrun --nproc-per-node {ranks}`: the `{sizes.context_preset}` model, "
             f"fp32, a {sizes.context_length}-token prompt split by `distributed.split_points`; {setup}. "
             "Each rank compares its chunk's logits (the last rank also every layer's state) with the whole "
             "prompt prefilled by one process on the same device. Peak: the CUDA allocator's (CPU: the "
             "resident set).", ""]
    if report is None:
        return lines + [f"Not run: {reason}", ""]
    rows = [[r["rank"], r["device"], str(r["tokens"]), f"{r['prefill_s']:.3f}", fmt_gib(r["peak_bytes"]),
             f"{r['logits_error']:.1e}", "-" if r["states_error"] is None else f"{r['states_error']:.1e}",
             "yes" if r["sent"] == report["formula_elements"]["sent"] else "NO"] for r in report["ranks"]]
    lines += markdown_table(["rank", "device", "tokens", "prefill s", "peak GiB", "logits max err / RMS",
                             "states max err / RMS", "bytes = formula"], rows)
    verdict = "within" if report["ok"] else "NOT within"
    return lines + ["", f"Backend {report['backend']}; {verdict} the tolerance {report['tolerance']:g}.", ""]


def _context_check(session: Session, clock: PartClock, ranks: int) -> dict:
    """Run cp_check.py under torchrun in its own process group (killed with it when the part's
    budget runs out) and return rank 0's report."""
    import json
    import tempfile

    sizes = session.sizes
    with tempfile.TemporaryDirectory(prefix="gpu_session_cp_") as folder:
        out = Path(folder) / "cp.json"
        device = "cuda" if session.cuda else "cpu"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(ranks), str(ROOT / "benchmarks" / "cp_check.py"), "--device", device,
                   "--preset", sizes.context_preset, "--length", str(sizes.context_length), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
        try:
            _, err = child.communicate(timeout=max(1.0, clock.budget_s - clock.elapsed()))
        except BaseException:  # the budget's alarm or the timeout: the whole torchrun group goes
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
        if not out.exists():
            raise RuntimeError(f"cp_check.py wrote no report (exit {child.returncode}): "
                               + (err.strip().splitlines() or ["no output"])[-1])
        return json.loads(out.read_text())


def _train_step(session: Session, cfg, layers: dict, name: str, length: int) -> tuple[float, int | None]:
    """(median seconds, peak bytes) of bench_train's step `name` (dense SDPA or a layer kind) at
    `length` tokens. A warm-up step first compiles and measures the memory. On the GPU the step runs
    under bf16 autocast with fp32 weights, as `hybrid-attention train --bf16`; on a CPU in fp32."""
    with session.device:  # the steps make their inputs on the default device
        step = dense_step(cfg.n_heads, cfg.head_dim, length) if name == DENSE \
            else layer_step(layers[name], length)

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if session.cuda else nullcontext():
            step()

    _, peak = run_measured(session, run)
    times = [run_measured(session, run, memory=False)[0] for _ in range(session.sizes.train_rounds)]
    return statistics.median(times), peak


def fmt(value: float, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def fmt_ms(ms: float) -> str:
    return f"{ms:.4g}" if ms < 1e4 else f"{ms:,.0f}"


def fmt_gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if head.returncode:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def header(session: Session, argv: list[str]) -> list[str]:
    sh = session.shapes
    if session.cuda:
        props = torch.cuda.get_device_properties(session.device)
        card = (f"{torch.cuda.get_device_name(session.device)} ({props.total_memory / GIB:.0f} GiB, "
                f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor})")
    else:
        card = "CPU (smoke run: toy shapes, Triton's interpreter; no GPU numbers)"
    triton_version = "not installed"
    if triton_available():
        import triton

        triton_version = triton.__version__
    cuda = f", CUDA {torch.version.cuda}" if session.cuda else ""
    title = "GPU session" + (" (CPU smoke run)" if not session.cuda else "")
    return [f"# {title}", "",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- card: {card}",
            f"- torch {torch.__version__}{cuda}, triton {triton_version}",
            f"- measured peaks: {fmt(session.peaks[0], 0)} TFLOP/s (bf16 matmul), {fmt(session.peaks[1], 0)} "
            f"GB/s (device copy, bytes read + written)",
            f"- shapes: {sh.heads} heads x {sh.head_dim} (rope {sh.rope_dim}), one KV head, window "
            f"{sh.window}, CSA r{sh.csa_ratio} top-{sh.topk} (indexer {sh.index_heads} x {sh.index_dim}), "
            f"HCA r{sh.hca_ratio}, dim {sh.dim}" + ("" if session.args.cpu_smoke else " (V4-Flash)"),
            f"- code: {git_revision()}",
            f"- arguments of gpu_session.py: `{' '.join(argv) or '(none)'}`", ""]


def summary(session: Session) -> list[str]:
    lines = ["## Summary", ""]
    if session.checks:
        passed = sum(c.status == "pass" for c in session.checks)
        lines.append(f"- kernel checks: {passed} of {len(session.checks)} passed")
        lines += [f"  - {c.op}, {c.case}: {c.status}" for c in session.checks if c.status != "pass"]
    else:
        lines.append("- kernel checks: not run")
    for part in PARTS:
        lines.append(f"- {part}: {session.part_times.get(part, 'not run (--parts)')}")
    return lines + [""]


def write_report(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def check_failed(session: Session) -> bool:
    """A check failed or could not run; a smoke run on a machine without triton is not a failure."""
    return any(c.status != "pass" and not c.status.startswith("skipped: triton is not installed")
               for c in session.checks)


def parse_budget(text: str) -> tuple[str, float]:
    part, sep, seconds = text.partition("=")
    if not sep or part not in PARTS:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART one of {', '.join(PARTS)}, "
                                         f"got {text!r}")
    try:
        value = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{part}: {seconds!r} is not a number of seconds") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{part}: the budget must be a positive number of seconds, "
                                         f"got {seconds}")
    return part, value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_session.md"), metavar="PATH",
                        help="the markdown report, rewritten after each part (default: gpu_session.md)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help=f"parts to run, always in the order {' '.join(PARTS)} (default: all)")
    parser.add_argument("--budget", type=parse_budget, action="append", default=[], metavar="PART=SECONDS",
                        help="a part's time budget; repeat for several (GPU defaults: "
                             + ", ".join(f"{p}={s:.0f}" for p, s in GPU_BUDGETS.items())
                             + f"; --cpu-smoke: {SMOKE_BUDGETS['kernels']:.0f} each)")
    parser.add_argument("--layer-lengths", type=int, nargs="+", metavar="TOKENS",
                        help="part layers: prefill lengths and decode contexts (default: 32768 131072)")
    parser.add_argument("--million", type=int, metavar="TOKENS",
                        help="part million: the length (default: 1048576)")
    parser.add_argument("--train-lengths", type=int, nargs="+", metavar="TOKENS",
                        help="part train: sequence lengths (default: 32768 65536)")
    parser.add_argument("--decode-batch", type=int, metavar="N",
                        help="parts layers and million: sequences decoded together (default: 16)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every part at toy shapes on the CPU (kernels under TRITON_INTERPRET=1) "
                             "to check the session; no GPU numbers")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
    overrides = {"layer_lengths": args.layer_lengths, "million": args.million,
                 "train_lengths": args.train_lengths, "decode_batch": args.decode_batch}
    for name, value in overrides.items():
        values = value if isinstance(value, list) else [value]
        if value is not None and min(values) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.sizes = dataclasses.replace(sizes, **{name: tuple(v) if isinstance(v, list) else v
                                               for name, v in overrides.items() if v is not None})
    args.budgets = {**(SMOKE_BUDGETS if args.cpu_smoke else GPU_BUDGETS), **dict(args.budget)}
    args.parts = [part for part in PARTS if part in args.parts]
    if not args.out.resolve().parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.resolve().parent} does not exist")
    return args


PART_RUNNERS = {"kernels": part_kernels, "layers": part_layers, "million": part_million, "train": part_train,
                "context": part_context}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cpu_smoke:
        # Before any kernel module is imported: the @triton.jit functions read it when defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_session.py needs a CUDA GPU (none is visible to torch); run `--cpu-smoke` to check the "
              "session on a CPU.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    session = Session(args, args.sizes, TOY if args.cpu_smoke else V4_FLASH, device, Timer(device))
    began = time.perf_counter()
    torch.manual_seed(args.seed)
    log("measuring the peaks (bf16 matmul, device copy)")
    try:
        session.peaks = measure_peaks(session.timer, device)
    except Exception as err:  # the session goes on without the percentages
        log(f"  the peaks could not be measured: {first_line(err)}")
    report = header(session, argv)
    sections = {}
    for part in args.parts:
        budget = args.budgets[part]
        log(f"[{part}] budget {budget:g} s")
        with PartClock(budget) as clock:
            try:
                sections[part] = PART_RUNNERS[part](session, clock)
            except Exception as err:  # a part that breaks is reported; the next one runs
                sections[part] = [f"## {part}", "", f"The part stopped: {first_line(err)}", ""]
                if part == "kernels":  # checks that never reported are not passes
                    session.checks.append(CheckOutcome("kernels", "the part", f"failed: {first_line(err)}"))
        session.part_times[part] = f"{clock.elapsed():.0f} s (budget {budget:g} s)"
        release_memory(device)
        write_report(args.out, report + [line for p in args.parts if p in sections for line in sections[p]])
    session.part_times["total"] = f"{time.perf_counter() - began:.0f} s"
    lines = report + [line for p in args.parts for line in sections[p]] + summary(session)
    lines.append(f"Total wall time: {session.part_times['total']}.")
    write_report(args.out, lines)
    print("\n".join(lines))
    log(f"report written to {args.out}")
    return 1 if check_failed(session) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`hybrid-attention demo`: one layer of each kind (window, CSA, HCA, full) beside dense SDPA.

Every layer gets the same random prompt: a prefill of `--seq-len` tokens into a fresh streaming
state, then `--decode-steps` one-token steps. Each layer (and the baseline) runs twice. The first
pass is the warm-up and measures memory. The second pass is timed. The table shows, per layer
kind: prefill time and its ratio to dense SDPA at the same length, decode ms/token, the peak
memory of each step, the state bytes per token and the keys each decode query attends to.

Dense baseline: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` on queries of
the same head shapes (n_heads x head_dim, fp32) over a KV cache of n_heads K and V heads
(`--dense-kv shared`: one head that is both key and value, as the layer's shared KV row). It is
the attention core alone; the layers' times include their projections, compressors and indexer.

Peak memory is the growth of the resident set over the step (see `PeakMemory`).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import HybridAttention
from .cli import UsageError, non_negative_int, positive_int, seed, token_count, token_count_or_zero
from .config import FULL, AttentionConfig

KINDS = ("window", "csa", "hca", "full")
DEFAULT_HCA_RATIO = 128
MB = 1 << 20


# Peak memory --------------------------------------------------------------------------------

def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()
_PROC = Path("/proc/self")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to give freed heap pages back to the kernel.

    Without this, pages freed by an earlier step still count in the resident set, and a later
    step that reuses them would seem to need no memory."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    By default every allocation over 32 MB (at 16K tokens, each [s, heads * head_dim] fp32
    tensor of a training step) is a fresh mmap, which the kernel zero-fills page by page on first
    touch; a 16K window-layer training step spent about 28% of its time there on the benchmark
    guest. This raises the mmap threshold to 2 GiB and the trim threshold likewise, as jemalloc or
    tcmalloc would behave. A process-wide setting: call it at the start of a training or
    benchmark script, not from a library. Returns whether glibc accepted it."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    limit = 2**31 - 1
    return all(mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit), (_M_TOP_PAD, 1 << 28)))


def map_blocks_separately(threshold: int = 128 << 10) -> bool:
    """Ask glibc to give every block of `threshold` bytes or more its own mapping, returned to the
    kernel when freed (and to trim its heaps down to that much), so that the resident set follows
    the live tensors: its peak over a step is the step's working memory, not what an earlier step
    left for reuse. Slower (fresh pages are zero-filled), so for measuring memory, in a process of
    its own. Process-wide, like `retain_freed_memory`. Returns whether glibc accepted it."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, threshold) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def _status_kb(field: str) -> int:
    for line in (_PROC / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@functools.cache
def peak_memory_method() -> str:
    """"hwm", "sampled" or "none" (see `PeakMemory`), decided once per process."""
    if not _PROC.exists():
        return "none"
    return "hwm" if _can_reset_high_water_mark() else "sampled"


def _can_reset_high_water_mark() -> bool:
    try:
        (_PROC / "clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except (OSError, RuntimeError, ValueError):
        return False


class PeakMemory:
    """Peak growth of the resident set (RSS) over a `with` block, in bytes (`self.peak`).

    On entry, freed memory is handed back (`release_freed_memory`) and the current RSS becomes
    the baseline. Method "hwm": the kernel's high-water mark VmHWM is reset to the current RSS by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0) and read on exit; exact, nothing sampled.
    Method "sampled" (where clear_refs cannot be written): a thread reads /proc/self/statm every
    millisecond, so spikes shorter than that can be missed. Method "none" (no /proc): peak is None.
    """

    def __init__(self) -> None:
        self.method = peak_memory_method()
        self.peak: int | None = None
        self._base = 0
        self._sampled_max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        pages = int((_PROC / "statm").read_text().split()[1])
        return pages * _PAGE_SIZE

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
        if self.method == "none":
            return self
        if self.method == "hwm":
            (_PROC / "clear_refs").write_text("5")
            self._base = _status_kb("VmRSS") * 1024
        else:
            self._base = self._sampled_max = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled_max = max(self._sampled_max, self.rss())

    def __exit__(self, *exc) -> None:
        if self.method == "hwm":
            self.peak = _status_kb("VmHWM") * 1024 - self._base
        elif self.method == "sampled":
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled_max, self.rss()) - self._base


# Progress -----------------------------------------------------------------------------------

class _TextBar:
    """A minimal stand-in for tqdm on stderr: `[#####.....] 3/8 csa: prefill`."""

    def __init__(self, total: int, disable: bool = False, width: int = 30) -> None:
        self.total, self.n, self.disable, self.width = total, 0, disable, width
        self.desc = ""

    def _draw(self) -> None:
        if self.disable:
            return
        filled = self.width * self.n // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.n}/{self.total} {self.desc:<32}")
        sys.stderr.flush()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def write(self, line: str) -> None:
        """Print a line to stdout above the bar."""
        if not self.disable:
            sys.stderr.write("\r" + " " * (self.width + 48) + "\r")
        print(line, flush=True)
        self._draw()

    def close(self) -> None:
        if not self.disable:
            sys.stderr.write("\n")


def progress_bar(total: int, disable: bool = False):
    """tqdm on stderr when it is installed, else `_TextBar`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(total, disable)
    return tqdm(total=total, disable=disable, file=sys.stderr, unit="step", leave=False,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


# Measurements -------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table. Memory in bytes (None where it cannot be measured)."""

    name: str
    tokens: int
    prefill_s: float
    prefill_peak: int | None
    decode_ms: float
    decode_peak: int | None
    state_bytes_per_token: float
    keys_per_query: float
    state_parts: dict | None = None  # state.nbytes_by_type() after prefill and decode
    state_tokens: int = 0
    dense_prefill_s: float | None = None  # the baseline's prefill time at the same length


def demo_config(preset: str) -> AttentionConfig:
    """The preset's shapes with one layer of each kind, in the order of KINDS.

    The HCA ratio is the preset's first ratio that is neither 0 nor the CSA ratio."""
    cfg = AttentionConfig.preset(preset)
    hca_ratio = next((r for r in cfg.compress_ratios if r not in (0, FULL, cfg.csa_ratio)),
                     DEFAULT_HCA_RATIO)
    ratios = {"window": 0, "csa": cfg.csa_ratio, "hca": hca_ratio, "full": FULL}
    return cfg.replace(compress_ratios=[ratios[k] for k in KINDS], n_layers=len(KINDS))


def measure_layer(layer: HybridAttention, x: torch.Tensor, prefill_len: int, steps: int,
                  bar) -> Row:
    """Prefill `x[:, :prefill_len]` into a fresh state, then decode the next `steps` tokens."""
    prompt = x[:, :prefill_len]
    decode_tokens = [x[:, t: t + 1] for t in range(prefill_len, prefill_len + steps)]

    # Pass 1: warm-up, peak memory, and the keys each decode query attends to (return_aux costs
    # a CSA layer an indexer-loss term, so the timed pass leaves it off).
    bar.set_description(f"{layer.kind}: prefill {prefill_len} (memory)")
    state = layer.new_state(x.size(0))
    with PeakMemory() as prefill_mem:
        layer(prompt, state=state)
    bar.update()
    bar.set_description(f"{layer.kind}: decode {steps} (memory)")
    keys = []
    with PeakMemory() as decode_mem:
        for token in decode_tokens:
            keys.append(layer(token, state=state, return_aux=True)[1]["attended_keys"])
    bar.update()
    del state

    # Pass 2: timed. No release_freed_memory() here: pages the allocator kept from pass 1 are
    # reused, as they would be in a long-running process, instead of being faulted in again.
    bar.set_description(f"{layer.kind}: prefill {prefill_len} (timed)")
    state = layer.new_state(x.size(0))
    start = time.perf_counter()
    layer(prompt, state=state)
    prefill_s = time.perf_counter() - start
    bar.update()
    bar.set_description(f"{layer.kind}: decode {steps} (timed)")
    start = time.perf_counter()
    for token in decode_tokens:
        layer(token, state=state)
    decode_ms = (time.perf_counter() - start) * 1e3 / max(steps, 1)
    bar.update()
    return Row(layer.kind, prefill_len, prefill_s, prefill_mem.peak, decode_ms, decode_mem.peak,
               state.nbytes() / state.pos, sum(keys) / max(len(keys), 1),
               state_parts=state.nbytes_by_type(), state_tokens=state.pos)


def dense_kv_bytes_per_token(n_heads: int, head_dim: int, shared_kv: bool, dtype: torch.dtype) -> int:
    """Cache bytes of one token: K and V rows per head, or one shared row (both key and value)."""
    element = torch.finfo(dtype).bits // 8
    return head_dim * element * (1 if shared_kv else 2 * n_heads)


def measure_dense(cfg: AttentionConfig, batch: int, seq_len: int, steps: int, shared_kv: bool,
                  bar) -> Row:
    """Dense causal SDPA with the layer's query head shapes: prefill, then `steps` decode steps
    over a KV cache allocated for seq_len + steps tokens."""
    h, d, total = cfg.n_heads, cfg.head_dim, seq_len + steps
    kv_heads = 1 if shared_kv else h
    gqa = shared_kv

    def allocate():
        q = torch.randn(batch, h, seq_len, d)
        k = torch.randn(batch, kv_heads, total, d)
        v = k if shared_kv else torch.randn(batch, kv_heads, total, d)
        return q, k, v

    decode_q = torch.randn(steps, batch, h, 1, d)
    decode_kv = torch.randn(steps, 2, batch, kv_heads, d)

    def prefill(q, k, v):
        return F.scaled_dot_product_attention(q, k[:, :, :seq_len], v[:, :, :seq_len], is_causal=True,
                                              enable_gqa=gqa)

    def decode(k, v):
        for t in range(steps):
            pos = seq_len + t
            k[:, :, pos] = decode_kv[t, 0]
            if v is not k:
                v[:, :, pos] = decode_kv[t, 1]
            # One query sees every cached key; is_causal would align the mask top-left instead.
            F.scaled_dot_product_attention(decode_q[t], k[:, :, : pos + 1], v[:, :, : pos + 1],
                                           enable_gqa=gqa)

    bar.set_description(f"dense: prefill {seq_len} (memory)")
    with PeakMemory() as prefill_mem:
        q, k, v = allocate()  # the cache and queries count, as the layer's own q and kv do
        out = prefill(q, k, v)
    bar.update()
    bar.set_description(f"dense: decode {steps} (memory)")
    with PeakMemory() as decode_mem:
        decode(k, v)
    bar.update()
    del out

    bar.set_description(f"dense: prefill {seq_len} (timed)")
    start = time.perf_counter()
    prefill(q, k, v)
    prefill_s = time.perf_counter() - start
    bar.update()
    bar.set_description(f"dense: decode {steps} (timed)")
    start = time.perf_counter()
    decode(k, v)
    decode_ms = (time.perf_counter() - start) * 1e3 / max(steps, 1)
    bar.update()
    # A query at position t attends to t + 1 keys; the mean over the decode positions.
    keys = seq_len + (steps + 1) / 2 if steps else seq_len
    name = "dense SDPA (shared KV)" if shared_kv else f"dense SDPA ({h} KV heads)"
    return Row(name, seq_len, prefill_s, prefill_mem.peak, decode_ms, decode_mem.peak,
               dense_kv_bytes_per_token(h, d, shared_kv, torch.float32), keys)


# Output -------------------------------------------------------------------------------------

HEADER = ("kind", "tokens", "prefill s", "vs dense", "prefill peak MB", "decode ms/tok",
          "decode peak MB", "state B/token", "keys/query")


def _mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:.1f}"


def format_table(rows: list[Row]) -> str:
    cells = [HEADER]
    for r in rows:
        ratio = "1.00x" if r.dense_prefill_s is None else f"{r.prefill_s / r.dense_prefill_s:.2f}x"
        cells.append((r.name, str(r.tokens), f"{r.prefill_s:.4g}", ratio, _mb(r.prefill_peak),
                      f"{r.decode_ms:.2f}", _mb(r.decode_peak), f"{r.state_bytes_per_token:.1f}",
                      f"{r.keys_per_query:.1f}"))
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def format_state_parts(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.state_parts:
            parts = ", ".join(f"{name} {n / 1024:.1f} KiB" for name, n in r.state_parts.items())
            lines.append(f"  {r.name} state after {r.state_tokens} tokens: {parts}")
    return "\n".join(lines)


# CLI ----------------------------------------------------------------------------------------

# Default prefill lengths per preset, (--seq-len, --full-seq-len): tiny's layers hold at most
# max_seq_len=4096 tokens, and it is meant to finish in seconds.
DEFAULT_LENGTHS = {"small": (32768, 8192), "tiny": (2048, 512)}


def _per_preset(which: int) -> str:
    return ", ".join(f"{lengths[which]} for {name}" for name, lengths in DEFAULT_LENGTHS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", choices=tuple(DEFAULT_LENGTHS),
                        help="Layer shapes: small, or tiny for a run of seconds. Default: %(default)s.")
    parser.add_argument("--seq-len", type=token_count, metavar="TOKENS",
                        help="Prefill length in tokens: an integer, or with a K suffix (32K; 1K = 1024). "
                             f"Default: {_per_preset(0)}.")
    parser.add_argument("--full-seq-len", type=token_count_or_zero, metavar="TOKENS",
                        help="Prefill length of the 'full' layer, whose cost grows with the square of the "
                             f"length; 0 runs it at --seq-len. Default: {_per_preset(1)}.")
    parser.add_argument("--decode-steps", type=non_negative_int, default=64, metavar="N",
                        help="One-token decode steps after the prefill. Default: %(default)s.")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N",
                        help="Sequences per batch. Default: %(default)s.")
    parser.add_argument("--dense-kv", default="heads", choices=("heads", "shared"),
                        help="KV cache of the dense SDPA baseline: heads gives a K and a V head per "
                             "query head, shared one head used as both key and value, like the layers' "
                             "shared KV row. Default: %(default)s.")
    parser.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                        help="Torch intra-op threads; 0 keeps torch's default. Default: %(default)s.")
    parser.add_argument("--seed", type=seed, default=0,
                        help="Random seed of the weights and inputs. Default: %(default)s.")
    parser.add_argument("--no-progress", action="store_true", help="Do not draw a progress bar.")


def run(args: argparse.Namespace) -> int:
    cfg = demo_config(args.preset)
    default_len, default_full = DEFAULT_LENGTHS[args.preset]
    seq_len = args.seq_len or default_len
    full_seq_len = default_full if args.full_seq_len is None else args.full_seq_len
    steps = args.decode_steps
    full_len = min(seq_len, full_seq_len or seq_len)
    if seq_len + steps > cfg.max_seq_len:
        raise UsageError(f"--seq-len + --decode-steps = {seq_len + steps} passes the {args.preset!r} "
                         f"preset's max_seq_len={cfg.max_seq_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lengths = {kind: (full_len if kind == "full" else seq_len) for kind in KINDS}
    dense_lengths = sorted(set(lengths.values()), reverse=True)

    layers = {kind: HybridAttention(cfg, i).eval() for i, kind in enumerate(KINDS)}
    x = torch.randn(args.batch, seq_len + steps, cfg.dim)
    print(f"hybrid-attention demo: preset {args.preset!r} (dim {cfg.dim}, {cfg.n_heads} heads x "
          f"{cfg.head_dim}, window {cfg.window_size}, CSA ratio {cfg.csa_ratio} top-{cfg.index_topk}, "
          f"HCA ratio {cfg.compress_ratios[KINDS.index('hca')]}), batch {args.batch}, fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"prefill {seq_len} tokens ('full': {full_len}), then {steps} decode steps; "
          f"each layer runs once to warm up and measure memory, once timed")

    bar = progress_bar(4 * (len(KINDS) + len(dense_lengths)), disable=args.no_progress)
    dense = {}
    rows = []
    try:
        with torch.no_grad():
            for length in dense_lengths:
                dense[length] = measure_dense(cfg, args.batch, length, steps, args.dense_kv == "shared", bar)
            for kind in KINDS:
                rows.append(measure_layer(layers[kind], x, lengths[kind], steps, bar))
    finally:
        bar.close()
    for row in rows:
        row.dense_prefill_s = dense[row.tokens].prefill_s
    rows += [dense[length] for length in dense_lengths]

    print(format_table(rows))
    print(format_state_parts(rows))
    csa = rows[KINDS.index("csa")]
    base = dense[csa.tokens]
    print(f"CSA at {csa.tokens} tokens: prefill {csa.prefill_s / base.prefill_s:.2f}x the time of "
          f"dense SDPA, state {base.state_bytes_per_token / csa.state_bytes_per_token:.1f}x smaller "
          f"per token than the dense KV cache, {csa.keys_per_query:.0f} keys per query instead of "
          f"{base.keys_per_query:.0f}.")
    notes = [
        "vs dense: prefill time / dense SDPA prefill time at the same length. Dense SDPA is the "
        "attention core alone (q, K, V given); the layers' times include their projections.",
        f"dense: SDPA(is_causal=True), queries [b, {cfg.n_heads}, s, {cfg.head_dim}] over "
        + ("one head used as both key and value (enable_gqa)" if args.dense_kv == "shared"
           else f"{cfg.n_heads} K and {cfg.n_heads} V heads")
        + "; its 'state' is the fp32 KV cache.",
        f"peak MB: growth of the resident set over the step, method '{peak_memory_method()}' "
        "(kernel high-water mark after a reset; see hybrid_attention/demo.py). Prefill peaks include "
        "the step's q, KV and (dense) cache; decode peaks the per-token work and state growth.",
        "keys/query: keys each decode query attends to, mean over the decode steps "
        "(aux['attended_keys']; dense: t + 1 at position t). State B/token: state.nbytes() / tokens.",
    ]
    if full_len < seq_len:
        notes.append(f"'full' runs at {full_len} tokens: it is dense causal attention, whose cost grows "
                     f"with the square of the length; --full-seq-len 0 runs it at {seq_len}.")
    print("\n".join("note: " + n for n in notes))
    return 0

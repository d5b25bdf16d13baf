"""Time of one decode step (one new token) of each layer kind against a dense decode step, by context.

    python benchmarks/bench_decode.py                          # 128K context, window/CSA/HCA
    python benchmarks/bench_decode.py --contexts 32768 131072  # several contexts
    python benchmarks/bench_decode.py --fill random            # skip the prefill (seconds, not minutes)
    python benchmarks/bench_decode.py --quick                  # a smoke run at 4K and 8K

For each context length n, every layer ("small" preset, batch 1, fp32, no_grad) first gets a
streaming state holding n tokens (`--fill`). Then the dense step and every layer decode in
rounds, one step each per round: 2 untimed warm-up rounds, then `--repeats` timed rounds; the
median per kind is shown. Interleaving lets a busy neighbour slow them alike, and each layer step
finds the caches cold (the dense step streamed its whole cache just before), as it would between
the layers of a model; `--sequential` runs each kind's steps back to back instead, which lets a
layer keep its weights and state in cache (CSA at 128K: ~2.4 ms instead of ~3.7). Each step is a real
`layer(x_token, state)` call on a random token, so it commits its token and the context grows by
one per step (n + 2 + repeats at the end; negligible at long contexts). The dense step's cache
stays at n tokens.

Dense baseline: one query [1, n_heads, 1, head_dim] against a KV cache of n tokens,
`F.scaled_dot_product_attention(q, K, V)` (no mask: a last query sees every key), fp32, with
n_heads K and V heads (`--dense-kv shared`: one KV head that is both key and value, read once
for all query heads, which sit on its query axis). It is the attention core alone, so the ratios
favour it: the layers' times also include their projections, compressors, indexer and output
projection.

Fill (`--fill`):
  prefill  the layer's own chunked prefill of random hidden states into `layer.new_state(1)`,
           8192 tokens a chunk. Slow for CSA: about 25 s at 128K on 2 idle cores. A "full" layer
           (quadratic prefill) is filled with random rows instead.
  random   random rows of the right shapes written straight into the state (window ring,
           compressor tails, compressed entries, indexer keys, pos = n). A decode step's work
           depends on the shapes, not on the values; at 16K both fills give the same decode time
           within the run-to-run noise.

Columns: keys/query is what the step's query attends to (the layer's own count, `attended_keys`,
from the first warm-up step): the window min(n + 1, window) plus, for HCA, every visible
compressed entry (n + 1) // ratio, for CSA at most top-k of them; dense: n. state MB is
`state.nbytes()` after the fill, an upper bound on what a step reads (CSA reads all indexer keys
but only top-k compressed entries); for dense it is the K/V cache.

Threads: a layer's decode step is a few hundred small ops, each a parallel region at more than one
thread. When another process holds a core, every region can wait for a descheduled thread, and a
step that takes 1 ms can take 40 ms (the dense step, one large op, suffers far less). The header
shows the load average; on a shared machine, compare with `--threads 1`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_prefill import cpu_name

from hybrid_attention import AttentionConfig, HybridAttention
from hybrid_attention.demo import KINDS, demo_config, dense_kv_bytes_per_token, progress_bar

DEFAULT_CONTEXTS = (131072,)
QUICK_CONTEXTS = (4096, 8192)
DEFAULT_KINDS = ("window", "csa", "hca")
DENSE = "dense SDPA"
WARMUP = 2
CHUNK = 8192
MB = 1 << 20


# State fills ---------------------------------------------------------------------------------

def prefill_state(layer: HybridAttention, context: int, dim: int, on_chunk=None):
    """A state after the layer's own chunked prefill of `context` random tokens."""
    state = layer.new_state(1)
    for start in range(0, context, CHUNK):
        layer(torch.randn(1, min(CHUNK, context - start), dim), state)
        if on_chunk is not None:
            on_chunk(state.pos)
    return state


def random_state(layer: HybridAttention, context: int):
    """A state at position `context` with random rows of the shapes a prefill would leave."""
    cfg = layer.cfg
    state = layer.new_state(1)
    if state.kv is not None:  # "full": every KV row
        state.kv.append(torch.randn(1, context, cfg.head_dim))
    else:
        state.window.copy_(torch.randn_like(state.window))
    if layer.compressor is not None:
        n_entries = context // layer.ratio
        state.compressed.append(torch.randn(1, n_entries, cfg.head_dim))
        _fill_tail(state.compressor, layer.ratio, layer.compressor.overlap, context)
    if layer.indexer is not None:
        state.index_keys.append(torch.randn(1, context // layer.ratio, cfg.index_head_dim))
        _fill_tail(state.index_compressor, layer.ratio, layer.indexer.compressor.overlap, context)
    state.pos = context
    return state


def _fill_tail(tail, ratio: int, overlap: bool, context: int) -> None:
    """Compressor slots as `CompressorState` lays them out: [0, r) the last complete block
    (overlap only, once one exists), then the unfinished block's context % r rows; empty slots
    keep score -inf."""
    first = ratio if overlap else 0
    used = [(first, first + context % ratio)]
    if overlap and context >= ratio:
        used.append((0, ratio))
    for lo, hi in used:
        tail.kv[:, lo:hi] = torch.randn_like(tail.kv[:, lo:hi])
        tail.score[:, lo:hi] = torch.randn_like(tail.score[:, lo:hi])


# Steps ---------------------------------------------------------------------------------------

def time_steps(steps: dict, repeats: int, interleave: bool = True) -> dict[str, float]:
    """Median seconds of each step(i) over `repeats` calls, after WARMUP untimed ones.

    interleave: in rounds that call every step once, so a neighbour's load falls on the dense step
    and the layers alike, and each layer step finds the caches cold, as between a model's layers;
    else each step's calls back to back (warm caches)."""
    times = {name: [] for name in steps}
    order = ([(i, name) for i in range(WARMUP + repeats) for name in steps] if interleave
             else [(i, name) for name in steps for i in range(WARMUP + repeats)])
    for i, name in order:
        start = time.perf_counter()
        steps[name](i)
        if i >= WARMUP:
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_decode(layer: HybridAttention, state, tokens: torch.Tensor, aux: dict):
    """Step i decodes tokens[i] [1, 1, dim] into the state; the first records attended_keys."""

    def step(i: int):
        if i == 0:
            y, out = layer(tokens[i], state, return_aux=True)
            aux.update(out)
            return y
        return layer(tokens[i], state)

    return step


def dense_decode(cfg: AttentionConfig, context: int, shared_kv: bool):
    """One query against a KV cache of `context` tokens; returns (step, cache bytes).

    With one shared KV head the n_heads query heads go on the query axis of a single head,
    [1, 1, n_heads, d]: the same result as enable_gqa (no mask), but the cache is read once
    instead of being expanded to n_heads heads (about 2x faster at 128K)."""
    h, d = cfg.n_heads, cfg.head_dim
    q = torch.randn(1, 1, h, d) if shared_kv else torch.randn(1, h, 1, d)
    k = torch.randn(1, 1 if shared_kv else h, context, d)
    v = k if shared_kv else torch.randn_like(k)

    def step(i: int):
        return F.scaled_dot_product_attention(q, k, v)

    return step, context * dense_kv_bytes_per_token(h, d, shared_kv, torch.float32)


# Output --------------------------------------------------------------------------------------

HEADER = ("context", "kind", "decode ms", "vs dense", "speedup", "keys/query", "state MB", "fill s")


def format_row(cells) -> str:
    widths = (7, 10, 10, 9, 8, 10, 9, 7)
    return " ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def summary(context: int, results: dict[str, float], dense_s: float) -> str:
    parts = [f"{kind} {s / dense_s:.3f} of dense ("
             + (f"{dense_s / s:.1f}x faster)" if s <= dense_s else f"{s / dense_s:.1f}x slower)")
             for kind, s in results.items()]
    return f"# {context}: " + "; ".join(parts)


# CLI -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+",
                        help="context lengths in tokens before the decode steps (default: 131072)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the defaults become contexts {' '.join(map(str, QUICK_CONTEXTS))}, "
                             "5 repeats, --fill random (options given explicitly still win)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=KINDS,
                        help="layer kinds (default: window csa hca)")
    parser.add_argument("--fill", choices=("prefill", "random"),
                        help="how the state gets its context: the layer's chunked prefill, or random "
                             "rows of the right shapes (default: prefill)")
    parser.add_argument("--dense-kv", default="heads", choices=("heads", "shared"),
                        help="dense K/V: one head per query head, or one shared head (default: heads)")
    parser.add_argument("--repeats", type=int,
                        help="timed decode steps after the warm-up; the median is shown (default: 20)")
    parser.add_argument("--sequential", action="store_true",
                        help="time each kind's steps back to back (warm caches) instead of in "
                             "interleaved rounds")
    parser.add_argument("--preset", default="small", choices=("small", "tiny"),
                        help="layer shapes (default: small)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    args = parser.parse_args(argv)
    defaults = (QUICK_CONTEXTS, 5, "random") if args.quick else (DEFAULT_CONTEXTS, 20, "prefill")
    for name, default in zip(("contexts", "repeats", "fill"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, list(default) if name == "contexts" else default)
    if min(args.contexts) < 1:
        parser.error("--contexts must be positive")
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = demo_config(args.preset)
    # Room for the longest context and every step each layer commits after it.
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max(args.contexts) + WARMUP + args.repeats))
    layers = {kind: HybridAttention(cfg, KINDS.index(kind)).eval() for kind in args.kinds}
    shared = args.dense_kv == "shared"
    dense_kv = ("one shared KV head (heads on the query axis)" if shared
                else f"{cfg.n_heads} K + {cfg.n_heads} V heads")
    fill = (f"the layer's chunked prefill ({CHUNK} a chunk; 'full': random rows)"
            if args.fill == "prefill" else "random rows")
    order = "each kind back to back" if args.sequential else "interleaved in rounds"
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"# device: {cpu_name()} (CPU){load}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads | preset {args.preset}: dim {cfg.dim}, {cfg.n_heads} heads x {cfg.head_dim}, window "
          f"{cfg.window_size}, CSA ratio {cfg.csa_ratio} top-{cfg.index_topk}, HCA ratio "
          f"{cfg.compress_ratios[KINDS.index('hca')]} | batch 1, fp32, no_grad | dense: one query, "
          f"SDPA over {dense_kv} | fill: {fill} | decode: median of {args.repeats} steps after {WARMUP} "
          f"warm-up, {order}; each layer step commits its token")
    if args.fill == "prefill" and "csa" in args.kinds and max(args.contexts) >= 65536:
        print("# note: the CSA prefill takes about 25 s at 128K on 2 idle cores, more when busy")
    print(format_row(HEADER))
    points = len(args.contexts) * (1 + len(args.kinds))
    bar = progress_bar(points, disable=args.no_progress)
    tokens = torch.randn(WARMUP + args.repeats, 1, 1, cfg.dim)
    summaries = []
    try:
        with torch.no_grad():
            for context in args.contexts:
                steps, fills, state_bytes, aux = {}, {}, {}, {}
                for kind, layer in layers.items():
                    desc = f"{kind} {context}"
                    bar.set_description(f"{desc}: fill")
                    start = time.perf_counter()
                    if args.fill == "prefill" and kind != "full":
                        def progress(pos: int, desc=desc, context=context) -> None:
                            bar.set_description(f"{desc}: prefill {pos}/{context}")

                        state = prefill_state(layer, context, cfg.dim, progress)
                    else:
                        state = random_state(layer, context)
                    fills[kind] = time.perf_counter() - start
                    state_bytes[kind] = state.nbytes()
                    aux[kind] = {}
                    steps[kind] = layer_decode(layer, state, tokens, aux[kind])
                    bar.update()
                bar.set_description(f"decode {context}")
                steps[DENSE], kv_bytes = dense_decode(cfg, context, shared)
                steps = {DENSE: steps.pop(DENSE), **steps}
                times = time_steps(steps, args.repeats, interleave=not args.sequential)
                del steps  # frees the states and the dense cache
                dense_s = times.pop(DENSE)
                bar.write(format_row((context, DENSE, f"{dense_s * 1e3:.3f}", "1.000", "1.0x",
                                      context, f"{kv_bytes / MB:.1f}", "-")))
                for kind, seconds in times.items():
                    bar.write(format_row((context, kind, f"{seconds * 1e3:.3f}", f"{seconds / dense_s:.3f}",
                                          f"{dense_s / seconds:.1f}x", f"{aux[kind]['attended_keys']:.0f}",
                                          f"{state_bytes[kind] / MB:.1f}", f"{fills[kind]:.1f}")))
                bar.update()
                summaries.append(summary(context, times, dense_s))
    finally:
        bar.close()
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

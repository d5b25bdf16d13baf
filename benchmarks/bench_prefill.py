"""Prefill time and peak memory of each layer kind against dense causal SDPA, by sequence length.

    python benchmarks/bench_prefill.py                       # 4K .. 128K, every kind
    python benchmarks/bench_prefill.py --max-dense 65536     # skip dense SDPA past 64K
    python benchmarks/bench_prefill.py --quick               # a smoke run at 1K .. 4K
    python benchmarks/bench_prefill.py --plot prefill.png    # also draw time and speedup by length

For each length, dense SDPA and then each layer kind (window, CSA, HCA, full; "small" preset, batch
1, fp32, no_grad) run once untimed, which warms up and measures peak memory. Then `--repeats`
timed rounds run one call of every kind each, so that a slow spell of a shared host hits every kind
of a round alike; the median per kind is shown. Peak memory is the growth of the resident set over the call
(`hybrid_attention.demo.PeakMemory`): for the layers it counts everything the layer allocates from
the hidden states x, for dense SDPA its q, K and V and its output. Dense SDPA is the attention core
only, so the ratios favour it. GFLOP/s is `useful_flops()` / time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_attention import AttentionConfig, HybridAttention
from hybrid_attention.demo import KINDS, PeakMemory, demo_config, peak_memory_method, progress_bar

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (1024, 2048, 4096)
DENSE = "dense SDPA"
MB = 1 << 20


def keys_per_query(kind: str, cfg: AttentionConfig, seq_len: int, ratio: int) -> torch.Tensor:
    """[seq_len] keys the query at position t attends to in a causal prefill (SPEC 4): the window
    min(t + 1, win), plus for HCA every entry i < (t + 1) // ratio, for CSA at most top-k of them;
    t + 1 for "full" and dense."""
    t = torch.arange(seq_len, dtype=torch.float64)
    if kind in ("full", DENSE):
        return t + 1
    keys = (t + 1).clamp_max(cfg.window_size)
    visible = torch.div(t + 1, ratio, rounding_mode="floor") if ratio else torch.zeros_like(t)
    if kind == "csa":
        visible = visible.clamp_max(cfg.index_topk)
    return keys + visible


def useful_flops(kind: str, cfg: AttentionConfig, seq_len: int, layer: nn.Module | None = None) -> float:
    """FLOPs a prefill must do, not what this implementation happens to do:
    4 * n_heads * head_dim per (query, attended key) pair (q.k and p.v); for CSA also
    2 * index_n_heads * index_head_dim per (query, visible indexer key) pair; and for the layers
    2 per weight of every projection per token (all nn.Linear weights: q, kv, output, compressors,
    indexer). Softmax, norms, RoPE and top-k are not counted."""
    ratio = layer.ratio if layer is not None else 0
    pairs = float(keys_per_query(kind, cfg, seq_len, ratio).sum())
    flops = 4 * cfg.n_heads * cfg.head_dim * pairs
    if kind == "csa":
        index_pairs = float(torch.div(torch.arange(1, seq_len + 1), ratio, rounding_mode="floor").sum())
        flops += 2 * cfg.index_n_heads * cfg.index_head_dim * index_pairs
    if layer is not None:
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        flops += 2 * seq_len * weights
    return flops


def peak_of(step) -> int | None:
    """Peak RSS growth of one untimed call (which is also the warm-up)."""
    with PeakMemory() as mem:
        step(allocate_inside=True)
    return mem.peak


def timed(step) -> float:
    start = time.perf_counter()
    step(allocate_inside=False)
    return time.perf_counter() - start


def dense_step(cfg: AttentionConfig, seq_len: int, shared_kv: bool):
    """Causal SDPA over [1, n_heads, s, head_dim] queries; K/V with n_heads heads or one shared."""
    shape = (1, cfg.n_heads, seq_len, cfg.head_dim)
    kv_shape = (1, 1, seq_len, cfg.head_dim) if shared_kv else shape
    inputs = {}

    def step(allocate_inside: bool):
        if allocate_inside or not inputs:  # the memory pass counts q, K and V
            inputs.clear()
            k = torch.randn(kv_shape)
            inputs.update(q=torch.randn(shape), k=k, v=k if shared_kv else torch.randn(kv_shape))
        return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True,
                                              enable_gqa=shared_kv)

    return step


def layer_step(layer: HybridAttention, x: torch.Tensor):
    """A stateless prefill of x; the layer allocates everything it needs inside the call."""

    def step(allocate_inside: bool):
        return layer(x)

    return step


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_row(cells) -> str:
    widths = (7, 10, 10, 9, 9, 9, 8, 11)
    return " ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="prefill lengths in tokens (default: 4096 8192 16384 32768 65536 131072)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: lengths {' '.join(map(str, QUICK_LENGTHS))}, overrides --lengths")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="layer kinds to run (default: all)")
    parser.add_argument("--max-dense", type=int, default=0,
                        help="skip dense SDPA at lengths above this (its time grows with the square "
                             "of the length); 0 = no limit")
    parser.add_argument("--max-full", type=int, default=32768,
                        help="skip the 'full' layer at lengths above this (quadratic too); "
                             "0 = no limit (default: 32768)")
    parser.add_argument("--dense-kv", default="heads", choices=("heads", "shared"),
                        help="dense K/V: one head per query head, or one shared head (default: heads)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per point after the warm-up; the median is shown (default: 1)")
    parser.add_argument("--preset", default="small", choices=("small", "tiny"),
                        help="layer shapes (default: small)")
    parser.add_argument("--query-block-size", type=int, default=0,
                        help="override the config's query_block_size; 0 = the preset's")
    parser.add_argument("--quant", default="none", choices=("none", "official"),
                        help="the layers' precision mode: official rounds K/V to FP8 and the indexer to "
                             "FP4 as DeepSeek's code does (and lets the CPU indexer score in int8, "
                             "exactly) (default: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    parser.add_argument("--plot", metavar="PNG", help="also write a plot of the table (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = list(QUICK_LENGTHS)
    if min(args.lengths) < 1 or args.repeats < 1:
        parser.error("lengths and --repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = demo_config(args.preset).replace(quant=args.quant)
    if args.query_block_size:
        cfg = cfg.replace(query_block_size=args.query_block_size)
    layers = {kind: HybridAttention(cfg, KINDS.index(kind)).eval() for kind in args.kinds}

    def runs(kind: str, length: int) -> bool:
        limit = args.max_dense if kind == DENSE else args.max_full if kind == "full" else 0
        return not limit or length <= limit

    dense_kv = ("one shared KV head" if args.dense_kv == "shared"
                else f"{cfg.n_heads} K + {cfg.n_heads} V heads")
    points = [(n, k) for n in args.lengths for k in (DENSE, *args.kinds) if runs(k, n)]
    print(f"# device: {cpu_name()} (CPU), torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"preset {args.preset}: dim {cfg.dim}, {cfg.n_heads} heads x {cfg.head_dim}, window "
          f"{cfg.window_size}, CSA ratio {cfg.csa_ratio} top-{cfg.index_topk}, HCA ratio "
          f"{cfg.compress_ratios[KINDS.index('hca')]}, query block {cfg.query_block_size} | batch 1, "
          f"fp32, quant {args.quant}, no_grad | dense: SDPA is_causal, {dense_kv} | peak = RSS growth "
          f"({peak_memory_method()}) | time: median of {args.repeats} interleaved rounds after a warm-up")
    print(format_row(("tokens", "kind", "prefill s", "vs dense", "peak MB", "vs dense", "GFLOP/s",
                      "keys/query")))
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib (pip install 'hybrid-attention[plot]')") from None
    bar = progress_bar(len(points) * (1 + args.repeats), disable=args.no_progress)
    medians = {}  # (length, kind) -> seconds
    try:
        with torch.no_grad():
            for length in args.lengths:
                x = torch.randn(1, length, cfg.dim)
                kinds = [k for k in (DENSE, *args.kinds) if runs(k, length)]
                steps = {k: dense_step(cfg, length, args.dense_kv == "shared") if k == DENSE
                         else layer_step(layers[k], x) for k in kinds}
                peaks = {}
                for kind in kinds:  # warm-up and memory, one kind at a time
                    bar.set_description(f"{kind} {length}: warm-up")
                    peaks[kind] = peak_of(steps[kind])
                    bar.update()
                # Timed rounds: one call of every kind per round, so that a slow spell of the
                # shared host hits all kinds of a round alike; the median per kind is shown.
                times = {kind: [] for kind in kinds}
                for r in range(args.repeats):
                    for kind in kinds:
                        bar.set_description(f"{kind} {length}: round {r + 1}")
                        times[kind].append(timed(steps[kind]))
                        bar.update()
                steps.clear()  # frees the dense inputs before the next length
                base_s = statistics.median(times[DENSE]) if DENSE in times else None
                base_peak = peaks.get(DENSE)
                for kind in kinds:
                    layer = layers.get(kind)
                    seconds, peak = statistics.median(times[kind]), peaks[kind]
                    medians[length, kind] = seconds
                    ratio = f"{seconds / base_s:.2f}x" if base_s else "-"
                    mem_ratio = f"{peak / base_peak:.2f}x" if base_peak and peak is not None else "-"
                    gflops = useful_flops(kind, cfg, length, layer) / seconds / 1e9
                    keys = float(keys_per_query(kind, cfg, length, layer.ratio if layer else 0).mean())
                    bar.write(format_row((length, kind, f"{seconds:.3f}", ratio,
                                          "-" if peak is None else f"{peak / MB:.0f}", mem_ratio,
                                          f"{gflops:.1f}", f"{keys:.1f}")))
                del x
    finally:
        bar.close()
    if args.plot:
        title = f"{cpu_name()}, {torch.get_num_threads()} threads, preset {args.preset}, fp32, batch 1"
        plot(medians, args.plot, title)
        print(f"# plot written to {args.plot}")
    return 0


def plot(medians: dict[tuple[int, str], float], path: str, title: str) -> None:
    """Prefill time by length for every kind (log-log), and each layer's speedup over dense SDPA."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    kinds = list(dict.fromkeys(kind for _, kind in medians))
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in kinds:
        lengths = sorted(n for n, k in medians if k == kind)
        ax_time.plot(lengths, [medians[n, kind] for n in lengths], marker="o", label=kind,
                     color="black" if kind == DENSE else None)
        paired = [n for n in lengths if (n, DENSE) in medians]
        if kind != DENSE and paired:
            ax_speed.plot(paired, [medians[n, DENSE] / medians[n, kind] for n in paired], marker="o",
                          label=kind)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    for ax, ylabel in ((ax_time, "prefill time (s)"), (ax_speed, "speedup over dense SDPA (x)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({n for n, _ in medians}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 else f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

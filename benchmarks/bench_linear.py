"""The layer's fp32 projections on the CPU: `modules.linear` (oneDNN's GEMM from two rows) against
`nn.functional.linear` (the default BLAS), interleaved in one process.

    python benchmarks/bench_linear.py                # prefill rows (32K) and decode rows (1, 4)
    python benchmarks/bench_linear.py --rows 4096    # other row counts
    python benchmarks/bench_linear.py --quick        # a smoke run

Each shape is one projection of the "small" preset (in -> out features). In every round each shape
runs `--calls` times on each side, the sides alternating, so a slow spell of a shared host hits
both; the table shows the median per call and the ratio of the medians (< 1: `linear` is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_prefill import cpu_name
from torch import nn

from hybrid_attention.demo import demo_config, progress_bar
from hybrid_attention.modules import linear


def layer_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of the small preset's projections that go through `modules.linear`."""
    cfg = demo_config("small")
    return {
        "wq_a": (cfg.dim, cfg.q_lora_rank),
        "wq_b": (cfg.q_lora_rank, cfg.n_heads * cfg.head_dim),
        "wkv": (cfg.dim, cfg.head_dim),
        "wo_b": (cfg.o_groups * cfg.o_lora_rank, cfg.dim),
        "csa compressor": (cfg.dim, 2 * cfg.head_dim),
        "indexer wq_b": (cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim),
    }


def time_calls(fn, x, weight, calls: int) -> float:
    fn(x, weight)
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, weight)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32768, 4, 1],
                        help="rows (tokens) per call (default: 32768 4 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: rows 64 2 1, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = [64, 2, 1], 2
    if min(args.rows) < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be positive")

    torch.manual_seed(0)
    cases = [(name, rows, torch.randn(1, rows, fin), torch.randn(fout, fin) / fin**0.5)
             for rows in args.rows for name, (fin, fout) in layer_shapes().items()]
    sides = {"nn.functional.linear": nn.functional.linear, "modules.linear": linear}
    times = {(name, rows, side): [] for name, rows, _, _ in cases for side in sides}
    bar = progress_bar(args.rounds * len(cases))
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, rows, x, weight in cases:
                calls = max(1, min(200, 2_000_000_000 // (2 * x.numel() * weight.size(0))))
                for side, fn in sides.items():
                    times[name, rows, side].append(time_calls(fn, x, weight, calls))
                bar.update(1)
    bar.close()

    print(f"# {cpu_name()} (CPU), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, no_grad | median of {args.rounds} interleaved "
          f"rounds | ratio < 1: modules.linear is faster")
    print(f"{'rows':>6} {'projection':>15} {'in':>5} {'out':>5} {'F.linear ms':>12} "
          f"{'linear ms':>10} {'ratio':>6} {'GFLOP/s':>8}")
    for name, rows, x, weight in cases:
        base = statistics.median(times[name, rows, "nn.functional.linear"])
        ours = statistics.median(times[name, rows, "modules.linear"])
        flops = 2 * x.numel() * weight.size(0)
        print(f"{rows:>6} {name:>15} {weight.size(1):>5} {weight.size(0):>5} {base * 1e3:>12.3f} "
              f"{ours * 1e3:>10.3f} {ours / base:>6.2f} {flops / ours / 1e9:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training step (forward + backward) time and peak memory of each layer kind against dense SDPA.

    python benchmarks/bench_train.py                          # 4K .. 32K, CSA, HCA, window
    python benchmarks/bench_train.py --lengths 16384 32768 --rounds 3
    python benchmarks/bench_train.py --quick                  # a smoke run at 512 .. 1K, tiny preset

One layer of each kind of the preset (`demo_config`: "small" by default), fp32, batch 1, in train
mode: x [1, s, dim] requires grad, the loss is <y, g> for a fixed random g, plus for CSA the
indexer's KL loss (`return_aux=True`), and backward fills the gradients of x and of every
parameter. The baseline is dense causal `scaled_dot_product_attention` forward + backward with the
same head shapes (n_heads query heads of head_dim, as many K / V heads, q, k and v requiring grad).
It is the attention core alone; the layers' steps include their projections, compressors, indexer
and output projection, so the ratios favour the baseline.

By default glibc is asked to keep freed memory for reuse (`--allocator retain`, see
`hybrid_attention.demo.retain_freed_memory`); with its defaults every tensor over 32 MB is a new
mmap that the kernel zero-fills, which cost the layers (many [s, h * d] intermediates) far more
than the baseline. The setting applies to the whole process, so to both sides of every ratio.

Every length runs one untimed step per candidate (the warm-up), then `--rounds` rounds of one
timed step per candidate, in the same order, so a slow spell of a shared host lands on every
candidate of a round alike. The table shows the median, and the ratio to the baseline's median at
the same length.

Peak memory is measured first, in a process of its own where glibc maps every block of 128 KB or
more separately and unmaps it when freed (`hybrid_attention.demo.map_blocks_separately`), so the
resident set follows the live tensors: per candidate, a warm-up step (it pages in the code the step
runs and sizes the threads' buffers), the gradients dropped, then the growth of the resident set
over one more step (`hybrid_attention.demo.PeakMemory`). That is the step's working memory, as a
training loop sees it from its second step on; the inputs, parameters and the gradient g exist
before and are not counted, for the baseline and the layers alike. (Measured in the timing process
instead, a first step's peak also holds the code paged in for it and, with `--allocator retain`,
whatever the allocator keeps: 100-300 MB that move from process to process.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from bench_prefill import cpu_name  # benchmarks/ is on sys.path when a script runs

from hybrid_attention import HybridAttention
from hybrid_attention.demo import KINDS, PeakMemory, demo_config, map_blocks_separately, retain_freed_memory

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
QUICK_LENGTHS = (512, 1024)
TRAIN_KINDS = ("csa", "hca", "window")
DENSE = "dense SDPA"
MB = 1 << 20


def dense_step(n_heads: int, head_dim: int, seq_len: int):
    """Causal SDPA forward + backward over q, k, v [1, n_heads, s, head_dim] that require grad."""
    shape = (1, n_heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def clear() -> None:
        for t in (q, k, v):
            t.grad = None

    def step() -> None:
        clear()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)

    step.clear = clear
    return step


def layer_step(layer: HybridAttention, seq_len: int):
    """The layer's forward + backward on x [1, s, dim]: backward from y with a fixed random
    gradient g (the loss <y, g>), plus for CSA the indexer loss."""
    x = torch.randn(1, seq_len, layer.cfg.dim, requires_grad=True)
    grad = torch.randn(1, seq_len, layer.cfg.dim)

    def clear() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None

    def step() -> None:
        clear()
        y, aux = layer(x, return_aux=True)
        # Backward from y with the gradient g, as the baseline's out.backward(grad): the loss
        # <y, g> without a product [s, dim] of its own.
        outputs, grads = [y], [grad]
        if layer.kind == "csa":
            outputs.append(aux["indexer_loss"])
            grads.append(torch.ones_like(aux["indexer_loss"]))
        torch.autograd.backward(outputs, grads)

    step.clear = clear
    return step


def candidates(args, layers, seq_len: int) -> dict:
    """name -> step at this length: the baseline (unless --no-dense), then each layer kind."""
    steps = {} if args.no_dense else {DENSE: dense_step(args.cfg.n_heads, args.cfg.head_dim, seq_len)}
    steps.update({kind: layer_step(layer, seq_len) for kind, layer in layers.items()})
    return steps


def step_memory(steps: dict) -> dict:
    """name -> the peak growth of the resident set over one step after a warm-up step (bytes, or
    None where it cannot be read); run under `map_blocks_separately`."""
    peaks = {}
    for name, step in steps.items():
        step()
        step.clear()
        with PeakMemory() as memory:
            step()
        step.clear()
        peaks[name] = memory.peak
    return peaks


def measure_memory(argv: list[str]) -> dict:
    """Run this script as the memory worker on the same arguments: {seq_len: {name: bytes}};
    empty (the table shows "-") if the worker fails."""
    run = subprocess.run([sys.executable, __file__, *argv, "--memory-worker"], stdout=subprocess.PIPE,
                         text=True, check=False)
    if run.returncode != 0:
        print(f"bench_train: the memory worker failed (exit {run.returncode}); peaks not shown",
              file=sys.stderr)
        return {}
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["length"]: row["peaks"] for row in rows}


def memory_worker(args) -> int:
    if not map_blocks_separately():
        print("bench_train: glibc refused the memory settings", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    layers = {kind: HybridAttention(args.cfg, KINDS.index(kind)).train() for kind in args.kinds}
    for seq_len in args.lengths:
        print(f"  memory at {seq_len}", end="\r", file=sys.stderr, flush=True)
        print(json.dumps({"length": seq_len, "peaks": step_memory(candidates(args, layers, seq_len))}),
              flush=True)
    print(" " * 40, end="\r", file=sys.stderr)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="sequence lengths in tokens (default: 4096 8192 16384 32768; "
                             "512 1024 with --quick)")
    parser.add_argument("--kinds", nargs="+", default=list(TRAIN_KINDS), choices=TRAIN_KINDS,
                        help="layer kinds to run (default: csa hca window)")
    parser.add_argument("--preset", default="small", help="attention preset (default: small)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per length (default: 2)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baseline")
    parser.add_argument("--allocator", choices=("retain", "system"), default="retain",
                        help="retain: glibc keeps freed memory for reuse (`retain_freed_memory`), for "
                             "the baseline and the layers alike; system: glibc's defaults, where each "
                             "tensor over 32 MB is a fresh, zero-filled mmap (default: retain)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny preset, one round, lengths 512 1024 unless given")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.rounds = "tiny", 1
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    if min(args.lengths) < 1 or args.rounds < 1:
        parser.error("--lengths and --rounds must be positive")
    args.cfg = demo_config(args.preset)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    peaks_by_length = measure_memory(argv)
    retained = args.allocator == "retain" and retain_freed_memory()
    cfg = args.cfg
    print(f"# bench_train: {cpu_name()} (CPU), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads | preset {args.preset}: {cfg.n_heads} heads x {cfg.head_dim}, window "
          f"{cfg.window_size}, top-k {cfg.index_topk}, ratios CSA {cfg.csa_ratio} / HCA "
          f"{cfg.compress_ratios[KINDS.index('hca')]} | fp32, batch 1, forward + backward, "
          f"median of {args.rounds} round(s) | peak MB: one step's working memory (a process of its "
          f"own, after a warm-up step) | allocator: "
          f"{'glibc keeping freed memory' if retained else 'glibc defaults'}")
    print(f"{'tokens':>7} {'step':>12} {'time s':>9} {'/ dense':>8} {'peak MB':>9} {'/ dense':>8}")
    torch.manual_seed(0)
    layers = {kind: HybridAttention(cfg, KINDS.index(kind)).train() for kind in args.kinds}
    for seq_len in args.lengths:
        steps = candidates(args, layers, seq_len)
        peaks = peaks_by_length.get(seq_len, {})
        for name, step in steps.items():
            print(f"  warm-up {name} at {seq_len}", end="\r", file=sys.stderr, flush=True)
            step()
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        print(" " * 40, end="\r", file=sys.stderr)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name in steps:
            ratio = f"{medians[name] / medians[DENSE]:.3f}" if DENSE in medians else "-"
            peak = peaks.get(name)
            peak_ratio = (f"{peak / peaks[DENSE]:.3f}" if peaks.get(DENSE) and peak is not None else "-")
            peak_text = f"{peak / MB:.0f}" if peak is not None else "-"
            print(f"{seq_len:>7} {name:>12} {medians[name]:>9.3f} {ratio:>8} {peak_text:>9} {peak_ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

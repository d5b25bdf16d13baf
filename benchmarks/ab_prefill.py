"""Prefill time of one layer kind at two commits, interleaved: is a change faster, or was the host
just quieter?

    python benchmarks/ab_prefill.py --base 19933aa                     # CSA at 32K, base vs working tree
    python benchmarks/ab_prefill.py --base HEAD~3 --kind hca --rounds 6
    python benchmarks/ab_prefill.py --base HEAD~1 --train --length 16384   # training steps

The base commit is checked out into a temporary git worktree. Each round starts one process on
the base code and one on the working tree (in alternating order); each process builds the
"small" layer with the same seed, warms up, and times `--calls` prefills of the same random
input (fp32, no_grad). A slow spell of a shared host then lands on both sides alike, which
back-to-back runs of two commits cannot promise. Prints every call and the median and minimum
per side, and the ratio of the medians.

--train times a training step instead: forward + backward in train mode, x and every parameter
requiring grad, backward from y with a fixed random gradient (plus the indexer loss for CSA), and
glibc asked to keep freed memory for reuse (`retain_freed_memory`), as `bench_train.py` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter with PYTHONPATH pointing at one source tree.
TIMER = """
import sys, time, torch
import hybrid_attention
from hybrid_attention import HybridAttention
from hybrid_attention.demo import KINDS, demo_config
length, kind, calls, train = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "train"
if train:  # as bench_train.py: glibc keeps freed memory (a base without the helper runs without)
    getattr(hybrid_attention.demo, "retain_freed_memory", lambda: False)()
cfg = demo_config("small")
torch.manual_seed(0)
layer = HybridAttention(cfg, KINDS.index(kind)).train(train)
x = torch.randn(1, length, cfg.dim, requires_grad=train)
g = torch.randn(1, length, cfg.dim)

def call():
    if not train:
        with torch.no_grad():
            return layer(x)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y, aux = layer(x, return_aux=True)
    outputs, grads = [y], [g]
    if kind == "csa":
        outputs.append(aux["indexer_loss"])
        grads.append(torch.ones_like(aux["indexer_loss"]))
    torch.autograd.backward(outputs, grads)

call()
times = []
for _ in range(calls):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
print(hybrid_attention.__file__)
print(" ".join(f"{t:.4f}" for t in times))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="commit to compare the working tree against")
    parser.add_argument("--kind", default="csa", choices=("window", "csa", "hca", "full"))
    parser.add_argument("--length", type=int, default=32768, help="prefill length (default: 32768)")
    parser.add_argument("--rounds", type=int, default=4, help="processes per side (default: 4)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process (default: 3)")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (forward + backward) instead of no_grad prefills")
    args = parser.parse_args(argv)
    if args.length < 1 or args.rounds < 1 or args.calls < 1:
        parser.error("--length, --rounds and --calls must be positive")
    return args


def run_side(tree: Path, args: argparse.Namespace) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree))  # and cwd=tree: `python -c` puts cwd first
    mode = "train" if args.train else "prefill"
    out = subprocess.run([sys.executable, "-c", TIMER, str(args.length), args.kind, str(args.calls), mode],
                         env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.splitlines()
    if not out[0].startswith(str(tree)):  # the import must come from the tree asked for
        raise RuntimeError(f"imported {out[0]}, expected a module under {tree}")
    return [float(t) for t in out[1].split()]


def main(argv=None) -> int:
    args = parse_args(argv)
    found = subprocess.run(["git", "rev-parse", "--short", "--verify", "--quiet", args.base + "^{commit}"],
                           cwd=ROOT, capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"ab_prefill.py: --base {args.base!r} is not a commit of {ROOT}")
    base_rev = found.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ab_prefill_") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), base_rev], cwd=ROOT,
                       check=True)
        try:
            sides = {f"base {base_rev}": (base_tree, []), "working tree": (ROOT, [])}
            what = "training step (forward + backward)" if args.train else "prefill (no_grad)"
            print(f"# {args.kind} {what} of {args.length} tokens, small preset, fp32; "
                  f"{args.rounds} rounds x {args.calls} calls per side")
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    tree, times = sides[name]
                    new = run_side(tree, args)
                    times.extend(new)
                    print(f"round {r + 1} {name:>14}: " + " ".join(f"{t:.3f}" for t in new), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    medians = {}
    for name, (_, times) in sides.items():
        medians[name] = statistics.median(times)
        print(f"{name:>14}: median {medians[name]:.3f} s, min {min(times):.3f} s over {len(times)} calls")
    base, new = medians.values()
    print(f"working tree / base (medians): {new / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does `torch.compile` of a training step work, and give the eager gradients? (Not in `make test`:
compiling takes 10-100 s per kind on a 2-core machine.)

    python benchmarks/check_compile.py                 # window, HCA and CSA layers of "tiny"
    python benchmarks/check_compile.py --kinds csa --length 64

For each kind: one eager step (loss = mean(y^2) + indexer loss), then the same step through
`torch.compile`, and the largest difference of the loss and of every gradient. The ops' Python
loops over query blocks and their `int()` reads of positions make Dynamo break the graph around
them, so the compiled step runs those parts eagerly; it is correct, not faster.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hybrid_attention import AttentionConfig, HybridAttention


def compare(layer: HybridAttention, x: torch.Tensor) -> tuple[float, float, float, bool]:
    """(seconds to compile and run, loss difference, worst relative gradient difference, equal)."""

    def loss(x):
        y, aux = layer(x, return_aux=True)
        return y.square().mean() + aux["indexer_loss"]

    def grads(fn):
        layer.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        value = fn(leaf)
        value.backward()
        return value.detach(), [leaf.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    eager_loss, eager = grads(loss)
    start = time.perf_counter()
    compiled_loss, compiled = grads(torch.compile(loss))
    seconds = time.perf_counter() - start
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                for a, b in zip(eager, compiled, strict=True))
    ok = len(eager) == len(compiled) and worst <= 1e-5
    return seconds, float((eager_loss - compiled_loss).abs()), worst, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["window", "hca", "csa"],
                        choices=["window", "hca", "csa"], help="layer kinds (default: all three)")
    parser.add_argument("--length", type=int, default=37, help="tokens per step (default: 37)")
    args = parser.parse_args(argv)
    cfg = AttentionConfig.preset("tiny")
    print(f"# check_compile: torch {torch.__version__}, preset tiny, batch 2, {args.length} tokens")
    failures = 0
    for kind in args.kinds:
        torch.manual_seed(0)
        layer = HybridAttention(cfg, next(i for i in range(cfg.n_total_layers) if cfg.layer_kind(i) == kind))
        seconds, loss_diff, worst, ok = compare(layer, torch.randn(2, args.length, cfg.dim))
        failures += not ok
        print(f"{kind:>7}: compiled in {seconds:.0f} s, loss difference {loss_diff:.1e}, worst relative "
              f"gradient difference {worst:.1e}: {'equal' if ok else 'DIFFERENT'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU indexer's routes in one process: fp32 GEMMs, exact int8 GEMMs, and int8 GEMMs with the
fused epilogue; a CSA layer's prefill with quant="official" and the indexer op alone, interleaved
so that every route sees the same host.

    python benchmarks/ab_indexer.py                    # 32K tokens, 3 rounds
    python benchmarks/ab_indexer.py --length 8192 --rounds 2

Routes (ops/indexer_topk/cpu.py): "fp32" (`USE_INT8 = False`, `FUSE_EPILOGUE = False`: the
reference's fp32 GEMMs and eager passes), "int8" (exact int8 GEMMs, eager ReLU / weighting / head
sum) and "int8+fused" (the same GEMMs, the epilogue compiled into one loop: the default). Each
round runs them back to back in a rotating order and checks that the layer outputs and the picks
are bit-identical. Shapes: the "small" preset's CSA layer (8 x 64 indexer, top-64, ratio 4),
batch 1, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import cpu_name  # noqa: E402

from hybrid_attention import AttentionConfig, HybridAttention  # noqa: E402
from hybrid_attention.ops import FP4Keys, indexer_topk  # noqa: E402
from hybrid_attention.ops.indexer_topk import cpu  # noqa: E402
from hybrid_attention.quant import fake_quant_fp4, hadamard_rotate  # noqa: E402


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=32768, help="prefill tokens (default: 32768)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.length < 8 or args.rounds < 1:
        p.error("--length must be >= 8 and --rounds >= 1")
    if not cpu.int8_gemm_is_fast():
        print("# note: this CPU has no int8 dot-product instructions (VNNI / AMX); the layer would "
              "not take the int8 route by default")
    torch.manual_seed(args.seed)
    cfg = AttentionConfig.preset("small", compress_ratios=[4], n_layers=1, quant="official")
    layer = HybridAttention(cfg, 0).eval()
    x = torch.randn(1, args.length, cfg.dim)
    # The op alone, on inputs as the layer has them: Hadamard-rotated, FP4 with block scales.
    s, t = args.length, args.length // cfg.csa_ratio
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    q = fake_quant_fp4(hadamard_rotate(torch.randn(1, s, hi, di)), block=32)
    weights = torch.randn(1, s, hi) * (di * hi) ** -0.5
    keys = FP4Keys.quantize(hadamard_rotate(torch.randn(1, t, di)))
    visible = ((torch.arange(s) + 1) // cfg.csa_ratio)[None].int()

    print(f"# ab_indexer.py, {time.strftime('%Y-%m-%d')}, {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | small CSA layer, quant official, {args.length} tokens, "
          f"batch 1, fp32 | {args.rounds} rounds, routes rotating")
    routes = {"fp32": (False, False), "int8": (True, False), "int8+fused": (True, True)}
    times = {(what, route): [] for what in ("layer", "op") for route in routes}

    def take(route: str) -> None:
        cpu.USE_INT8, cpu.FUSE_EPILOGUE = routes[route]

    with torch.no_grad():
        for route in routes:  # warm-up (and the fused epilogue's compilation)
            take(route)
            layer(x[:, :4096])
        names = list(routes)
        for r in range(args.rounds):
            outs = {}
            for route in names[r % 3:] + names[:r % 3]:
                take(route)
                seconds, outs[("layer", route)] = timed(lambda: layer(x))
                times[("layer", route)].append(seconds)
                seconds, outs[("op", route)] = timed(lambda: indexer_topk(q, weights, keys, cfg.index_topk,
                                                                        visible))
                times[("op", route)].append(seconds)
            for what in ("layer", "op"):
                if not all(torch.equal(outs[(what, "fp32")], outs[(what, route)]) for route in routes):
                    print(f"error: the {what}'s output differs between the routes", file=sys.stderr)
                    return 1
    cpu.USE_INT8, cpu.FUSE_EPILOGUE = cpu.int8_gemm_is_fast(), True
    print(f"{'':<22}" + "".join(f"{route + ' s':>14}" for route in routes) + f"{'fused / fp32':>14}"
          f"{'fused / int8':>14}")
    for what, name in (("layer", "CSA layer prefill"), ("op", "indexer_topk op")):
        med = {route: statistics.median(times[(what, route)]) for route in routes}
        print(f"{name:<22}" + "".join(f"{med[route]:>14.3f}" for route in routes)
              + f"{med['int8+fused'] / med['fp32']:>13.2f}x{med['int8+fused'] / med['int8']:>13.2f}x")
    print("outputs and picks: bit-identical in every round")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU indexer's int8 route against its fp32 route, in one process: a CSA layer's prefill with
quant="official", and the indexer op alone, interleaved so that both see the same host.

    python benchmarks/ab_indexer_int8.py                    # 32K tokens, 3 rounds
    python benchmarks/ab_indexer_int8.py --length 8192 --rounds 2

Each round times the fp32 route (`ops.indexer_topk.cpu.USE_INT8 = False`: the reference's fp32
GEMMs) and the int8 route (exact int8 GEMMs, see ops/indexer_topk/cpu.py) back to back, in
alternating order, and checks that the layer outputs and the picks are bit-identical. Shapes: the
"small" preset's CSA layer (8 x 64 indexer, top-64, ratio 4), batch 1, fp32.
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

    print(f"# ab_indexer_int8.py, {time.strftime('%Y-%m-%d')}, {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | small CSA layer, quant official, {args.length} tokens, "
          f"batch 1, fp32 | {args.rounds} rounds, routes alternating")
    times = {("layer", False): [], ("layer", True): [], ("op", False): [], ("op", True): []}
    with torch.no_grad():
        for use in (False, True):  # warm-up
            cpu.USE_INT8 = use
            layer(x[:, :2048])
        for r in range(args.rounds):
            outs = {}
            for use in ((False, True) if r % 2 == 0 else (True, False)):
                cpu.USE_INT8 = use
                seconds, outs[("layer", use)] = timed(lambda: layer(x))
                times[("layer", use)].append(seconds)
                seconds, outs[("op", use)] = timed(lambda: indexer_topk(q, weights, keys, cfg.index_topk,
                                                                      visible))
                times[("op", use)].append(seconds)
            for what in ("layer", "op"):
                if not torch.equal(outs[(what, False)], outs[(what, True)]):
                    print(f"error: the {what}'s output differs between the routes", file=sys.stderr)
                    return 1
    cpu.USE_INT8 = cpu.int8_gemm_is_fast()
    print(f"{'':<26}{'fp32 route s':>14}{'int8 route s':>14}{'speed-up':>10}")
    for what, name in (("layer", "CSA layer prefill"), ("op", "indexer_topk op")):
        a, b = statistics.median(times[(what, False)]), statistics.median(times[(what, True)])
        print(f"{name:<26}{a:>14.3f}{b:>14.3f}{a / b:>9.2f}x")
    print("outputs and picks: bit-identical in every round")
    return 0


if __name__ == "__main__":
    sys.exit(main())

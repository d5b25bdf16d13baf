"""bf16 layers against fp32 layers on the CPU, in one process: prefill time of each layer kind.

    python benchmarks/ab_bf16.py                      # 32K tokens, window / CSA / HCA, 3 rounds
    python benchmarks/ab_bf16.py --length 16384 --rounds 2

The same weights in both dtypes ("small" preset, batch 1, no_grad), the routes interleaved in
alternating order within each round; the median per kind and the ratio bf16 / fp32 (below 1: bf16
is faster). bf16 pays where the CPU has bf16 GEMM instructions (AVX512-BF16, AMX); the header says
which it has. Also printed: the bf16 output's largest difference from the fp32 output, relative to
the fp32 output's largest magnitude (bf16 rounding, to show both compute the same layer).
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

from hybrid_attention import HybridAttention  # noqa: E402
from hybrid_attention.demo import KINDS, demo_config  # noqa: E402


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown"
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    flags = lines[0].split(":", 1)[1].split() if lines else []
    have = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8") if f in flags]
    return ", ".join(have) or "no bf16 / int8 GEMM instructions"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=32768, help="prefill tokens (default: 32768)")
    p.add_argument("--kinds", nargs="+", default=["window", "csa", "hca"], choices=["window", "csa", "hca"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.length < 2 or args.rounds < 1:
        p.error("--length must be >= 2 and --rounds >= 1")
    cfg = demo_config("small")
    print(f"# ab_bf16.py, {time.strftime('%Y-%m-%d')}, {cpu_name()} ({cpu_flags()}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | small preset, "
          f"{args.length} tokens, batch 1, quant none | {args.rounds} rounds, dtypes alternating")
    print(f"{'kind':<8}{'fp32 s':>10}{'bf16 s':>10}{'bf16/fp32':>11}{'rel diff':>10}")
    torch.manual_seed(args.seed)
    x = torch.randn(1, args.length, cfg.dim)
    for kind in args.kinds:
        torch.manual_seed(args.seed)
        fp32 = HybridAttention(cfg, KINDS.index(kind)).eval()
        bf16 = HybridAttention(cfg, KINDS.index(kind), dtype=torch.bfloat16).eval()
        bf16.load_state_dict({k: v.to(bf16.state_dict()[k].dtype) for k, v in fp32.state_dict().items()})
        layers = {"fp32": (fp32, x), "bf16": (bf16, x.bfloat16())}
        times = {"fp32": [], "bf16": []}
        outs = {}
        with torch.no_grad():
            for layer, inp in layers.values():  # warm-up
                layer(inp[:, :2048])
            for r in range(args.rounds):
                for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                    layer, inp = layers[name]
                    start = time.perf_counter()
                    outs[name] = layer(inp)
                    times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        diff = float((outs["bf16"].float() - outs["fp32"]).abs().max() / outs["fp32"].abs().max())
        print(f"{kind:<8}{a:>10.3f}{b:>10.3f}{b / a:>10.2f}x{diff:>10.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

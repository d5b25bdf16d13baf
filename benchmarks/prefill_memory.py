"""Peak resident memory of one long prefill, measured in a process that does nothing else.

    python benchmarks/prefill_memory.py                  # "small" CSA layer, 131,072 tokens

Builds one layer of the preset (default: the "small" preset's first CSA layer), makes random
hidden states x [batch, seq_len, dim] in fp32, and runs `layer(x)` under no_grad. Prints the
process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's high-water mark
over the whole process, so imports, weights and x are included) and the prefill time. Exits with
status 1 when the peak passes `--limit-gb` (issue 2 asks for under 6 GB at 131,072 tokens).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from hybrid_attention import AttentionConfig, HybridAttention

GB = 10**9  # decimal: the "6 GB" read strictly


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=131072, help="prefill length (default: 131072)")
    parser.add_argument("--kind", default="csa", choices=("csa", "hca", "window", "full"),
                        help="layer kind: the preset's first layer of this kind (default: csa)")
    parser.add_argument("--preset", default="small", help="config preset (default: small)")
    parser.add_argument("--batch", type=int, default=1, help="sequences (default: 1)")
    parser.add_argument("--query-block-size", type=int, default=0,
                        help="override the config's query_block_size; 0 = the preset's")
    parser.add_argument("--limit-gb", type=float, default=6.0,
                        help="fail (exit 1) when peak RSS passes this many GB (default: 6)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = AttentionConfig.preset(args.preset, quant="none")
    if args.kind == "full":
        cfg = cfg.replace(compress_ratios=[*cfg.compress_ratios, "full"])
    if args.query_block_size:
        cfg = cfg.replace(query_block_size=args.query_block_size)
    layer_id = next(i for i in range(cfg.n_total_layers) if cfg.layer_kind(i) == args.kind)
    torch.manual_seed(0)
    layer = HybridAttention(cfg, layer_id).eval()
    x = torch.randn(args.batch, args.seq_len, cfg.dim)
    before = peak_rss_bytes()

    with torch.no_grad():
        start = time.perf_counter()
        y = layer(x)
        seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    ok = peak < args.limit_gb * GB
    print(f"prefill: preset {args.preset!r} layer {layer_id} ({args.kind}), batch {args.batch}, "
          f"{args.seq_len} tokens, fp32, no_grad, query block {cfg.query_block_size}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"x: {x.nbytes / GB:.2f} GB, output {tuple(y.shape)}")
    print(f"peak RSS before the prefill (imports, weights, x): {before / GB:.2f} GB")
    print(f"peak RSS of the process: {peak / GB:.2f} GB (limit {args.limit_gb:g} GB: "
          f"{'ok' if ok else 'EXCEEDED'})")
    print(f"prefill time: {seconds:.1f} s ({args.batch * args.seq_len / seconds:.0f} tokens/s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode speed and cache bytes per token of the engine: the "small" hybrid model against the same
model with full attention in every layer, at contexts 4K..128K, in one run.

Each sequence's paged cache is filled to the context length with random entries in the storage
format of its pool (a decode step's cost does not depend on the values, and prefilling 128K tokens
through five dense layers would take hours on a CPU); then whole-model decode steps (embedding,
every layer, LM head) are timed. Cache bytes are the sequence's measured bytes, checked against the
planner's prediction for the same config, precision and length.

    python benchmarks/bench_engine.py                     # 4K..128K, fp32 storage
    python benchmarks/bench_engine.py --quant official    # FP8 KV / FP4 indexer keys, bf16 model
    python benchmarks/bench_engine.py --quant official --lengths 131072 1048576 --no-full --ab-decoded

`--no-full` leaves the full-attention model out (its cache at 1M is about 40 GB). `--ab-decoded`
adds a column: the hybrid model's step with `cache.KEEP_DECODED` off, i.e. decoding every stored
indexer key and HCA entry again at every step, as the engine did before it kept decoded copies.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_prefill import cpu_name  # benchmarks/ is on sys.path when a script runs

from hybrid_attention import AttentionConfig, HybridTransformer, ModelConfig
from hybrid_attention import cache as cache_module
from hybrid_attention.cache import PagedKVCache
from hybrid_attention.model import forward_ragged
from hybrid_attention.planner import kv_cache_bytes_by_type


def fill(model, states, length: int, generator: torch.Generator) -> None:
    """Put `length` tokens' worth of random entries into one sequence's paged states."""
    for block, state in zip(model.layers, states, strict=True):
        ratio = block.attn.ratio
        for rows, count in ((state.kv, length), (state.compressed, length // max(ratio, 1)),
                            (state.index_keys, length // max(ratio, 1))):
            if rows is None:
                continue
            for start in range(0, count, 8192):
                n = min(8192, count - start)
                rows.append(torch.randn(1, n, rows.pool.codec.width, generator=generator).to(rows.dtype))
        if state.kind != "full":
            window = state.window
            rows = torch.randn(1, min(window.size(1), length), window.size(2), generator=generator)
            state.write_window(length, rows.to(state.dtype))
        state.pos = length


def decode_time(model, states, steps: int, warmup: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            token = torch.randint(0, model.cfg.vocab_size, (1,))
            start = time.perf_counter()
            forward_ragged(model, [token], [states])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072],
                        help="context lengths to measure")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per point (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    parser.add_argument("--quant", choices=("none", "official"), default="none",
                        help="official: FP8 KV / FP4 keys storage and a bf16 model")
    parser.add_argument("--preset", default="small", help="model preset")
    parser.add_argument("--no-full", action="store_true",
                        help="leave out the full-attention model (its cache at 1M is about 40 GB)")
    parser.add_argument("--ab-decoded", action="store_true",
                        help="also time the hybrid model without the decoded copies of the indexer keys "
                             "and HCA entries (cache.KEEP_DECODED off)")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.quant == "official" else torch.float32
    longest = max(args.lengths) + args.warmup + args.steps + 1
    attention = AttentionConfig.preset(args.preset, quant=args.quant, max_seq_len=max(longest, 1 << 20))
    dense_attention = attention.replace(compress_ratios=["full"] * attention.n_total_layers)
    models = {}
    for name, att in (("hybrid", attention), ("full", dense_attention)):
        if name == "full" and args.no_full:
            continue
        torch.manual_seed(0)
        models[name] = HybridTransformer(ModelConfig.preset(args.preset, attention=att)).to(dtype).eval()
    runs = [("hybrid", "hybrid", True)] + ([("no copy", "hybrid", False)] if args.ab_decoded else []) \
        + ([("full", "full", True)] if "full" in models else [])
    print(f"# engine decode | {cpu_name()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | preset {args.preset} | quant {args.quant} | {dtype} | "
          f"median of {args.steps} steps" + (" | no copy: hybrid with cache.KEEP_DECODED off"
                                             if args.ab_decoded else ""))
    ab_columns = f" {'no copy ms':>11} {'/ hybrid':>9}" if args.ab_decoded else ""
    print(f"{'context':>8} {'hybrid ms':>10}{ab_columns} {'full ms':>10} {'speedup':>8} {'hybrid B/tok':>13} "
          f"{'full B/tok':>11} {'ratio':>7} {'= planner':>10}")
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        row = {}
        for label, name, keep in runs:
            model = models[name]
            cache_module.KEEP_DECODED = keep
            try:
                cache = PagedKVCache(model, _budget(model, length + args.warmup + args.steps + 1),
                                     max_sequences=1, page_entries=256)
                seq = cache.allocate(length + args.warmup + args.steps + 1)
                states = cache.states(seq)
            finally:
                cache_module.KEEP_DECODED = True
            fill(model, states, length, generator)
            measured = cache.nbytes_by_type(seq)
            predicted = kv_cache_bytes_by_type(model.cfg.attention, length, 1,
                                               None if args.quant == "official" else {"all": "fp32"})
            matches = measured == {k: v for k, v in predicted.items() if v}
            seconds = decode_time(model, states, args.steps, args.warmup)
            row[label] = (seconds, sum(measured.values()), matches)
            del cache, states
        h_t, h_b, h_ok = row["hybrid"]
        line = f"{length:>8} {h_t * 1e3:>10.1f}"
        if args.ab_decoded:
            line += f" {row['no copy'][0] * 1e3:>11.1f} {row['no copy'][0] / h_t:>8.2f}x"
        if "full" in row:
            f_t, f_b, f_ok = row["full"]
            line += (f" {f_t * 1e3:>10.1f} {f_t / h_t:>7.2f}x {h_b / length:>13,.0f} {f_b / length:>11,.0f}"
                     f" {h_b / f_b:>7.3f} {str(h_ok and f_ok):>10}")
        else:
            line += f" {'-':>10} {'-':>8} {h_b / length:>13,.0f} {'-':>11} {'-':>7} {str(h_ok):>10}"
        print(line, flush=True)


def _budget(model, tokens: int) -> int:
    """Enough bytes for one sequence of `tokens` tokens, with slack for page rounding."""
    att = model.cfg.attention
    per_token = 0.0
    width = att.head_dim * 4 + 64
    for i in range(att.n_total_layers):
        kind = att.layer_kind(i)
        per_token += {"full": 1.0, "csa": 0.25 + 0.25, "hca": 1 / 128, "window": 0.0}[kind] * width
    return int(per_token * tokens * 1.3) + (64 << 20)


if __name__ == "__main__":
    main()

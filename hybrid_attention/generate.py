"""`hybrid-attention generate`: serve random prompts through the Engine, beside a dense model."""

from __future__ import annotations

import time

import torch

from .engine import Engine
from .model import HybridTransformer


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small", help="model preset (tiny, small; default small)")
    parser.add_argument("--checkpoint", help="a .safetensors file of HybridTransformer weights "
                        "(default: random weights)")
    parser.add_argument("--prompt-len", type=int, default=65536, help="tokens in the random prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--batch", type=int, default=1, help="identical-length prompts served together")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per engine step")
    parser.add_argument("--cache-gib", type=float, default=4.0, help="cache budget in GiB")
    parser.add_argument("--quant", choices=("none", "official"), default="none",
                        help="official: FP8 / FP4 cache storage (and the matching rounding)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the dense model (every layer 'full') served the same way")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and prompt")


def run(args) -> int:
    from .config import AttentionConfig, ModelConfig

    if args.prompt_len < 1 or args.new_tokens < 1:
        raise ValueError("--prompt-len and --new-tokens must be >= 1")
    attention = AttentionConfig.preset(args.preset, quant=args.quant)
    attention = attention.replace(max_seq_len=max(attention.max_seq_len, args.prompt_len + args.new_tokens))
    cfg = ModelConfig.preset(args.preset, attention=attention)
    rows = [("hybrid", cfg)]
    if not args.no_baseline:
        dense = attention.replace(compress_ratios=["full"] * attention.n_total_layers)
        rows.append(("dense (all layers full)", ModelConfig.preset(args.preset, attention=dense)))
    print(f"# hybrid-attention generate: preset={args.preset} quant={args.quant} prompt={args.prompt_len} "
          f"new={args.new_tokens} batch={args.batch} threads={torch.get_num_threads()}")
    reports = []
    for name, model_cfg in rows:
        torch.manual_seed(args.seed)
        model = HybridTransformer(model_cfg)
        if args.checkpoint and name == "hybrid":
            from safetensors.torch import load_file
            model.load_state_dict(load_file(args.checkpoint))
        engine = Engine(model, cache_bytes=int(args.cache_gib * (1 << 30)), max_batch=args.batch,
                        prefill_chunk=args.prefill_chunk)
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, model_cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
                   for _ in range(args.batch)]
        progress = _Progress(name, args.new_tokens * args.batch)
        start = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens=args.new_tokens, on_token=progress.tick)
        elapsed = time.perf_counter() - start
        progress.close()
        errors = [r.error for r in results if r.error]
        if errors:
            raise ValueError(f"{name}: {errors[0]}")
        ttft = max(r.time_to_first_token for r in results)
        decode_time = max(r.total_time for r in results) - ttft
        decoded = sum(len(r.tokens) - 1 for r in results)
        cache = results[0].cache_bytes
        reports.append((name, ttft, decoded / decode_time if decode_time > 0 else float("nan"),
                        elapsed, cache))
    print(f"{'model':<26}{'TTFT s':>10}{'decode tok/s':>14}{'total s':>10}{'cache bytes/token':>19}")
    for name, ttft, tps, elapsed, cache in reports:
        per_token = sum(cache.values()) / (args.prompt_len + args.new_tokens)
        print(f"{name:<26}{ttft:>10.2f}{tps:>14.2f}{elapsed:>10.2f}{per_token:>19,.0f}")
    for name, *_, cache in reports:
        parts = ", ".join(f"{k} {v:,}" for k, v in cache.items())
        print(f"cache of one sequence, {name}: {sum(cache.values()):,} bytes ({parts})")
    if len(reports) == 2:
        h, d = reports
        print(f"hybrid / dense: TTFT {h[1] / d[1]:.3f}x, decode speed {h[2] / d[2]:.2f}x, "
              f"cache {sum(h[4].values()) / sum(d[4].values()):.3f}x")
    return 0


class _Progress:
    """A one-line progress bar on stderr for generated tokens."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, total, 0

    def tick(self, request: int, token: int) -> None:
        import sys

        self.done += 1
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r{self.name:<26}[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        import sys

        sys.stderr.write("\n")

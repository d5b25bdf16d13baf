"""One transformers DeepseekV4ForCausalLM, native against `hybrid_attention.hf.apply_to`: prefill time
and peak memory by length, and decode time per token after the longest prefill, with the ratios.

    python benchmarks/bench_hf.py                  # prefill at 8K and 16K, decode at 16K context
    python benchmarks/bench_hf.py --quick          # a smoke run at 256 and 512 tokens

The model is a random DeepseekV4ForCausalLM with one layer of each kind (window, CSA, HCA), batch 1,
fp32, no_grad, built once; the patched model is a deep copy of it with every DeepseekV4Attention
replaced (quant="none": the same numbers). Both run the same MoE, hyper-connections, embedding and
head, so the ratios are those of the whole model, attention and all. Each prefill runs once (a
16K prefill of the native model takes minutes on a small CPU), after a short warm-up; decode steps
continue the longest prefill's cache (transformers' own, or the project's states behind it) and the
median step is shown. Peak memory is the growth of the resident set over the call
(`hybrid_attention.demo.PeakMemory`); it includes transformers' eager attention mask for the native
model (the patched model builds none, only the padding).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import cpu_name  # noqa: E402

from hybrid_attention import hf  # noqa: E402
from hybrid_attention.demo import PeakMemory, peak_memory_method  # noqa: E402

DEFAULT_LENGTHS = (8192, 16384)
QUICK_LENGTHS = (256, 512)
MB = 1 << 20
MODEL_SHAPES = {  # --size -> DeepseekV4Config fields
    "bench": dict(hidden_size=512, num_attention_heads=2, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128,
                  o_groups=2, o_lora_rank=128, index_n_heads=4, index_head_dim=64, index_topk=128,
                  sliding_window=128, moe_intermediate_size=256, n_routed_experts=4, num_experts_per_tok=2,
                  vocab_size=1024, hc_mult=2),
    "tiny": dict(hidden_size=32, num_attention_heads=2, head_dim=32, qk_rope_head_dim=8, q_lora_rank=16,
                 o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=16, index_topk=4,
                 sliding_window=16, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                 vocab_size=128, hc_mult=2),
}


def build_model(size: str, seed: int):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        **MODEL_SHAPES[size], num_hidden_layers=3,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=1 << 20, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts sinks and biases at zero: make the run realistic
        for name, p in model.named_parameters():
            if "position_bias" in name or "sinks" in name:
                p.normal_()
    return model


def measure(fn) -> tuple[float, int | None, object]:
    """(seconds, peak RSS growth in bytes, result) of one call."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak, result


def format_row(cells) -> str:
    widths = (8, 8, 9, 11, 8, 24)
    return " ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="prefill lengths in tokens; decode continues the longest (default: 8192 16384)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: lengths {' '.join(map(str, QUICK_LENGTHS))} and the tiny model")
    parser.add_argument("--size", default="bench", choices=sorted(MODEL_SHAPES),
                        help="model shapes (default: bench; --quick uses tiny)")
    parser.add_argument("--decode-steps", type=int, default=8,
                        help="decode steps after the longest prefill; the median is shown (default: 8)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                        help="the patched layers' backend (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.size = list(QUICK_LENGTHS), "tiny"
    if min(args.lengths) < 2 or args.decode_steps < 1:
        parser.error("lengths must be >= 2 and --decode-steps positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    native = build_model(args.size, args.seed)
    patched = hf.apply_to(copy.deepcopy(native), backend=args.backend, quant="none")
    cfg = native.config
    print(f"# device: {cpu_name()} (CPU), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads | DeepseekV4ForCausalLM: hidden "
          f"{cfg.hidden_size}, 3 layers (window, CSA, HCA), {cfg.num_attention_heads} heads x "
          f"{cfg.head_dim}, "
          f"window {cfg.sliding_window}, CSA ratio 4 top-{cfg.index_topk}, HCA ratio 128, "
          f"{cfg.n_routed_experts} experts | batch 1, fp32, no_grad | native: eager attention | patched: "
          f"hf.apply_to(quant='none', backend={args.backend!r}) | peak = RSS growth "
          f"({peak_memory_method()}) | prefill: one run after a warm-up; decode: median of "
          f"{args.decode_steps} steps")
    print(format_row(("tokens", "phase", "model", "time", "peak MB", "vs native")))
    torch.manual_seed(args.seed + 1)
    longest = max(args.lengths)
    ids = torch.randint(1, cfg.vocab_size, (1, longest))
    with torch.no_grad():
        for model in (native, patched):  # warm-up: first calls allocate and pick kernels
            model(ids[:, :64], use_cache=False)
        for length in sorted(args.lengths):
            results = {}
            for name, model in (("native", native), ("apply_to", patched)):
                keep = length == longest
                seconds, peak, out = measure(lambda m=model, n=length, k=keep: m(ids[:, :n], use_cache=k))
                results[name] = (seconds, peak, out.cache if keep else None)
                del out
            print_rows(length, "prefill", results, "s")
            if length != longest:
                continue
            decode = {}
            for name in ("native", "apply_to"):
                model, cache = (native if name == "native" else patched), results[name][2]
                token = ids[:, -1:]
                times, peaks = [], []
                for _ in range(args.decode_steps):
                    step = lambda m=model, t=token, c=cache: m(t, cache=c, use_cache=True)  # noqa: E731
                    seconds, peak, out = measure(step)
                    token = out.logits[:, -1:].argmax(-1)
                    times.append(seconds)
                    peaks.append(peak or 0)
                decode[name] = (statistics.median(times), max(peaks), None)
            print_rows(longest, "decode", decode, "ms/token")
    return 0


def print_rows(length: int, phase: str, results: dict, unit: str) -> None:
    base_time, base_peak = results["native"][0], results["native"][1]
    for name, (seconds, peak, _) in results.items():
        shown = f"{seconds * 1e3:.1f} ms" if unit == "ms/token" else f"{seconds:.2f} s"
        peak_mb = f"{peak / MB:.0f}" if peak is not None else "n/a"
        if name == "native":
            ratio = "1.00x"
        else:
            ratio = f"{base_time / seconds:.2f}x faster"
        if name != "native" and peak and base_peak:
            ratio += f", {peak / base_peak:.2f}x mem"
        print(format_row((length, phase, name, shown, peak_mb, ratio)))


if __name__ == "__main__":
    raise SystemExit(main())

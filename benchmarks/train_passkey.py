"""Passkey retrieval: the same model trained with four layer schedules on the same budget.

    python benchmarks/train_passkey.py --quick            # a reduced run (1024 tokens, 2-digit keys)
    python benchmarks/train_passkey.py                    # the full comparison (4096 tokens, about an hour)
    python benchmarks/train_passkey.py --out runs/passkey # keep one checkpoint folder per schedule

Schedules (over the model's layers, see `hybrid_attention.train.schedule_ratios`):
  hybrid  HCA / CSA alternating, no window or full layer: retrieval must go through them
  window  every layer a sliding window: the key is out of reach past the window (chance)
  full    every layer dense causal attention
  v4      HCA / CSA alternating with a full last layer

The full comparison follows DeepSeek's recipe in three phases: dense (CSA attends to every visible
entry) while the length grows 128 -> 1024 tokens, the indexer's warm-up (only the indexer trains, on
its KL loss) at 1024, then sparse training (top-k), 400 steps at 2048 tokens and 150 at 4096,
5-digit keys. HCA's
ratio is 128, as in the V4 models (the tiny preset's 8 would let HCA read the digits itself). Its
evaluation goes to 16x the training length; schedules with a full layer stop at 16384 tokens
(`--full-eval-max`), where dense attention's cost starts to dominate the hour.

Each schedule is trained with `hybrid_attention.train.train` (the same seed, data, steps and
learning rate), then evaluated with `hybrid_attention.eval.evaluate` on a needle grid (lengths x
depths, fresh keys): exact-match accuracy of the greedy answer, by length, and the indexer's recall
of the needle's compressed entries. Training tokens/s is measured over the whole run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hybrid_attention.train import curriculum

SCHEDULES = {"hybrid": "hybrid", "window": "window", "full": "full", "v4": "hca,csa,hca,full"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="A reduced run: hybrid and window only, 2-digit keys, 1024 tokens after a length "
                        "curriculum (400 steps at 128, 200 at 512, 300 at 1024), batch 4.")
    p.add_argument("--schedules", default=None,
                   help="Comma-separated, from " + ", ".join(SCHEDULES) + " (default: all; with --quick: "
                        "hybrid,window)")
    p.add_argument("--seq-len", type=int, default=None, help="Training length (default: 4096; --quick 1024).")
    p.add_argument("--digits", type=int, default=None, help="Passkey digits (default: 5; --quick 2).")
    p.add_argument("--steps", type=int, default=None,
                   help="Sparse-phase steps (default: 550; --quick 900).")
    p.add_argument("--dense-steps", type=int, default=None,
                   help="Steps of the recipe's dense phase first (CSA over every entry; default: 550; "
                        "--quick 0).")
    p.add_argument("--indexer-steps", type=int, default=None,
                   help="Steps of the indexer warm-up after it (default: 50; --quick 0).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: 4.")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--curriculum", type=curriculum, default=[], metavar="STEPS:LEN,...",
                   help="Shorter lengths first (hybrid-attention train --curriculum): 300:128 trains "
                        "the first 300 steps at 128 tokens, the rest at --seq-len (default: "
                        "300:128,150:512,150:1024,400:2048; --quick 400:128,200:512).")
    p.add_argument("--window", type=int, default=None, help="Window size (default: the tiny preset's 8).")
    p.add_argument("--hca-ratio", type=int, default=None,
                   help="HCA's compression ratio (default: 128, as in the V4 models: one entry blurs 128 "
                        "tokens, so the key's digits must come through CSA; --quick: the tiny preset's 8).")
    p.add_argument("--eval-lengths", default=None,
                   help="Comma-separated (default: 1x, 2x, 4x, 8x and 16x the training length; --quick "
                        "1x, 2x, 4x).")
    p.add_argument("--full-eval-max", type=int, default=16384,
                   help="Schedules with a full layer are evaluated at lengths up to this only (dense "
                        "attention's cost grows with the square of the length; default: 16384).")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--per-cell", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="Keep a checkpoint folder per schedule here (default: a temporary folder).")
    p.add_argument("--json", action="store_true", help="Also print the results as one JSON object.")
    args = p.parse_args(argv)
    # --quick changes the defaults; flags given explicitly win.
    # The full comparison: the recipe's three phases (dense warm-up at 128 .. 1024 tokens, the
    # indexer warm-up at 1024, sparse training at 2048 then 4096), within an hour on a 2-core CPU.
    defaults = (dict(seq_len=1024, digits=2, steps=900, dense_steps=0, indexer_steps=0, batch_size=4,
                     curriculum=[[400, 128], [200, 512]], hca_ratio=0, eval_multiples=(1, 2, 4))
                if args.quick else
                dict(seq_len=4096, digits=5, steps=550, dense_steps=550, indexer_steps=50, batch_size=4,
                     curriculum=[[300, 128], [150, 512], [150, 1024], [400, 2048]], hca_ratio=128,
                     eval_multiples=(1, 2, 4, 8, 16)))
    for name, value in defaults.items():
        if getattr(args, name, None) in (None, []):
            if name == "curriculum":  # a default stage only where it is shorter than --seq-len
                value = [stage for stage in value if stage[1] < args.seq_len]
            setattr(args, name, value)
    if args.schedules is None:
        args.schedules = "hybrid,window" if args.quick else ",".join(SCHEDULES)
    return args


def main(argv=None) -> int:
    import tempfile

    from hybrid_attention import AttentionConfig
    from hybrid_attention.config import FULL
    from hybrid_attention.eval import evaluate, plot_needle_grid
    from hybrid_attention.train import TrainConfig, train

    args = parse_args(argv)
    names = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCHEDULES]
    if unknown:
        print(f"train_passkey.py: error: unknown schedule {unknown}; known: {list(SCHEDULES)}",
              file=sys.stderr)
        return 2
    lengths = ([int(x) for x in args.eval_lengths.split(",")] if args.eval_lengths
               else [m * args.seq_len for m in args.eval_multiples])
    depths = [float(x) for x in args.depths.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="train_passkey_"))
    overrides = {"max_seq_len": max(lengths + [args.seq_len]) + args.digits}
    if args.window:
        overrides["window_size"] = args.window
    if args.hca_ratio:
        tiny = AttentionConfig.preset("tiny")
        overrides["compress_ratios"] = [args.hca_ratio if r not in (0, FULL, tiny.csa_ratio) else r
                                        for r in tiny.compress_ratios]
    print(f"# train_passkey.py, {time.strftime('%Y-%m-%d')}, {cpu_model()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    first = "".join(f"{n} steps at {length}, then " for n, length in args.curriculum)
    print(f"# tiny model {overrides}, {first}seq_len {args.seq_len}, {args.digits}-digit keys, "
          f"{args.dense_steps} dense + {args.indexer_steps} indexer + {args.steps} sparse steps x "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}; eval {args.per_cell} keys per cell")
    results = {}
    for name in names:
        cfg = TrainConfig(model="tiny", schedule=SCHEDULES[name], overrides=overrides, seq_len=args.seq_len,
                          task_options={"digits": args.digits}, curriculum=args.curriculum,
                          sparse_steps=args.steps,
                          dense_steps=args.dense_steps, indexer_steps=args.indexer_steps,
                          batch_size=args.batch_size, lr=args.lr, warmup_steps=20, weight_decay=0.0,
                          seed=args.seed, out=str(root / name), log_every=25)
        start = time.perf_counter()
        run = train(cfg, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - start
        model = run["model"].eval()
        has_full = any(block.attn.kind == "full" for block in model.layers)
        own = [n for n in lengths if not has_full or n <= args.full_eval_max] or lengths[:1]
        start = time.perf_counter()
        result = evaluate(model, own, depths, per_cell=args.per_cell, seed=args.seed + 1,
                          digits=args.digits)
        result["eval_s"] = time.perf_counter() - start
        plot_needle_grid(result, root / name / "needle.png")
        result["train_tokens_per_s"] = cfg.tokens_before(cfg.total_steps) / seconds
        result["train_s"] = seconds
        result["final_loss"] = run["losses"][-1]["loss"]
        results[name] = result
        print(f"  {name}: trained in {seconds:.0f} s, final loss {result['final_loss']:.4f}, evaluated in "
              f"{result['eval_s']:.0f} s", flush=True)
    header = ("| schedule | " + " | ".join(f"acc @ {n}" for n in lengths)
              + " | indexer recall | by CSA layer | train tok/s |")
    print()
    print(header)
    print("|" + "---|" * (len(lengths) + 4))
    for name, r in results.items():
        accuracy = {int(n): value for n, value in r["accuracy"].items()}
        accs = " | ".join(f"{accuracy[n]:.2f}" if n in accuracy else "-" for n in lengths)
        recall = "-" if r["indexer_recall"] is None else f"{r['indexer_recall']:.2f}"
        by_layer = " / ".join(f"{layer}: {value:.2f}" for layer, value in
                              r["indexer_recall_by_layer"].items())
        print(f"| {name} | {accs} | {recall} | {by_layer or '-'} | {r['train_tokens_per_s']:,.0f} |")
    print(f"\ncheckpoints and needle.png heatmaps in {root}")
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

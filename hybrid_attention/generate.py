"""`hybrid-attention generate`: serve random prompts through the Engine, beside a dense model.

Everything that can be refused is refused before anything is allocated: the numbers by argparse,
a `--checkpoint` by its header (it must hold exactly the model's tensors and shapes), the cache
budget against the planner's count of what the prompts hold, and the run against the memory this
machine has available (MemAvailable in /proc/meminfo) with the planner's estimate of the weights,
the cache and one step's activations; `--force` skips that last check. The two models run one
after the other, each freed before the next is built. A progress line on stderr follows the
prefill (the engine's `on_prefill`) and then the decode (`on_token`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import planner
from .attention import SCORE_BUDGET
from .cli import UsageError, non_negative_int, positive_float, positive_int, seed, token_count
from .config import AttentionConfig, ModelConfig
from .engine import Engine
from .model import HybridTransformer

PRESETS = ("tiny", "small", "v4-flash", "v4-pro")
# The engine reports prefill progress from the version that added `on_prefill`.
ENGINE_REPORTS_PREFILL = "on_prefill" in inspect.signature(Engine.generate).parameters


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small", choices=PRESETS,
                        help="Model shapes: tiny and small run on a CPU; v4-flash and v4-pro are the "
                             "DeepSeek-V4 attention shapes with a dense MLP in place of the experts "
                             "(refused where they do not fit, see --force). Default: %(default)s.")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="A .safetensors file of HybridTransformer weights of --preset for the hybrid "
                             "model (the dense baseline keeps random weights), or a training folder "
                             "(config.json + model.safetensors, as `hybrid-attention train` writes), whose "
                             "own config replaces --preset. Default: random weights.")
    parser.add_argument("--task", choices=("random", "passkey"), default="random",
                        help="What to serve. random: random prompts, timed beside the dense baseline; "
                             "passkey: one passkey prompt of --prompt-len tokens (key at --depth), "
                             "answered greedily, and whether the answer is right. Default: %(default)s.")
    parser.add_argument("--depth", type=fraction, default=0.5,
                        help="With --task passkey: where the key sentence goes in the filler, 0 (start) "
                             "to 1 (end). Default: %(default)s.")
    parser.add_argument("--digits", type=positive_int, default=None,
                        help="With --task passkey: digits of the key. Default: the training run's, else 5.")
    parser.add_argument("--key", default=None,
                        help="With --task passkey: the key itself, digits only. Default: drawn from --seed.")
    parser.add_argument("--prompt-len", type=token_count, default=65536, metavar="TOKENS",
                        help="Tokens in each random prompt: an integer, or with a K or M suffix (128K, "
                             "1M; 1K = 1024). Default: %(default)s.")
    parser.add_argument("--new-tokens", type=positive_int, default=64, metavar="N",
                        help="Tokens to generate for each prompt. Default: %(default)s.")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N",
                        help="Prompts of the same length served together. Default: %(default)s.")
    parser.add_argument("--prefill-chunk", type=positive_int, default=2048, metavar="TOKENS",
                        help="Prompt tokens each request feeds per engine step. Default: %(default)s.")
    parser.add_argument("--cache-gib", type=positive_float, default=4.0, metavar="GIB",
                        help="Cache budget of each model in GiB, allocated whole when its engine "
                             "starts. Default: %(default)s.")
    parser.add_argument("--quant", choices=("none", "official"), default="none",
                        help="Cache storage: none keeps fp32 rows, official stores FP8 / FP4 (with the "
                             "matching rounding). Default: %(default)s.")
    parser.add_argument("--no-baseline", action="store_true",
                        help="Skip the dense model (every layer 'full') that is otherwise served the "
                             "same way.")
    parser.add_argument("--seed", type=seed, default=0,
                        help="Random seed of the weights and the prompts. Default: %(default)s.")
    parser.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                        help="Torch intra-op threads; 0 keeps torch's default. Default: %(default)s.")
    parser.add_argument("--force", action="store_true",
                        help="Run even when the planner's memory estimate exceeds the memory this "
                             "machine has available.")
    parser.add_argument("--no-progress", action="store_true", help="Do not draw the progress line.")


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def run(args) -> int:
    if args.task == "passkey" or (args.checkpoint and Path(args.checkpoint).is_dir()):
        return run_trained(args)
    rows = model_configs(args)
    if args.checkpoint:
        check_checkpoint(args.checkpoint, rows[0][1], args.preset)
    memory = check_memory(rows, args)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# hybrid-attention generate: preset={args.preset} quant={args.quant} prompt={args.prompt_len} "
          f"new={args.new_tokens} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"# memory: {memory}")
    reports = [serve(name, cfg, args) for name, cfg in rows]
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


def model_configs(args) -> list[tuple[str, ModelConfig]]:
    """(name, config) of the hybrid model and, unless --no-baseline, its all-'full' twin."""
    attention = AttentionConfig.preset(args.preset, quant=args.quant)
    attention = attention.replace(max_seq_len=max(attention.max_seq_len, args.prompt_len + args.new_tokens))
    rows = [("hybrid", ModelConfig.preset(args.preset, attention=attention))]
    if not args.no_baseline:
        dense = attention.replace(compress_ratios=["full"] * attention.n_total_layers)
        rows.append(("dense (all layers full)", ModelConfig.preset(args.preset, attention=dense)))
    return rows


def serve(name: str, cfg: ModelConfig, args) -> tuple[str, float, float, float, dict]:
    """Build one model and its engine, serve the prompts; everything is freed on return."""
    torch.manual_seed(args.seed)
    model = HybridTransformer(cfg)
    if args.checkpoint and name == "hybrid":
        model.load_state_dict(load_checkpoint(args.checkpoint))
    try:
        engine = Engine(model, cache_bytes=int(args.cache_gib * (1 << 30)), max_batch=args.batch,
                        prefill_chunk=args.prefill_chunk)
    except ValueError as err:  # every argument was checked; what is left is the budget against the pools
        raise UsageError(f"--cache-gib {args.cache_gib:g} is too small for {name}: {err}") from None
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.batch)]
    progress = Progress(name, args.batch * args.prompt_len, args.batch * args.new_tokens,
                        stream=None if args.no_progress else sys.stderr)
    callbacks = {"on_token": progress.token}
    if ENGINE_REPORTS_PREFILL:
        callbacks["on_prefill"] = progress.prefill
    start = time.perf_counter()
    try:
        results = engine.generate(prompts, max_new_tokens=args.new_tokens, **callbacks)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:  # a request the engine refused: the cache budget cannot hold it
        raise UsageError(f"{name}: {errors[0]} (--cache-gib {args.cache_gib:g})")
    ttft = max(r.time_to_first_token for r in results)
    decode_time = max(r.total_time for r in results) - ttft
    decoded = sum(len(r.tokens) - 1 for r in results)
    return (name, ttft, decoded / decode_time if decode_time > 0 else float("nan"), elapsed,
            results[0].cache_bytes)


# A trained checkpoint and the passkey task ------------------------------------------------------


def run_trained(args) -> int:
    """--checkpoint FOLDER and/or --task passkey: one model (no baseline) through the Engine."""
    from .data import answer_ids, decode, min_passkey_length, passkey_prompt

    folder = Path(args.checkpoint) if args.checkpoint else None
    if folder is not None and not folder.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: --task passkey takes a training folder "
                         f"(config.json + model.safetensors); a .safetensors file goes with --task random")
    trained = _training_arguments(folder) if folder is not None else {}
    passkey = args.task == "passkey"
    digits = len(args.key) if args.key else args.digits or trained.get("task_options", {}).get("digits", 5)
    if args.key is not None and not (args.key.isascii() and args.key.isdigit()):
        raise UsageError(f"--key must be digits only, got {args.key!r}")
    new_tokens = 1 + digits if passkey else args.new_tokens
    if passkey and args.prompt_len < min_passkey_length(digits):
        raise UsageError(f"--prompt-len {args.prompt_len} is too short for a {digits}-digit passkey: the key "
                         f"sentence and the question need {min_passkey_length(digits)} tokens")
    model = _trained_model(folder, args, args.prompt_len + new_tokens)
    args.new_tokens, args.batch = new_tokens, 1
    memory = check_memory([("model", model.cfg)], args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if passkey:
        key = args.key or f"{random.Random(args.seed).randrange(10 ** digits):0{digits}d}"
        sample = passkey_prompt(args.prompt_len, args.depth, key)
        prompt = sample.prompt
    else:
        gen = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
    source = str(folder) if folder is not None else f"preset {args.preset}, random weights"
    print(f"# hybrid-attention generate: {source}, task={args.task} prompt={args.prompt_len} "
          f"new={new_tokens} threads={torch.get_num_threads()}")
    print(f"# memory: {memory}")
    try:
        engine = Engine(model, cache_bytes=int(args.cache_gib * (1 << 30)), max_batch=1,
                        prefill_chunk=args.prefill_chunk)
    except ValueError as err:
        raise UsageError(f"--cache-gib {args.cache_gib:g} is too small for this model: {err}") from None
    progress = Progress("model", args.prompt_len, new_tokens, stream=None if args.no_progress else sys.stderr)
    callbacks = {"on_token": progress.token}
    if ENGINE_REPORTS_PREFILL:
        callbacks["on_prefill"] = progress.prefill
    try:
        result = engine.generate([prompt], max_new_tokens=new_tokens, **callbacks)[0]
    finally:
        progress.close()
    if result.error:
        raise UsageError(f"{result.error} (--cache-gib {args.cache_gib:g})")
    decode_time = result.total_time - result.time_to_first_token
    print(f"time to first token {result.time_to_first_token:.2f} s, decode "
          f"{(len(result.tokens) - 1) / decode_time if decode_time > 0 else float('nan'):.2f} tok/s")
    if not passkey:
        print(f"generated: {result.tokens}")
        return 0
    right = list(result.tokens) == answer_ids(key)
    print(f"needle at depth {sample.depth:.2f} (tokens {sample.needle[0]}-{sample.needle[1]}); "
          f"the pass key is {key}")
    print(f"answer: {decode(result.tokens).strip()!r} ({'right' if right else 'wrong'})")
    return 0


def _training_arguments(folder: Path) -> dict:
    try:
        return json.loads((folder / "train.json").read_text())
    except (OSError, ValueError):
        return {}


def _trained_model(folder: Path | None, args, tokens: int) -> HybridTransformer:
    """The checkpoint's model with room for `tokens`, or the preset with random weights (--seed)."""
    from .data import VOCAB_SIZE
    from .train import load_checkpoint

    if folder is None:
        attention = AttentionConfig.preset(args.preset, quant=args.quant)
        attention = attention.replace(max_seq_len=max(attention.max_seq_len, tokens))
        torch.manual_seed(args.seed)
        return HybridTransformer(ModelConfig.preset(args.preset, attention=attention, vocab_size=VOCAB_SIZE))
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors")):
        raise UsageError(f"--checkpoint {folder}: not a file, and not a training folder (it needs "
                         f"config.json and model.safetensors)")
    try:
        limit = json.loads((folder / "config.json").read_text())["attention"]["max_seq_len"]
        return load_checkpoint(folder, max_seq_len=max(int(limit), tokens))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--checkpoint {folder}: {err}") from None


# Checks before anything is allocated ----------------------------------------------------------


def check_checkpoint(path: str, cfg: ModelConfig, preset: str) -> None:
    """Refuse a --checkpoint that cannot load into `HybridTransformer(cfg)`, reading only the file's
    header: it must be a safetensors file holding exactly the model's tensors, with their shapes."""
    shapes = _checkpoint_shapes(path)
    with torch.device("meta"):  # the model's shapes without allocating its weights
        expected = {key: tuple(t.shape) for key, t in HybridTransformer(cfg).state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = [f"{key} is {list(shapes[key])}, the model's is {list(expected[key])}"
             for key in sorted(expected.keys() & shapes.keys()) if shapes[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of the model's {len(expected)} tensors ({_first(missing)})")
    if unexpected:
        problems.append(f"{_tensors(len(unexpected))} not in the model ({_first(unexpected)})")
    if wrong:
        problems.append(f"{_tensors(len(wrong))} of the wrong shape ({_first(wrong)})")
    if problems:
        raise UsageError(f"--checkpoint {path} does not hold HybridTransformer weights of preset "
                         f"{preset!r}: " + "; ".join(problems))


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _first(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.exists():
        raise UsageError(f"--checkpoint {path}: no such file")
    if not file.is_file():
        raise UsageError(f"--checkpoint {path}: not a file")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except OSError as err:
        raise UsageError(f"--checkpoint {path}: cannot read it ({err})") from None
    except SafetensorError as err:
        raise UsageError(f"--checkpoint {path} is not a safetensors file ({err})") from None


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:  # changed since check_checkpoint read its header
        raise UsageError(f"--checkpoint {path}: cannot read it ({err})") from None


def check_memory(rows: list[tuple[str, ModelConfig]], args) -> str:
    """Refuse a run whose planner estimate exceeds the memory available (unless --force), or whose
    cache budget cannot hold the prompts; returns the estimate as a sentence for the header."""
    context = args.prompt_len + args.new_tokens
    budget = int(args.cache_gib * (1 << 30))
    step = args.batch * min(args.prefill_chunk, args.prompt_len)
    estimates = {name: planner.engine_memory(cfg, context, args.batch, step, budget, SCORE_BUDGET)
                 for name, cfg in rows}
    size = planner.human_bytes
    # The models run one after the other, so the larger of them is the peak.
    name, peak = max(estimates.items(), key=lambda item: item[1]["total"])
    parts = (f"weights {size(peak['weights'])} in fp32 + cache {size(peak['cache_budget'])} + activations "
             f"{size(peak['activations'])}")
    available = available_memory()
    if available is not None and peak["total"] > available and not args.force:
        raise UsageError(f"preset {args.preset!r} needs about {size(peak['total'])} for the {name} model "
                         f"({parts}, the planner's estimate), but this machine has {size(available)} "
                         f"available (MemAvailable); choose a smaller preset or --cache-gib, or pass "
                         f"--force to run anyway")
    for name, est in estimates.items():
        if est["cache_needed"] > budget:
            sequences = f"{args.batch} sequences" if args.batch > 1 else "one sequence"
            raise UsageError(f"{name}: {sequences} of {context:,} tokens (prompt + new) hold at least "
                             f"{size(est['cache_needed'])} of cache, --cache-gib {args.cache_gib:g} holds "
                             f"{size(budget)}; raise --cache-gib or shorten --prompt-len")
    if available is None:
        return f"about {size(peak['total'])} ({parts}); available memory unknown, not checked"
    forced = " (over, --force)" if peak["total"] > available else ""
    return f"about {size(peak['total'])} ({parts}) of {size(available)} available{forced}"


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes, the kernel's estimate of what can be allocated without swapping;
    None where the file cannot be read or has no such line (not Linux, or an old kernel)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if key.strip() == "MemAvailable" and fields and fields[0].isdigit():
            return int(fields[0]) * 1024  # /proc/meminfo counts in kB (KiB)
    return None


# Progress -------------------------------------------------------------------------------------


class Progress:
    """One line on `stream`, redrawn with \\r: the prefill (prompt tokens processed / total,
    tokens/s, time left), then the decode (tokens generated / total, tokens/s, time left). Its
    `prefill` and `token` methods are the engine's `on_prefill` and `on_token`. stream=None draws
    nothing."""

    def __init__(self, name: str, prompt_tokens: int, new_tokens: int, stream=None,
                 clock=time.perf_counter, width: int = 24) -> None:
        self.name, self.stream, self.clock, self.width = name, stream, clock, width
        self.prompt_total, self.decode_total = prompt_tokens, new_tokens
        self.prefilled: dict[int, int] = {}  # request -> prompt tokens processed
        self.decoded = 0
        self.start = clock()
        self.decode_start: float | None = None
        self._drawn = 0  # length of the line on screen
        self._draw("prefill", 0, prompt_tokens, None)

    def prefill(self, request: int, done: int, total: int) -> None:
        self.prefilled[request] = done
        done_all = sum(self.prefilled.values())
        elapsed = self.clock() - self.start
        self._draw("prefill", done_all, self.prompt_total, done_all / elapsed if elapsed > 0 else None)

    def token(self, request: int, token: int) -> None:
        now = self.clock()
        if self.decode_start is None:  # the first token closes the prefill
            self.decode_start = now
        self.decoded += 1
        elapsed = now - self.decode_start
        rate = (self.decoded - 1) / elapsed if elapsed > 0 else None
        self._draw("decode", self.decoded, self.decode_total, rate)

    def close(self) -> None:
        if self.stream is not None and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, phase: str, done: int, total: int, rate: float | None) -> None:
        if self.stream is None:
            return
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        speed = f"{rate:,.1f} tok/s" if rate else "- tok/s"
        left = format_duration((total - done) / rate) if rate else "-"
        line = f"{self.name}: {phase} [{bar}] {done:,}/{total:,} tokens, {speed}, ETA {left}"
        self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self.stream.flush()
        self._drawn = len(line)


def format_duration(seconds: float) -> str:
    """1:05 for 65 s, 1:01:05 past an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

"""`hybrid-attention generate`: serve random prompts through the Engine, beside a dense model.

Everything that can be refused is refused before anything is allocated: the numbers by argparse,
a `--checkpoint` by its header (it must hold exactly the model's tensors and shapes), the cache
budget against the planner's count of what the prompts hold, and the run against the memory this
machine has available (MemAvailable in /proc/meminfo) with the planner's estimate of the weights,
the cache and one step's activations; `--force` skips that last check. The two models run one
after the other, each freed before the next is built. A progress line on stderr follows the
prefill (the engine's `on_prefill`) and then the decode (`on_token`), with the resident memory.

The report of each model (`ServeReport`): time to first token, decode tokens/s, the seconds spent
in the attention layers of each kind (`LayerTimer`), the peak resident memory, and the cache bytes
by storage type beside the planner's count for the same context. `--json` prints it, with the
generated token ids, as one JSON object on stdout (the header lines go to stderr).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
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
    parser.add_argument("--json", action="store_true",
                        help="Print one JSON object on stdout in place of the report: its figures and "
                             "the generated token ids of each model (the header lines go to stderr).")
    parser.add_argument("--context-parallel", action="store_true",
                        help="Under `torchrun --nproc-per-node N`: split the prompt's prefill over the N "
                             "processes (hybrid_attention.distributed), then decode on the last one; "
                             "prints each rank's time, peak memory and bytes moved. No baseline.")


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def run(args) -> int:
    if args.context_parallel:
        from .distributed import run_generate

        return run_generate(args)
    if args.task == "passkey" or (args.checkpoint and Path(args.checkpoint).is_dir()):
        return run_trained(args)
    rows = model_configs(args)
    if args.checkpoint:
        check_checkpoint(args.checkpoint, rows[0][1], args.preset)
    memory = check_memory(rows, args)
    if args.threads:
        torch.set_num_threads(args.threads)

    header = sys.stderr if args.json else sys.stdout  # stdout holds nothing but the JSON object
    print(f"# hybrid-attention generate: preset={args.preset} quant={args.quant} prompt={args.prompt_len} "
          f"new={args.new_tokens} batch={args.batch} threads={torch.get_num_threads()}", file=header)
    print(f"# memory: {memory}", file=header)
    reports = [serve(name, cfg, args) for name, cfg in rows]
    if args.json:
        out = {"task": "random", "preset": args.preset, "checkpoint": args.checkpoint, "quant": args.quant,
               **_run_settings(args), "memory_estimate": memory, "models": [r.to_json() for r in reports]}
        if len(reports) == 2:
            out["hybrid_over_dense"] = _ratios(*reports)
        print(json.dumps(out))
        return 0
    print(f"{'model':<26}{'TTFT s':>10}{'decode tok/s':>14}{'total s':>10}{'cache bytes/token':>19}"
          f"{'peak RSS':>11}")
    for r in reports:
        per_token = sum(r.cache_bytes.values()) / (args.prompt_len + args.new_tokens)
        print(f"{r.name:<26}{r.time_to_first_token:>10.2f}{r.decode_tokens_per_s:>14.2f}{r.total_time:>10.2f}"
              f"{per_token:>19,.0f}{planner.human_bytes(r.peak_rss):>11}")
    print_breakdown(reports)
    if len(reports) == 2:
        ratios = _ratios(*reports)
        print(f"hybrid / dense: TTFT {_times(ratios['time_to_first_token'], 3)}, decode speed "
              f"{_times(ratios['decode_tokens_per_s'], 2)}, cache {_times(ratios['cache_bytes'], 3)}")
    return 0


def _run_settings(args) -> dict:
    return {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
            "prefill_chunk": args.prefill_chunk, "cache_gib": args.cache_gib, "seed": args.seed,
            "threads": torch.get_num_threads()}


def _ratios(hybrid: ServeReport, dense: ServeReport) -> dict[str, float | None]:
    def ratio(a: float, b: float) -> float | None:
        return a / b if math.isfinite(a) and math.isfinite(b) and b else None

    return {"time_to_first_token": ratio(hybrid.time_to_first_token, dense.time_to_first_token),
            "decode_tokens_per_s": ratio(hybrid.decode_tokens_per_s, dense.decode_tokens_per_s),
            "cache_bytes": ratio(sum(hybrid.cache_bytes.values()), sum(dense.cache_bytes.values()))}


def _times(ratio: float | None, digits: int) -> str:
    return f"{ratio:.{digits}f}x" if ratio is not None else "-"


def model_configs(args) -> list[tuple[str, ModelConfig]]:
    """(name, config) of the hybrid model and, unless --no-baseline, its all-'full' twin."""
    attention = AttentionConfig.preset(args.preset, quant=args.quant)
    attention = attention.replace(max_seq_len=max(attention.max_seq_len, args.prompt_len + args.new_tokens))
    rows = [("hybrid", ModelConfig.preset(args.preset, attention=attention))]
    if not args.no_baseline:
        dense = attention.replace(compress_ratios=["full"] * attention.n_total_layers)
        rows.append(("dense (all layers full)", ModelConfig.preset(args.preset, attention=dense)))
    return rows


def serve(name: str, cfg: ModelConfig, args) -> ServeReport:
    """Build one model, serve it --batch random prompts; everything but the report is freed on return."""
    torch.manual_seed(args.seed)
    model = HybridTransformer(cfg)
    if args.checkpoint and name == "hybrid":
        model.load_state_dict(load_checkpoint(args.checkpoint))
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.batch)]
    return serve_prompts(name, model, prompts, args.new_tokens, args)


def serve_prompts(name: str, model: HybridTransformer, prompts: list[list[int]], new_tokens: int, args,
                  label: str | None = None) -> ServeReport:
    """Serve `prompts` (all served together) through an Engine over `model`, greedily, with the
    progress line and the layer timer; `label` names the model in errors (default: `name`)."""
    label = label or name
    try:
        engine = Engine(model, cache_bytes=int(args.cache_gib * (1 << 30)), max_batch=len(prompts),
                        prefill_chunk=args.prefill_chunk)
    except ValueError as err:  # every argument was checked; what is left is the budget against the pools
        raise UsageError(f"--cache-gib {args.cache_gib:g} is too small for {label}: {err}") from None
    progress = Progress(name, sum(map(len, prompts)), len(prompts) * new_tokens,
                        stream=None if args.no_progress else sys.stderr)
    timer = LayerTimer(model)

    def on_token(request: int, token: int) -> None:
        timer.phase = "decode"
        progress.token(request, token)

    callbacks = {"on_token": on_token}
    if ENGINE_REPORTS_PREFILL:
        callbacks["on_prefill"] = progress.prefill
    start = time.perf_counter()
    try:
        with timer.attached():
            results = engine.generate(prompts, max_new_tokens=new_tokens, **callbacks)
    finally:
        progress.close()
    elapsed = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:  # a request the engine refused: the cache budget cannot hold it
        raise UsageError(f"{label}: {errors[0]} (--cache-gib {args.cache_gib:g})")
    ttft = max(r.time_to_first_token for r in results)
    decode_time = max(r.total_time for r in results) - ttft
    decoded = sum(len(r.tokens) - 1 for r in results)
    first = results[0]
    # The cache holds every token fed through the model: the last one sampled never is.
    cache_tokens = first.context_tokens + first.prompt_tokens + len(first.tokens) - 1
    return ServeReport(
        name=name, tokens=[list(r.tokens) for r in results], time_to_first_token=ttft,
        decode_tokens_per_s=decoded / decode_time if decode_time > 0 else math.nan, total_time=elapsed,
        layers=timer.layers, attention_time=timer.seconds, peak_rss=peak_resident_memory(),
        cache_tokens=cache_tokens, cache_bytes=first.cache_bytes,
        planner_cache_bytes=planned_cache_bytes(model, cache_tokens), planner_note=_planner_note(model))


# The report ------------------------------------------------------------------------------------

KINDS = ("window", "csa", "hca", "full")  # the report's order of the layer kinds


class LayerTimer:
    """Wall seconds spent in each kind of attention layer, split into prefill and decode, from
    forward hooks on the model's `HybridAttention` modules that `attached()` installs for one run
    and removes after it (a model outside that block runs without them).

    A layer's time runs from the start of its forward to its end (time.perf_counter): the q / kv
    projections, rope, the compressor and the indexer, the cache reads and writes (FP8 / FP4 encode
    and decode with --quant official), the attention op and the output projection. Not in it: the
    attention norm and the residual add, the MLPs, the embedding, the LM head, sampling and the
    engine's scheduling (the report's "other": the run's time less the layers'). The engine calls
    each layer once per running sequence, so with --batch a kind's time adds up over sequences.
    The phase is "prefill" until the first token arrives (the caller sets `phase`), then "decode";
    the prompts of one run have one length and start together, so the split is exact unless the
    cache budget admits them one after another. The layers run synchronously on the CPU, so the
    wall time is theirs; the hooks cost two clock reads a layer call."""

    def __init__(self, model: HybridTransformer, clock=time.perf_counter) -> None:
        self.model, self.clock = model, clock
        kinds = [block.attn.kind for block in model.layers]
        self.layers = {kind: kinds.count(kind) for kind in KINDS if kind in kinds}  # kind -> layers
        self.seconds = {kind: {"prefill": 0.0, "decode": 0.0} for kind in self.layers}
        self.phase = "prefill"
        self._started = 0.0

    @contextmanager
    def attached(self):
        handles = []
        try:
            for block in self.model.layers:
                handles.append(block.attn.register_forward_pre_hook(self._enter))
                handles.append(block.attn.register_forward_hook(self._leave))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, module, args) -> None:
        self._started = self.clock()

    def _leave(self, module, args, output) -> None:
        self.seconds[module.kind][self.phase] += self.clock() - self._started


PLANNER_VALUE_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16"}  # plain rows, by model dtype


def planned_cache_bytes(model: HybridTransformer, context: int) -> dict[str, int] | None:
    """The planner's count of one sequence's cache after `context` tokens, by storage type: the
    count `check_memory` uses (`planner.engine_memory`), rows in the model's dtype or, with
    quant="official", the planner's FP8 / FP4 formats. None for a dtype the planner has no format for."""
    dtype = next(model.parameters()).dtype
    if model.cfg.attention.quant == "official" and dtype in PLANNER_VALUE_FORMATS:
        precisions = planner.official_precisions(dtype.itemsize)
    elif dtype in PLANNER_VALUE_FORMATS:
        precisions = {"all": PLANNER_VALUE_FORMATS[dtype]}
    else:
        return None
    spec = planner.model_spec_from_model_config(model.cfg)
    counts = planner.kv_cache_bytes_by_type(spec, context, 1, precisions)
    return {key: n for key, n in counts.items() if n}  # the cache leaves out empty types too


def _planner_note(model: HybridTransformer) -> str | None:
    """Why there is no planner figure to compare with, if there is none."""
    dtype = next(model.parameters()).dtype
    if dtype not in PLANNER_VALUE_FORMATS:
        return f"the planner has no storage format for {str(dtype).removeprefix('torch.')} rows"
    return None


@dataclass
class ServeReport:
    """What one model's run measured. Times in seconds from the start of `Engine.generate`;
    time_to_first_token and the decode rate are the latest request's; `peak_rss` is the process's
    high-water mark at the end of the run (so it covers the models served before it too)."""

    name: str
    tokens: list[list[int]]  # the generated ids, one list per prompt
    time_to_first_token: float
    decode_tokens_per_s: float  # NaN with one new token (nothing decoded after the first)
    total_time: float
    layers: dict[str, int]  # kind -> layers of that kind
    attention_time: dict[str, dict[str, float]]  # kind -> {"prefill": s, "decode": s}
    peak_rss: int | None  # bytes; None where it cannot be read
    cache_tokens: int  # tokens the first sequence's cache held at its end
    cache_bytes: dict[str, int]  # measured, by storage type
    planner_cache_bytes: dict[str, int] | None  # the planner's count for cache_tokens
    planner_note: str | None = None  # why the two differ, where they are known to

    @property
    def other_time(self) -> float:
        """The run's time outside the attention layers."""
        return self.total_time - sum(sum(phases.values()) for phases in self.attention_time.values())

    def cache_difference(self) -> dict[str, float | None]:
        """(measured - planner) / planner by storage type and for the "total"; None without a count."""
        if self.planner_cache_bytes is None:
            return {}
        pairs = {key: (self.cache_bytes.get(key, 0), self.planner_cache_bytes.get(key, 0))
                 for key in {**self.planner_cache_bytes, **self.cache_bytes}}
        pairs["total"] = (sum(self.cache_bytes.values()), sum(self.planner_cache_bytes.values()))
        return {key: (measured - planned) / planned if planned else (0.0 if measured == 0 else None)
                for key, (measured, planned) in pairs.items()}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "time_to_first_token_s": self.time_to_first_token,
            "decode_tokens_per_s": _finite(self.decode_tokens_per_s),
            "total_s": self.total_time,
            "peak_rss_bytes": self.peak_rss,
            "attention_s_by_kind": {
                kind: {"layers": self.layers[kind], "prefill_s": phases["prefill"],
                       "decode_s": phases["decode"], "total_s": phases["prefill"] + phases["decode"]}
                for kind, phases in self.attention_time.items()},
            "other_s": self.other_time,
            "cache_tokens": self.cache_tokens,
            "cache_bytes": sum(self.cache_bytes.values()),
            "cache_bytes_by_type": self.cache_bytes,
            "planner_cache_bytes": (sum(self.planner_cache_bytes.values())
                                    if self.planner_cache_bytes is not None else None),
            "planner_cache_bytes_by_type": self.planner_cache_bytes,
            "cache_relative_difference": self.cache_difference(),
            "planner_note": self.planner_note,
            "tokens": self.tokens,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def print_breakdown(reports: list[ServeReport]) -> None:
    """The attention time by layer kind, then each model's cache beside the planner's count."""
    print("attention layers by kind (wall seconds inside the layers; other: MLPs, norms, embedding, "
          "head, sampling, scheduling):")
    print(f"{'model':<26}{'kind':<8}{'layers':>7}{'prefill s':>11}{'decode s':>10}{'total s':>10}"
          f"{'of run':>8}")
    for r in reports:
        for kind, phases in r.attention_time.items():
            total = phases["prefill"] + phases["decode"]
            print(f"{r.name:<26}{kind:<8}{r.layers[kind]:>7}{phases['prefill']:>11.2f}{phases['decode']:>10.2f}"
                  f"{total:>10.2f}{_share(total, r.total_time):>8}")
        print(f"{r.name:<26}{'other':<8}{'':>7}{'':>11}{'':>10}{r.other_time:>10.2f}"
              f"{_share(r.other_time, r.total_time):>8}")
    for r in reports:
        measured = sum(r.cache_bytes.values())
        difference = r.cache_difference()
        if r.planner_cache_bytes is None:
            print(f"cache of one sequence, {r.name}: {measured:,} bytes after {r.cache_tokens:,} tokens "
                  f"(the planner has no format for this model's dtype)")
            continue
        planned = sum(r.planner_cache_bytes.values())
        print(f"cache of one sequence, {r.name}: {measured:,} bytes after {r.cache_tokens:,} tokens; "
              f"the planner's count {planned:,} ({_percent(difference['total'])})")
        for key in sorted({**r.planner_cache_bytes, **r.cache_bytes}, key=_type_order):
            print(f"  {key:<20}{r.cache_bytes.get(key, 0):>16,}{r.planner_cache_bytes.get(key, 0):>16,}"
                  f"{_percent(difference[key]):>10}")
        if r.planner_note:
            print(f"  ({r.planner_note})")


def _share(seconds: float, total: float) -> str:
    return f"{seconds / total:.1%}" if total > 0 else "-"


def _type_order(key: str) -> int:
    return planner.STORAGE_TYPES.index(key) if key in planner.STORAGE_TYPES else len(planner.STORAGE_TYPES)


def _percent(fraction: float | None) -> str:
    return f"{fraction:+.2%}" if fraction is not None else "-"


# A trained checkpoint and the passkey task ------------------------------------------------------


def run_trained(args) -> int:
    """--checkpoint FOLDER and/or --task passkey: one model (no baseline) through the Engine."""
    from .data import answer_ids, decode, min_passkey_length, passkey_prompt
    from .train import training_arguments

    folder = Path(args.checkpoint) if args.checkpoint else None
    if folder is not None and not folder.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: --task passkey takes a training folder "
                         f"(config.json + model.safetensors); a .safetensors file goes with --task random")
    trained = training_arguments(folder) if folder is not None else {}
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
    header = sys.stderr if args.json else sys.stdout
    print(f"# hybrid-attention generate: {source}, task={args.task} prompt={args.prompt_len} "
          f"new={new_tokens} threads={torch.get_num_threads()}", file=header)
    print(f"# memory: {memory}", file=header)
    report = serve_prompts("model", model, [prompt], new_tokens, args, label="this model")
    tokens = report.tokens[0]
    answer = {}
    if passkey:
        answer = {"key": key, "depth": sample.depth, "needle": list(sample.needle),
                  "answer": decode(tokens).strip(), "right": tokens == answer_ids(key)}
    if args.json:
        print(json.dumps({"task": args.task, "source": source, "checkpoint": args.checkpoint,
                          "quant": model.cfg.attention.quant, **_run_settings(args),
                          "memory_estimate": memory, "models": [report.to_json()], **answer}))
        return 0
    print(f"time to first token {report.time_to_first_token:.2f} s, decode {report.decode_tokens_per_s:.2f} "
          f"tok/s, peak RSS {planner.human_bytes(report.peak_rss)}")
    print_breakdown([report])
    if not passkey:
        print(f"generated: {tokens}")
        return 0
    print(f"needle at depth {sample.depth:.2f} (tokens {sample.needle[0]}-{sample.needle[1]}); "
          f"the pass key is {key}")
    print(f"answer: {answer['answer']!r} ({'right' if answer['right'] else 'wrong'})")
    return 0


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
        return load_checkpoint(folder, min_seq_len=tokens)
    except ValueError as err:
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


# Progress and memory --------------------------------------------------------------------------


def resident_memory(statm: str | Path = "/proc/self/statm") -> int | None:
    """The process's resident set size now, in bytes (statm's second field counts pages); None
    where that cannot be read (not Linux)."""
    try:
        return int(Path(statm).read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # no file, no field, no os.sysconf
        return None


def peak_resident_memory() -> int | None:
    """The process's peak resident set size so far, in bytes: getrusage's ru_maxrss, which counts
    KiB on Linux and bytes on macOS; None without the resource module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """One line on `stream`, redrawn with \\r: the prefill (prompt tokens processed / total,
    tokens/s, time left), then the decode (tokens generated / total, tokens/s, time left), each
    with the resident memory (`memory()`, left out where it returns None). Its `prefill` and
    `token` methods are the engine's `on_prefill` and `on_token`. stream=None draws nothing."""

    def __init__(self, name: str, prompt_tokens: int, new_tokens: int, stream=None,
                 clock=time.perf_counter, width: int = 24, memory=resident_memory) -> None:
        self.name, self.stream, self.clock, self.width = name, stream, clock, width
        self.memory = memory
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
        resident = self.memory()
        if resident is not None:
            line += f", RSS {planner.human_bytes(resident)}"
        self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self.stream.flush()
        self._drawn = len(line)


def format_duration(seconds: float) -> str:
    """1:05 for 65 s, 1:01:05 past an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

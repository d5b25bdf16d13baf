"""Evaluate a trained model: passkey accuracy over a needle grid, the indexer's recall, perplexity.

    hybrid-attention eval runs/passkey --lengths 128,256,512 --depths 0,0.5,1 --json

Accuracy is exact match of the greedy answer (the space and every digit of the key). It is
computed from one teacher-forced forward of prompt + answer: the greedy decode produces the answer
exactly when the argmax at every answer position is the answer's next token, so the two agree
while one forward costs far less than a decode loop.

Indexer recall: at each position that predicts a digit of the key, does a CSA layer's top-k
include a compressed entry holding a digit of the key, in either place the key sentence states it
("The pass key is 71432. Remember it. 71432 is the pass key.")? The fraction over positions and
prompts, per CSA layer ("indexer_recall_by_layer"); "indexer_recall" is the best layer's, the one
that does the retrieval: a layer whose attention does not read the key (the information is
already in the residual stream) has no reason to pick it, since its indexer learns that layer's
attention. None for a model without CSA layers. A CSA entry i pools tokens [r (i - 1), r (i + 1))
(the overlapping compressor, SPEC.md), so a digit span [start, end) lives in entries start // r
... (end - 1) // r + 1.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from .data import IGNORE, TextCorpus, answer_ids, min_passkey_length, needle_grid
from .model import HybridTransformer

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check_model_length(model: HybridTransformer, tokens: int, what: str) -> None:
    limit = model.cfg.attention.max_seq_len
    if tokens > limit:
        raise ValueError(f"{what} needs {tokens} tokens, more than the model's max_seq_len={limit}")


def _needle_entries(needle: tuple[int, int], ratio: int) -> torch.Tensor:
    """Entry ids of an overlapping (ratio 4) compressor that pool a token of [start, end)."""
    start, end = needle
    return torch.arange(start // ratio, (end - 1) // ratio + 2)


@torch.no_grad()
def evaluate(model: HybridTransformer, lengths, depths=DEFAULT_DEPTHS, per_cell: int = 4, seed: int = 0,
             digits: int = 5, batch_size: int = 8, text: str | Path | None = None, text_batches: int = 0,
             progress: bool = False, details: bool = False) -> dict:
    """Passkey accuracy by prompt length and depth, the indexer's recall, and (text_batches > 0)
    the perplexity of held-out text (TextCorpus(text)'s validation part, windows of the shortest
    length).

    Returns {"accuracy": {length: fraction}, "by_depth": {length: {depth: fraction}},
    "digit_accuracy": {length: fraction of answer tokens right}, "indexer_recall": fraction or
    None (the best CSA layer's), "indexer_recall_by_length": {length: that layer's fraction} and
    "indexer_recall_by_layer": {layer id: fraction} (empty without CSA layers),
    "perplexity": float or None, and the grid's settings}; details: also "cases", one
    {"length", "depth", "key", "right"} per prompt, in needle_grid's order."""
    if not isinstance(model, HybridTransformer):
        raise TypeError(f"model must be a HybridTransformer, got {type(model).__name__}")
    lengths, depths = list(lengths), [float(d) for d in depths]
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(text_batches, int) or isinstance(text_batches, bool) or text_batches < 0:
        raise ValueError(f"text_batches must be an int >= 0, got {text_batches!r}")
    cases = needle_grid(lengths, depths, seed=seed, per_cell=per_cell, digits=digits)  # checks the grid
    _check_model_length(model, max(lengths) + digits, f"a {max(lengths)}-token prompt and its answer")
    device = next(model.parameters()).device
    csa = {i: block.attn.ratio for i, block in enumerate(model.layers)
           if block.attn.kind == "csa"}

    right = {n: {d: 0 for d in depths} for n in lengths}
    tokens_right = {n: 0 for n in lengths}
    recall_hits = {(i, n): 0 for i in csa for n in lengths}  # (layer, length)
    recall_total = dict.fromkeys(recall_hits, 0)
    verdicts = {}
    bar = _Counter(len(cases), progress)
    batches = [group[a:a + batch_size] for group in ([c for c in cases if c.length == n] for n in lengths)
               for a in range(0, len(group), batch_size)]  # a batch never mixes lengths
    for group in batches:
        n = group[0].length
        answer_len = 1 + digits  # the space and the digits
        rows = torch.tensor([c.prompt.prompt + answer_ids(c.key)[:-1] for c in group], device=device)
        targets = torch.tensor([answer_ids(c.key) for c in group], device=device)  # [g, 1 + digits]
        logits, aux = model(rows, return_aux=True)  # [g, n + digits, vocab]
        ok = logits[:, n - 1:].argmax(-1) == targets  # [g, 1 + digits]: the answer's predictions
        for c, row in zip(group, ok, strict=True):
            right[n][c.depth] += bool(row.all())
            verdicts[id(c)] = bool(row.all())
            tokens_right[n] += int(row.sum())
        for layer, picks in aux["picks"].items():  # [g, n + digits, k]
            at_digits = picks[:, n:n + answer_len - 1]  # the positions predicting the key's digits
            for c, p in zip(group, at_digits, strict=True):
                entries = torch.cat([_needle_entries(span, csa[layer])
                                     for span in c.prompt.key_spans]).to(p.device)
                hit = torch.isin(p, entries).any(-1)  # [digits]
                recall_hits[layer, n] += int(hit.sum())
                recall_total[layer, n] += hit.numel()
        bar.update(len(group))
    bar.close()

    count = per_cell * len(depths)
    totals = {i: (sum(recall_hits[i, n] for n in lengths), sum(recall_total[i, n] for n in lengths))
              for i in csa}
    by_layer = {i: hits / total for i, (hits, total) in totals.items() if total}
    best = max(by_layer, key=by_layer.get) if by_layer else None  # the layer that retrieves
    result = {
        "accuracy": {n: sum(right[n].values()) / count for n in lengths},
        "by_depth": {n: {d: right[n][d] / per_cell for d in depths} for n in lengths},
        "digit_accuracy": {n: tokens_right[n] / (count * (1 + digits)) for n in lengths},
        "indexer_recall": by_layer[best] if best is not None else None,
        "indexer_recall_by_length": {n: recall_hits[best, n] / recall_total[best, n] for n in lengths
                                     if best is not None and recall_total[best, n]},
        "indexer_recall_by_layer": by_layer,
        "perplexity": None,
        "lengths": lengths, "depths": depths, "per_cell": per_cell, "digits": digits, "seed": seed,
    }
    if details:
        result["cases"] = [{"length": c.length, "depth": c.depth, "key": c.key, "right": verdicts[id(c)]}
                           for c in cases]
    if text_batches:  # windows of the shortest length, usually the training one
        result["perplexity"] = perplexity(model, TextCorpus(text, seq_len=min(lengths)), text_batches,
                                          batch_size)
    return result


@torch.no_grad()
def perplexity(model: HybridTransformer, corpus: TextCorpus, batches: int, batch_size: int = 8) -> float:
    """exp(mean next-byte cross-entropy) over `batches` validation batches of `corpus`."""
    _check_model_length(model, corpus.seq_len, f"a {corpus.seq_len}-token text window")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in corpus.val_batches(batch_size, batches):
        logits = model(batch.inputs.to(device))
        targets = batch.targets.to(device)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                   ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
    return math.exp(total / count)


def plot_needle_grid(result: dict, path: str | Path, title: str | None = None) -> bool:
    """The accuracy heatmap (depth down, length across) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths, depths = result["lengths"], result["depths"]
    grid = [[result["by_depth"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or "passkey accuracy", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def format_table(result: dict) -> str:
    """Accuracy by depth (rows) and length (columns) as a Markdown table, the mean last."""
    lengths, depths = result["lengths"], result["depths"]
    lines = ["| depth | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for d in depths:
        lines.append(f"| {d:.0%} | " + " | ".join(f"{result['by_depth'][n][d]:.2f}" for n in lengths) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{result['accuracy'][n]:.2f}**" for n in lengths) + " |")
    recall = result["indexer_recall"]
    lines.append("")
    if recall is None:
        lines.append("indexer recall: - (no CSA layer)")
    else:
        layers = ", ".join(f"layer {i}: {v:.3f}" for i, v in result["indexer_recall_by_layer"].items())
        lines.append(f"indexer recall: {recall:.3f} (the best CSA layer; {layers})")
    if result["perplexity"] is not None:
        lines.append(f"perplexity on held-out text: {result['perplexity']:.3f}")
    return "\n".join(lines)


class _Counter:
    """A one-line progress counter on stderr (nothing when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"\reval {self.done}/{self.total} prompts", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


# The command line -------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    from .cli import positive_int, seed

    parser.add_argument("checkpoint", help="A training folder (config.json + model.safetensors).")
    parser.add_argument("--lengths", default=None,
                        help="Comma-separated prompt lengths. Default: 1x, 2x and 4x the training seq_len.")
    parser.add_argument("--depths", default=",".join(str(d) for d in DEFAULT_DEPTHS),
                        help="Comma-separated needle depths in [0, 1]. Default: %(default)s.")
    parser.add_argument("--per-cell", type=positive_int, default=4,
                        help="Keys per (length, depth) cell. Default: %(default)s.")
    parser.add_argument("--digits", type=positive_int, default=None,
                        help="Digits of each key. Default: the training run's, else 5.")
    parser.add_argument("--seed", type=seed, default=1,
                        help="Seed of the grid's keys (training drew other keys). Default: %(default)s.")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="Prompts per forward. Default: %(default)s.")
    parser.add_argument("--text", default=None,
                        help="Folder of text files for the perplexity. Default: the Python standard "
                             "library's source.")
    parser.add_argument("--text-batches", type=int, default=2,
                        help="Validation batches for the perplexity, 0 to skip it. Default: %(default)s.")
    parser.add_argument("--plot", default=None,
                        help="Where to write the heatmap PNG. Default: CHECKPOINT/needle.png.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("--no-progress", action="store_true", help="No progress counter on stderr.")


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        from .cli import UsageError

        raise UsageError(f"--{name} must be comma-separated numbers, got {text!r}")
    return values


def run(args) -> int:
    from .cli import UsageError
    from .train import load_checkpoint, training_arguments

    folder = Path(args.checkpoint)
    trained = training_arguments(folder)
    digits = args.digits or trained.get("task_options", {}).get("digits", 5)
    if args.lengths is None:
        base = trained.get("seq_len", 1024)
        lengths = [base, 2 * base, 4 * base]
    else:
        lengths = _numbers(args.lengths, int, "lengths")
    depths = _numbers(args.depths, float, "depths")
    if args.text_batches < 0:
        raise UsageError(f"--text-batches must be >= 0, got {args.text_batches}")
    shortest = min_passkey_length(digits)
    if min(lengths) < shortest:
        raise UsageError(f"--lengths: a {digits}-digit passkey prompt needs at least {shortest} tokens, "
                         f"got {min(lengths)}")
    plot = Path(args.plot) if args.plot else folder / "needle.png"
    if not plot.parent.is_dir():
        raise UsageError(f"--plot {plot}: the folder {plot.parent} does not exist")
    try:  # past the configured limit too: length generalisation is what the longer prompts test
        model = load_checkpoint(folder, min_seq_len=max(lengths) + digits)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        result = evaluate(model, lengths, depths, per_cell=args.per_cell, seed=args.seed, digits=digits,
                          batch_size=args.batch_size, text=args.text, text_batches=args.text_batches,
                          progress=not args.no_progress and sys.stderr.isatty())
    except ValueError as err:
        raise UsageError(str(err)) from None
    plotted = plot_needle_grid(result, plot, title=f"{folder.name}: passkey accuracy")
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        if plotted:
            print(f"heatmap: {plot}")
    return 0

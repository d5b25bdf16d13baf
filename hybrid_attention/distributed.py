"""Context-parallel prefill over torch.distributed: one long prompt split across ranks, layer by layer.

Rank r holds the tokens [p_r, p_{r+1}) of the prompt (`split_points` balances the work, not the
tokens). A query needs, besides its own chunk's rows: the window rows of the win - 1 tokens before
it, the compressor's unfinished block (and, with CSA's overlap, the block before that), and every
compressed entry and indexer key before it. So, for each layer, every rank

1. all-gathers the last `halo_tokens(cfg)` rows of its attention input (the halo): rank r rebuilds
   from rank r-1's halo the window ring and both compressors' pending rows, exactly as a stream of
   the earlier tokens would have left them (`state_from_halo`);
2. pools its own chunk's compressed entries and indexer keys and all-gathers them ("full" layers:
   their KV rows), keeping those of the ranks before it;
3. runs the layer on its chunk from that state (`HybridAttention.forward(x, state=...)`, the
   streaming path, which equals prefill), then the block's MLP.

The last rank's states end up holding the whole prompt, window ring, compressor tails, every
entry and key, as after a single-process prefill, so decoding continues there. The gathers are
`torch.distributed.all_gather` (gloo on CPU tensors, NCCL on CUDA tensors); a chunk must be at
least `halo_tokens` long, so each halo comes from the one rank before.

Communication per layer and rank, in elements (`communication_elements`): the halo, H * dim per
rank; compressed entries, d per entry (CSA, HCA) plus index_head_dim per indexer key (CSA); a
"full" layer's KV rows, d per token. Each rank sends its share once and receives every rank's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .attention import HybridAttention
from .config import AttentionConfig
from .model import HybridTransformer
from .modules import linear
from .state import LayerState


def halo_tokens(cfg: AttentionConfig) -> int:
    """Rows of the previous rank's attention input a rank needs: the window's, and each compressor's
    unfinished block plus (overlap) the complete block before it."""
    needs = [cfg.window_size]
    for layer_id in range(cfg.n_layers):
        ratio = cfg.compress_ratio(layer_id)
        if ratio:
            overlap = cfg.layer_kind(layer_id) == "csa"
            needs.append((2 if overlap else 1) * ratio)
    return max(needs)


def token_costs(cfg: AttentionConfig) -> tuple[float, float]:
    """(a, b): the prefill work of the token at position t is about a + b * t multiply-adds summed
    over layers. a: projections, compressors and the window; b: the CSA indexer, which scores
    (t + 1) / ratio keys per query and head, and the entries HCA attends to."""
    d, h, dim = cfg.head_dim, cfg.n_heads, cfg.dim
    per_layer = dim * cfg.q_lora_rank + cfg.q_lora_rank * h * d + dim * d + h * d * cfg.o_lora_rank \
        + cfg.o_groups * cfg.o_lora_rank * dim + 2 * h * d * cfg.window_size
    a = b = 0.0
    for layer_id in range(cfg.n_layers):
        a += per_layer
        kind, ratio = cfg.layer_kind(layer_id), cfg.compress_ratio(layer_id)
        if kind == "csa":
            a += 4 * dim * d + 2 * h * d * cfg.index_topk
            b += cfg.index_n_heads * cfg.index_head_dim / ratio
        elif kind == "hca":
            a += 2 * dim * d
            b += 2 * h * d / ratio
        elif kind == "full":
            b += 2 * h * d
    return a, b


def split_points(seq_len: int, world_size: int, cfg: AttentionConfig) -> list[int]:
    """[0, p_1, .., seq_len]: chunk boundaries of equal work under `token_costs` (later tokens
    cost more), each chunk at least `halo_tokens(cfg)` long."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    halo = halo_tokens(cfg)
    if seq_len < world_size * halo:
        raise ValueError(f"a prompt of {seq_len} tokens cannot be split over {world_size} ranks: each "
                         f"chunk needs at least {halo} tokens (the window / compressor halo)")
    a, b = token_costs(cfg)
    total = a * seq_len + b * seq_len * seq_len / 2

    def position(work: float) -> int:  # solve a p + b p^2 / 2 = work for p
        if b == 0:
            return round(work / a)
        return round((-a + (a * a + 2 * b * work) ** 0.5) / b)

    points = [0] + [position(total * r / world_size) for r in range(1, world_size)] + [seq_len]
    for r in range(1, world_size):  # keep every chunk at least a halo long
        points[r] = min(max(points[r], points[r - 1] + halo), seq_len - (world_size - r) * halo)
    return points


def state_from_halo(layer: HybridAttention, halo: torch.Tensor | None, pos: int,
                    batch_size: int) -> LayerState:
    """The layer's streaming state at position `pos` without its compressed entries, indexer keys
    or "full" KV rows (the gathers add those): the window ring and the compressors' pending rows,
    rebuilt from halo [b, H, dim], the attention inputs of positions pos - H .. pos - 1 (None at
    position 0)."""
    b = batch_size
    state = layer.new_state(b, layer.wq_a.weight.device)
    if halo is None or pos == 0:
        return state
    freqs = layer._freqs.to(halo.device)
    first = pos - halo.size(1)
    if layer.kind != "full":
        n = min(pos, layer.cfg.window_size)
        rows = layer._kv_rows(halo[:, -n:], torch.arange(pos - n, pos, device=halo.device), freqs)
        state.write_window(pos, rows)
    for compressor, name in ((layer.compressor, "compressor"),
                             (layer.indexer.compressor if layer.indexer is not None else None,
                              "index_compressor")):
        if compressor is None:
            continue
        r = compressor.ratio
        # From the start of the last complete block (overlap) or of the unfinished one, with a
        # fresh state: the pending rows it leaves are those a whole stream would have left.
        begin = max(0, (pos // r - (1 if compressor.overlap else 0)) * r)
        _, pending = compressor(halo[:, begin - first:], begin, compressor.new_state(b, halo.device), freqs,
                                layer.cfg.quant)
        setattr(state, name, pending)
    state.pos = pos
    return state


@dataclass
class ContextParallelPrefill:
    """One rank's share of a context-parallel prefill.

    logits [b, s_r, vocab] of this rank's chunk (or of its last token); states: the layers' states
    after the chunk (on the last rank: after the whole prompt, ready for decoding); points: the
    chunk boundaries;
    sent / received: elements this rank put into and took out of the gathers, by layer kind."""

    logits: torch.Tensor
    states: list[LayerState]
    points: list[int]
    rank: int
    world_size: int
    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)


def communication_elements(cfg: AttentionConfig, points: list[int], batch_size: int
                           ) -> tuple[dict[str, int], dict[str, int]]:
    """(sent, received) elements per rank and layer kind over the whole prefill, as the gathers move
    them: every rank sends one [b, n, w] tensor per gather, padded to the longest rank's n, and
    receives one from every rank. Per layer: the halo (n = H, w = dim); compressed entries (n = the
    entries a chunk completes, w = head_dim) and, CSA, indexer keys (w = index_head_dim); "full"
    layers' KV rows (n = the chunk's tokens, w = head_dim)."""
    world = len(points) - 1
    sent: dict[str, int] = {}
    for layer_id in range(cfg.n_layers):
        kind, ratio = cfg.layer_kind(layer_id), cfg.compress_ratio(layer_id)
        gathers = [(halo_tokens(cfg), cfg.dim)]
        chunks = list(zip(points, points[1:], strict=False))
        if kind == "full":
            gathers.append((max(b - a for a, b in chunks), cfg.head_dim))
        if ratio:
            entries = max(b // ratio - a // ratio for a, b in chunks)
            gathers.append((entries, cfg.head_dim))
            if kind == "csa":
                gathers.append((entries, cfg.index_head_dim))
        _count(sent, kind, sum(batch_size * n * w for n, w in gathers))
    return sent, {kind: world * n for kind, n in sent.items()}


def _gather(part: torch.Tensor, lengths: list[int], group, book: ContextParallelPrefill, kind: str
            ) -> list[torch.Tensor]:
    """Every rank's [b, n_r, w] rows (n_r = lengths[r]), padded to the longest for all_gather;
    the elements moved are added to `book`."""
    longest = max(lengths)
    # gloo gathers host tensors only: ranks that share one GPU (NCCL wants a GPU per rank) exchange
    # through host memory; NCCL gathers CUDA tensors where they are.
    through_host = part.is_cuda and dist.get_backend(group) == "gloo"
    padded = part.new_zeros(part.size(0), longest, part.size(2), device="cpu" if through_host else None)
    padded[:, :part.size(1)] = part
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded.contiguous(), group=group)
    _count(book.sent, kind, padded.numel())
    _count(book.received, kind, sum(t.numel() for t in out))
    return [t[:, :n].to(part.device) for t, n in zip(out, lengths, strict=True)]


def _count(book: dict[str, int], kind: str, elements: int) -> None:
    book[kind] = book.get(kind, 0) + elements


@torch.no_grad()
def context_parallel_prefill(model: HybridTransformer, tokens: torch.Tensor, group=None,
                             points: list[int] | None = None, chunk: int = 4096,
                             last_logits_only: bool = False,
                             progress: Callable[[int, int], None] | None = None) -> ContextParallelPrefill:
    """Prefill tokens [b, s] (the whole prompt, the same on every rank) split over the ranks of
    `group` (default: the whole world). See the module docstring. Each rank streams its chunk
    through a layer `chunk` tokens at a time (the streaming path, equal to one call);
    `last_logits_only`: the logits of the chunk's last token only ([b, 1, vocab]), for generation;
    `progress(done, total)`: called after each piece with this rank's work done so far, in tokens
    of its chunk averaged over the layers (total: its chunk's length)."""
    if not dist.is_initialized():
        raise RuntimeError("context_parallel_prefill needs torch.distributed initialised "
                           "(run under torchrun, then dist.init_process_group)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cfg = model.cfg.attention
    s = tokens.size(1)
    points = split_points(s, world, cfg) if points is None else list(points)
    if len(points) != world + 1 or points[0] != 0 or points[-1] != s \
            or any(b - a < halo_tokens(cfg) for a, b in zip(points, points[1:], strict=False)):
        raise ValueError(f"points must run from 0 to {s} in {world} chunks of at least "
                         f"{halo_tokens(cfg)} tokens, got {points}")
    model._check_tokens(tokens, None)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    lo, hi = points[rank], points[rank + 1]
    halo = halo_tokens(cfg)
    result = ContextParallelPrefill(None, [], points, rank, world)
    x = model.embed(tokens[:, lo:hi])
    pieces = [(a, min(x.size(1), a + chunk)) for a in range(0, x.size(1), chunk)]
    for block in model.layers:
        layer = block.attn
        # The attention input is normalised a piece at a time, never for the whole chunk at once:
        # a rank holds one [b, s_r, dim] tensor (x) however long its chunk.
        halos = _gather(block.attn_norm(x[:, -halo:]), [halo] * world, group, result, layer.kind)
        state = state_from_halo(layer, halos[rank - 1] if rank else None, lo, tokens.size(0))
        own = _own_rows(layer, block.attn_norm, x, pieces, lo, state)
        for name, rows in own.items():
            counts = [_rows_in(layer, name, a, b) for a, b in zip(points, points[1:], strict=False)]
            parts = _gather(rows, counts, group, result, layer.kind)
            earlier = [t for t in parts[:rank] if t.size(1)]
            if earlier:
                getattr(state, name).append(torch.cat(earlier, dim=1))
        for a, e in pieces:  # the chunk streamed in pieces: temporaries stay small
            x[:, a:e] += layer(block.attn_norm(x[:, a:e]), state=state)
            x[:, a:e] += block.ffn(block.ffn_norm(x[:, a:e]))
            if progress is not None:
                progress((layer.layer_id * x.size(1) + e) // len(model.layers), x.size(1))
        result.states.append(state)
    if last_logits_only:
        x = x[:, -1:]
    result.logits = linear(model.norm(x), model.head.weight).float()
    return result


def _own_rows(layer: HybridAttention, norm, x: torch.Tensor, pieces: list[tuple[int, int]], start: int,
              state: LayerState) -> dict:
    """What this rank's chunk contributes to the later ranks' states: its compressed entries and
    indexer keys (pooled from `state`'s pending rows on, `state` unchanged), or a "full" layer's KV
    rows; the attention input norm(x) is made a piece at a time."""
    freqs = layer._freqs.to(x.device)
    pending = {"compressed": state.compressor, "index_keys": state.index_compressor}
    compressors = {"compressed": layer.compressor,
                   "index_keys": layer.indexer.compressor if layer.indexer is not None else None}
    rows: dict[str, list[torch.Tensor]] = {}
    for a, e in pieces:
        h = norm(x[:, a:e])
        if layer.kind == "full":
            positions = torch.arange(start + a, start + e, device=x.device)
            rows.setdefault("kv", []).append(layer._kv_rows(h, positions, freqs))
            continue
        for name, compressor in compressors.items():
            if compressor is not None:
                entries, pending[name] = compressor(h, start + a, pending[name], freqs, layer.cfg.quant)
                rows.setdefault(name, []).append(entries)
    return {name: torch.cat(parts, dim=1) for name, parts in rows.items()}


def _rows_in(layer: HybridAttention, name: str, a: int, b: int) -> int:
    """Rows of kind `name` that the tokens [a, b) complete."""
    if name == "kv":
        return b - a
    return b // layer.ratio - a // layer.ratio


def run_generate(args) -> int:
    """`hybrid-attention generate --context-parallel` under torchrun: the random prompt of a plain
    `generate` run (same preset, seed and length) prefilled across the ranks, then greedy decoding
    on the last rank through an `Engine`, its paged cache loaded from the states that rank holds.
    Prints the split, each rank's prefill time, peak resident memory and the bytes it moved
    beside `communication_elements`, and the tokens."""
    import json
    import os
    import sys
    import time

    from .cli import UsageError
    from .generate import Progress, load_checkpoint, model_configs, peak_resident_memory
    from .planner import human_bytes
    from .train import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--context-parallel splits the prompt over processes: run it under "
                         "`torchrun --nproc-per-node N` with N >= 2")
    cfg = model_configs(args)[0][1]
    if args.prompt_len < int(os.environ["WORLD_SIZE"]) * halo_tokens(cfg.attention):
        raise UsageError(f"--prompt-len {args.prompt_len} is too short for {os.environ['WORLD_SIZE']} "
                         f"ranks: each needs at least {halo_tokens(cfg.attention)} tokens")
    run = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = HybridTransformer(cfg).to(run.device).eval()
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint))
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.stack([torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen)
                          for _ in range(args.batch)]).to(run.device)
    dist.barrier()
    began = time.perf_counter()
    # One progress line, drawn by the rank that reports and decodes (the last): its own chunk's share.
    points = split_points(args.prompt_len, run.world, cfg.attention)
    bar = None
    if run.rank == run.world - 1 and not args.no_progress:
        mine = args.batch * (points[run.rank + 1] - points[run.rank])
        bar = Progress(f"context-parallel prefill, rank {run.rank} of {run.world}", mine, 0,
                       stream=sys.stderr)
    result = context_parallel_prefill(
        model, tokens, points=points, chunk=args.prefill_chunk, last_logits_only=True,
        progress=None if bar is None else lambda done, total: bar.prefill(0, args.batch * done, 0))
    if bar is not None:
        bar.close()
    prefill_s = time.perf_counter() - began
    mine = {"rank": run.rank, "tokens": result.points[run.rank:run.rank + 2], "prefill_s": prefill_s,
            "peak_rss_bytes": peak_resident_memory(), "sent": result.sent, "received": result.received}
    ranks = [None] * run.world
    dist.all_gather_object(ranks, mine)
    if run.rank == run.world - 1:
        generated, decode_s = _decode_with_engine(model, tokens, result, args)
        element = torch.finfo(model.embed.weight.dtype).bits // 8
        sent, received = communication_elements(cfg.attention, result.points, args.batch)
        times = [r["prefill_s"] for r in ranks]
        report = {"task": "random", "preset": args.preset, "quant": args.quant, "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "batch": args.batch, "seed": args.seed,
                  "world_size": run.world, "points": result.points, "ranks": ranks,
                  "slowest_over_fastest": max(times) / min(times),
                  "formula_elements": {"sent": sent, "received": received}, "element_bytes": element,
                  "decode_tokens_per_s": args.batch * args.new_tokens / decode_s,
                  "tokens": generated}
        if args.json:
            print(json.dumps(report))
        else:
            _print_report(report, human_bytes)
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _decode_with_engine(model: HybridTransformer, tokens: torch.Tensor, result: ContextParallelPrefill,
                        args) -> tuple[list[list[int]], float]:
    """Each sequence's states, assembled on this (the last) rank, go into an `Engine`'s paged cache
    through a context file (`Engine.save_states`); the engine then decodes greedily as after its
    own prefill. Returns the tokens per sequence and the seconds the decoding took."""
    import tempfile
    import time

    from .engine import Engine

    engine = Engine(model, cache_bytes=int(args.cache_gib * (1 << 30)), max_batch=1,
                    prefill_chunk=args.prefill_chunk)
    generated, seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="hybrid_cp_") as folder:
        for row in range(tokens.size(0)):
            prompt = tokens[row].tolist()
            path = f"{folder}/context{row}.bin"
            engine.save_states(prompt, result.logits[row, -1], result.states, path, row=row)
            began = time.perf_counter()
            (out,) = engine.generate([[]], args.new_tokens, context=path)  # nothing after the context
            seconds += time.perf_counter() - began
            generated.append(list(out.tokens))
    return generated, max(seconds, 1e-9)


def _print_report(report: dict, human_bytes) -> None:
    element = report["element_bytes"]
    print(f"# context-parallel prefill: preset={report['preset']} prompt={report['prompt_len']} "
          f"batch={report['batch']} ranks={report['world_size']} split={report['points']}")
    print(f"{'rank':>4} {'tokens':>17} {'prefill s':>10} {'peak RSS':>10} {'sent':>10} {'received':>10}")
    for r in report["ranks"]:
        peak = human_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] is not None else "-"
        print(f"{r['rank']:>4} {str(r['tokens']):>17} {r['prefill_s']:>10.2f} {peak:>10} "
              f"{human_bytes(element * sum(r['sent'].values())):>10} "
              f"{human_bytes(element * sum(r['received'].values())):>10}")
    formula = report["formula_elements"]
    print(f"formula per rank: sent {human_bytes(element * sum(formula['sent'].values()))}, received "
          f"{human_bytes(element * sum(formula['received'].values()))} (by layer kind: "
          + ", ".join(f"{k} {human_bytes(element * v)}" for k, v in formula["sent"].items()) + " sent)")
    print(f"slowest / fastest rank: {report['slowest_over_fastest']:.2f}x; decode on the last rank "
          f"(its engine) {report['decode_tokens_per_s']:.1f} tokens/s")
    print(f"tokens: {report['tokens']}")

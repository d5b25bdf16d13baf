"""HybridAttention: one DeepSeek-V4 attention layer (sliding window, CSA, HCA, or full).

A token's path (SPEC.md section 3): x -> low-rank query (wq_a, q_norm, wq_b), per-head RMS, RoPE;
x -> one shared KV row (wkv, kv_norm, RoPE, FP8 on the non-rope dims). Compressed layers pool KV
rows into entries; CSA layers let the indexer pick top-k entries per query. Each query attends to
its window rows plus its compressed entries plus the sink; the output is de-rotated and projected
by the grouped low-rank output (wo_a per group, then wo_b).

This file is the wiring: projections, the index structure (window rows, visible entries, the
indexer's picks), calls of the ops in `ops/`, and the output projection. The attention itself is
`ops.joint_attention`: its CPU file holds the inference forward (`joint_attention_inference`, one
query block at a time), the training op (forward and backward a query block at a time) and the
"full" kind's training op (`full_attention_train`, torch's fused causal kernel); its
Triton file the CUDA path; `ops.sparse_attention` serves the kernel path and the official
construction (`reference_forward`). Queries are processed in blocks
(`AttentionConfig.query_block_size`, shrunk when a block would score too many keys), so memory
grows linearly with the sequence.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.utils.checkpoint
from torch import nn

from .checks import check_bool, check_float_dtype, check_int, check_tensor, to_device
from .compressor import Compressor
from .config import AttentionConfig
from .indexer import Indexer, gather_rows, index_scores, select_entries
from .modules import Linear, RMSNorm, normalize_and_rotate, recompute_pieces
from .ops import indexer_topk, sparse_attention
from .ops.dispatch import BACKENDS, check_triton_usable, resolve_backend
from .ops.indexer_loss import indexer_loss
from .ops.joint_attention import joint_attention
from .ops.joint_attention.cpu import (
    HAS_CPU_FLASH,
    full_attention_fused,
    full_attention_train,
    joint_attention_inference,
)
from .quant import dequantize_fp8_weight, fake_quant_nope_fp8
from .rope import apply_rope, layer_rope_frequencies
from .state import GrowingRows, LayerState, StreamingState

# Largest number of fp32 scores one query block may hold ([block, heads, keys]); bounds memory.
SCORE_BUDGET = 1 << 25
# Largest number of fp32 values of the rows one CSA sub-block gathers ([sub, top-k, head_dim]):
# 4 MB. The indexer scores a whole query block at once; its attention then runs a sub-block at a
# time, so the gathered rows stay in cache between the scores and the weighted sum (at 32K the
# attention part of a CSA block took 7.7 ms in one piece and 5.9 ms in sub-blocks of 128 queries).
GATHER_BUDGET = 1 << 20


def window_indices_prefill(seq_len: int, window_size: int) -> torch.Tensor:
    """[s, min(s, win)]: row m_t + j if m_t + j <= t else -1, m_t = max(0, t - win + 1) (SPEC 4)."""
    width = min(seq_len, window_size)
    t = torch.arange(seq_len)[:, None]
    rows = (t - window_size + 1).clamp_min(0) + torch.arange(width)
    return torch.where(rows <= t, rows, -1)


def window_indices_decode(pos: int, window_size: int) -> torch.Tensor:
    """[win] ring slots of the window of the token at `pos`, oldest first, -1 padded (SPEC 4)."""
    if pos >= window_size - 1:
        c = pos % window_size
        return torch.cat((torch.arange(c + 1, window_size), torch.arange(0, c + 1)))
    return torch.where(torch.arange(window_size) <= pos, torch.arange(window_size), -1)


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Entries a query at position t may see: i < floor((t + 1) / ratio) (SPEC 4)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


class HybridAttention(nn.Module):
    """One attention layer of kind `cfg.layer_kind(layer_id)`; parameter names match the official
    checkpoint under `attn.` (SPEC 11)."""

    def __init__(self, cfg: AttentionConfig, layer_id: int, dtype: torch.dtype | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(cfg, AttentionConfig):
            raise TypeError(f"cfg must be an AttentionConfig, got {type(cfg).__name__}")
        check_int("layer_id", layer_id, 0)
        check_float_dtype("dtype", dtype, allow_none=True)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            check_triton_usable()
        self.cfg, self.layer_id = cfg, layer_id
        # "auto": the Triton kernels for CUDA tensors, the torch path otherwise (see `_attend`).
        self.backend = backend
        self.kind = cfg.layer_kind(layer_id)  # raises for a layer_id past the schedule
        self.ratio = cfg.compress_ratio(layer_id)
        self.n_heads, self.head_dim, self.rope_dim = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        self.scale = cfg.head_dim**-0.5
        fp8 = cfg.fp8_gemm_inputs
        group_width = cfg.n_heads * cfg.head_dim // cfg.o_groups

        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, dtype, fp8)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, dtype, fp8)
        self.wkv = Linear(cfg.dim, cfg.head_dim, dtype, fp8)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # wo_a is a plain grouped einsum in the activation dtype, never FP8 inputs (SPEC 3.5).
        self.wo_a = nn.Linear(group_width, cfg.o_groups * cfg.o_lora_rank, bias=False, dtype=dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, dtype, fp8)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads))
        self.compressor = None
        self.indexer = None
        if self.ratio:
            self.compressor = Compressor(cfg.dim, cfg.head_dim, self.ratio, self.kind == "csa",
                                         cfg.rope_head_dim, cfg.norm_eps, backend=backend)
        if self.kind == "csa":
            self.indexer = Indexer(cfg, dtype, backend)
        self._freqs = layer_rope_frequencies(cfg, compressed=self.ratio > 0)
        self._fingerprint = cfg.fingerprint()  # states record it; comparing strings is cheap

    @property
    def dtype(self) -> torch.dtype:
        return self.wq_a.weight.dtype

    # State ----------------------------------------------------------------------------------

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> LayerState:
        """An empty streaming state for `batch_size` sequences starting at position 0."""
        check_int("batch_size", batch_size, 1)
        device = to_device("device", device) if device is not None else self.wq_a.weight.device
        cfg, dtype = self.cfg, self.dtype
        state = LayerState(self.layer_id, self.kind, self._fingerprint, batch_size, dtype)
        if self.kind == "full":
            state.kv = GrowingRows(batch_size, cfg.head_dim, dtype, device)
        else:
            state.window = torch.zeros(batch_size, cfg.window_size, cfg.head_dim, dtype=dtype,
                                       device=device)
        if self.compressor is not None:
            state.compressor = self.compressor.new_state(batch_size, device)
            state.compressed = GrowingRows(batch_size, cfg.head_dim, dtype, device)
        if self.indexer is not None:
            state.index_compressor = self.indexer.compressor.new_state(batch_size, device)
            state.index_keys = GrowingRows(batch_size, cfg.index_head_dim, dtype, device)
        return state

    # Forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, state: LayerState | None = None, return_aux: bool = False,
                check_finite: bool = False, dense_csa: bool = False):
        """x [b, s, dim] -> y [b, s, dim], causal.

        state: continue the sequences it holds (chunked prefill, decode); it is updated only when
          the call succeeds.
        return_aux: also return {"indexer_loss", "attended_keys"} (see `ops.indexer_loss`) and, for a
          CSA layer that uses its indexer, "picks": the entry ids each query attended [b, s, k]
          (int64, -1 = none).
        dense_csa: a CSA layer attends to every visible compressed entry, as in the indexer's
          dense warm-up; the indexer loss is then taken over all of them.
        """
        check_bool("return_aux", return_aux)
        check_bool("check_finite", check_finite)
        check_bool("dense_csa", dense_csa)
        self._check_input(x, state, check_finite)
        # The kernel path (Triton) serves plain inference; the indexer loss and the dense CSA
        # warm-up take the training path. Resolved here so that a backend that cannot run fails first.
        kernels = self.kind != "full" and not (return_aux or dense_csa) \
            and resolve_backend(self.backend, x) == "triton"
        b, s, _ = x.shape
        start = state.pos if state is not None else 0
        work = state if state is not None else self.new_state(b, x.device)
        positions = torch.arange(start, start + s, device=x.device)
        freqs = self._freqs.to(x.device)

        # The training path: the indexer loss, the dense warm-up, or anything autograd tracks.
        train = self.kind != "full" and not kernels and (
            return_aux or dense_csa or (torch.is_grad_enabled() and (
                x.requires_grad or self.wq_a.weight.requires_grad or self.q_norm.weight.requires_grad)))
        # There the KV path and the compressors keep only their input for backward (activation
        # checkpointing): their [s, ...] projections, norms and pooling slots are recomputed.
        kept = _checkpointed if train and torch.is_grad_enabled() else _called

        kv = kept(self._kv_rows, x, positions, freqs)
        if self.kind == "full":
            keys = work.kv.with_appended(kv)  # [b, start + s, d]
            context = start
        else:
            context = min(start, self.cfg.window_size - 1)
            keys = torch.cat((work.window_rows(context), kv), dim=1)  # [b, context + s, d]

        updates = {}
        compressed = index_keys = head_weights = None
        if self.compressor is not None:
            entries, updates["compressor"] = kept(
                self.compressor, x, start, work.compressor, freqs, self.cfg.quant)
            updates["compressed"] = entries
            compressed = work.compressed.with_appended(entries)  # [b, (start + s) // r, d]
        if self.indexer is not None:
            # The indexer learns only from its own loss: its inputs are detached (DeepSeek-V3.2).
            new_keys, updates["index_compressor"] = kept(
                self.indexer.compressor, x.detach(), start, work.index_compressor, freqs, self.cfg.quant)
            updates["index_keys"] = new_keys
            index_keys = work.index_keys.with_appended(new_keys)
            head_weights = self.indexer.head_weights(x.detach())  # [b, s, hi]

        if train:
            y, aux = self._attend_train(x, keys, positions, freqs, compressed, index_keys, head_weights,
                                        return_aux, dense_csa)
        else:
            qr = self.q_norm(self.wq_a(x))  # [b, s, q_lora]; queries are finished a block at a time
            attend = self._attend_indexed if kernels else self._attend
            y, aux = attend(qr, keys, context, positions, freqs, compressed, index_keys, head_weights)
            if return_aux:  # "full": no compressed entries, so no indexer loss
                aux["indexer_loss"] = qr.new_zeros((), dtype=torch.float32)
        if state is not None:
            self._commit(state, kv, updates)
        if return_aux:
            return y, aux
        return y

    def _queries(self, qr: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Query path after the low-rank bottleneck (SPEC 3.2): qr [b, n, q_lora] -> q [b, n, h, d]."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        return normalize_and_rotate(q, self.cfg.norm_eps, positions, freqs)

    def _kv_rows(self, x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """KV path (SPEC 3.3): x [b, s, dim] -> the shared KV rows [b, s, d]."""
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, freqs)
        if self.cfg.quant == "official":
            kv = fake_quant_nope_fp8(kv, self.rope_dim, block=64)
        return kv

    def _project(self, x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor):
        """Query path (SPEC 3.2) and KV path (SPEC 3.3) of a whole chunk: q, kv, qr."""
        qr = self.q_norm(self.wq_a(x))  # [b, s, q_lora]
        return self._queries(qr, positions, freqs), self._kv_rows(x, positions, freqs), qr

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection (SPEC 3.5): o [b, s, h, d] -> [b, s, dim]."""
        return self.wo_b(self._grouped_output(o).flatten(2))

    def _grouped_output(self, o: torch.Tensor) -> torch.Tensor:
        """wo_a per group of heads: o [b, s, h, d] -> [b, s, g, rank]."""
        b, s = o.shape[:2]
        groups, rank = self.cfg.o_groups, self.cfg.o_lora_rank
        grouped = o.reshape(b, s, groups, -1)  # [b, s, g, h/g * d]
        wo_a = self.wo_a.weight.to(o.dtype).view(groups, rank, -1)
        return torch.einsum("bsgk,grk->bsgr", grouped, wo_a)

    def _derotated_grouped_output(self, o: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor):
        """The attention output o [b, s, h, d] (fp32) de-rotated, then wo_a: [b, s, g, rank]."""
        return self._grouped_output(apply_rope(o.to(self.dtype), positions, freqs, inverse=True))

    @staticmethod
    def _write_block(y: torch.Tensor | None, out: torch.Tensor, a: int, s: int) -> torch.Tensor:
        """Queries [a, a + n) of the [b, s, dim] output: written in place (no concatenation of
        the blocks at the end, which would hold the output twice)."""
        if out.size(1) == s:
            return out
        if y is None:
            y = out.new_empty(out.size(0), s, out.size(2))
        y[:, a:a + out.size(1)] = out
        return y

    def _block_size(self, n_keys: int, gathered: int = 0) -> int:
        """Queries per block: the config's size, shrunk so that the block's scores (n_keys per
        query and head) and gathered rows (`gathered` per query) stay within their budgets."""
        block = min(self.cfg.query_block_size, SCORE_BUDGET // (self.n_heads * max(n_keys, 1)))
        if gathered:
            block = min(block, GATHER_BUDGET // (gathered * self.head_dim))
        return max(1, block)

    def _attend(self, qr, keys, context, positions, freqs, compressed, index_keys, head_weights):
        """Inference (no indexer loss): one query block at a time, the block's queries, then
        `joint_attention_inference` over its window rows + compressed entries (every visible one
        for HCA, the indexer's picks for CSA, gathered from the cache's storage) + sink, the
        de-rotation and the output projection. Each block's intermediates stay cache-sized. A
        "full" layer also trains here: from position 0 through `full_attention_train`, a chunk
        that continues a state through the blocked path under autograd."""
        b, s = qr.shape[:2]
        win = self.cfg.window_size
        start = int(positions[0])
        windows, gathered = None, 0
        if self.kind == "full" and start == 0 and torch.is_grad_enabled():
            # Training a "full" layer from position 0: one fused causal kernel with a backward
            # (the blocked path below would keep every block's probabilities for autograd).
            o = full_attention_train(self._queries(qr, positions, freqs), keys, self.attn_sink, self.scale)
            o = apply_rope(o.to(qr.dtype), positions, freqs, inverse=True)
            return self._output(o), {"attended_keys": float((positions + 1).sum()) / s}
        if self.kind == "full":
            n_keys = keys.size(1)
            # `full_attention_fused` has no backward: under autograd (a chunk continuing a state)
            # the blocked path runs.
            fused = HAS_CPU_FLASH and not qr.is_cuda and not torch.is_grad_enabled()
        else:
            # Query t's window is rows [t, t + win) of the keys padded in front to win - 1 rows of
            # context; unfold makes that a zero-copy view [b, s, d, win]. The scores are fp32:
            # a bf16 layer converts its rows once here, not once per block and window slot.
            padded = nn.functional.pad(keys.float(), (0, 0, win - 1 - context, 0))
            windows = padded.unfold(1, win, 1)
            n_entries = compressed.size(1) if compressed is not None else 0
            if self.kind == "csa":
                n_entries = gathered = min(n_entries, self.cfg.index_topk)
            if isinstance(compressed, torch.Tensor) and compressed.dtype != torch.float32 \
                    and s * max(gathered, 1) >= compressed.size(1):
                # A prefill reads each entry many times (gathered or per block): convert them to
                # fp32 once. A decode step reads a few, and converts only those.
                compressed = compressed.float()
            n_keys = win + n_entries
            fused = False
        block = self._block_size(n_keys)
        sub = self._block_size(n_keys, gathered)  # queries per attention step within a block
        y, attended = None, 0.0
        for a in range(0, s, block):
            e = min(s, a + block)
            pos = positions[a:e]
            q = self._queries(qr[:, a:e], pos, freqs)  # [b, n, h, d]
            picks = None
            if self.kind == "csa":
                qi = self.indexer.queries(qr[:, a:e], pos, freqs)  # [b, n, hi, di]
                picks = self._pick_entries(qi, head_weights[:, a:e], index_keys, pos)
            if self.kind == "full":
                rows = keys[:, :start + e]
                o = full_attention_fused(q, rows, start + a, self.attn_sink, self.scale) if fused else \
                    joint_attention_inference(q, pos, self.attn_sink, self.scale, rows=rows)
                attended += float((pos + 1).sum()) * b
            else:
                parts = []
                for i in range(0, e - a, sub):
                    j = min(e - a, i + sub)
                    parts.append(self._attend_block(q[:, i:j], pos[i:j], windows[:, a + i:a + j], compressed,
                                                    None if picks is None else picks[:, i:j]))
                o = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
                attended += float((pos + 1).clamp_max(win).sum()) * b
                if self.kind == "csa":
                    attended += float((picks >= 0).sum())
                elif compressed is not None:
                    attended += float(visible_entries(pos, self.ratio).sum()) * b
            o = apply_rope(o.to(qr.dtype), pos, freqs, inverse=True)
            y = self._write_block(y, self._output(o), a, s)
        return y, {"attended_keys": attended / (b * s)}

    def _attend_block(self, q, pos, windows, compressed, picks):
        """Queries q [b, n, h, d] at positions pos: the keys they see, as views of the layer's rows
        and storage, into `joint_attention_inference`; o [b, n, h, d] fp32."""
        entries = picked = None
        if self.kind == "hca":
            # No query of the block sees past its last query's entries: skip the rest.
            entries = _dense(compressed[:, :int(visible_entries(pos[-1:], self.ratio)[0])])
        elif self.kind == "csa":  # a sub-block may see fewer entries than the picks' width
            picked = gather_rows(compressed, picks.clamp_min(0))  # [b, n, k, d]
        return joint_attention_inference(q, pos, self.attn_sink, self.scale, windows=windows, entries=entries,
                                         ratio=self.ratio, picked=picked, picks=picks)

    def _attend_train(self, x, keys, positions, freqs, compressed, index_keys, head_weights, return_aux,
                      dense_csa):
        """The training path (autograd on, or the indexer loss or the dense warm-up asked for).

        The query side - query path, the indexer's picks (no gradient: a discrete choice; chosen in
        a piece's first run, reused when backward recomputes it), `joint_attention` (window +
        compressed entries + sink), the indexer loss against the attention's own share of each pick
        (the teacher), de-rotation and output projection - runs `RECOMPUTE_ROWS` tokens at a time
        through `recompute_pieces`, which keeps only the inputs and recomputes each piece in
        backward; `joint_attention`'s memo keeps each piece's attention output from forward to
        backward, so the rerun skips the attention's forward. Of the [s, heads, head_dim] tensors
        only that output exists at full length (not the queries, nor either gradient). Equal to
        the inference path run through autograd.
        dense_csa: attention over every visible entry, and the indexer loss over all of them."""
        b, s = x.shape[:2]
        win, start = self.cfg.window_size, int(positions[0])
        entries = _dense(compressed) if compressed is not None else None
        picks, picked = None, set()  # picked: the pieces whose picks are chosen
        if self.kind == "csa" and dense_csa:
            if return_aux:  # the loss's "picks": every entry, -1 where a query cannot see it yet
                entry = torch.arange(entries.size(1), device=x.device)
                visible = visible_entries(positions, self.ratio)[:, None]
                picks = torch.where(entry < visible, entry, -1).expand(b, s, -1)
        elif self.kind == "csa":
            picks = x.new_full((b, s, min(self.cfg.index_topk, entries.size(1))), -1, dtype=torch.long)
        choose = self.kind == "csa" and not dense_csa
        want_loss = return_aux and picks is not None
        context = keys.size(1) - s  # rows before the chunk
        # Each piece's attention output from the forward, reused when backward reruns the piece.
        memos = {}

        def query_side(a, e, rows, shared):
            x_piece, weights = rows
            kv, entries, loss_keys = shared  # loss_keys: index_keys, a leaf of the piece in backward
            pos = positions[a:e]
            qr = self.q_norm(self.wq_a(x_piece))
            q = self._queries(qr, pos, freqs)
            first_run = choose and a not in picked
            qi = self.indexer.queries(qr.detach(), pos, freqs) if first_run or want_loss else None
            if first_run:
                with torch.no_grad():
                    for i in range(a, e, self.cfg.query_block_size):
                        j = min(e, i + self.cfg.query_block_size)
                        found = self._pick_entries(qi[:, i - a:j - a], head_weights[:, i:j], index_keys,
                                                   positions[i:j])
                        picks[:, i:j, :found.size(-1)] = found
                picked.add(a)
            lo = context + a - min(start + a, win - 1)  # the piece's window rows before it
            chosen = picks[:, a:e] if picks is not None else None
            o, teacher = joint_attention(q, kv[:, lo:context + e], self.attn_sink, self.scale, win, start + a,
                                         entries, self.ratio, None if dense_csa else chosen,
                                         want_teacher=want_loss, backend=self.backend,
                                         memo=memos.setdefault(a, {}))
            # wo_b's input: `recompute_pieces` applies wo_b (`project`), outside backward's rerun.
            y = self.wo_b.gemm_input(self._derotated_grouped_output(o, pos, freqs).flatten(2))
            if not want_loss:
                return y, None
            total, count = indexer_loss(qi, weights, loss_keys, chosen.contiguous(), teacher)
            return y, torch.stack((total.float(), count.float()))

        params = [p for module in (self.wq_a, self.q_norm, self.wq_b, self.wo_a)
                  for p in module.parameters()] + [self.attn_sink]
        if want_loss:
            params += list(self.indexer.wq_b.parameters())
        y, sums = recompute_pieces(query_side, [x, head_weights if want_loss else None],
                                   [keys, entries, index_keys if want_loss else None], params,
                                   project=self.wo_b.weight)
        attended = float((positions + 1).clamp_max(win).sum()) * b
        if self.kind == "csa" and not dense_csa:
            attended += float((picks >= 0).sum())
        elif entries is not None:
            attended += float(visible_entries(positions, self.ratio).sum()) * b
        aux = {"attended_keys": attended / (b * s)}
        if return_aux:
            if want_loss:
                aux["indexer_loss"] = sums[0] / sums[1].clamp_min(1)
                if not dense_csa:
                    aux["picks"] = picks
            else:
                aux["indexer_loss"] = x.new_zeros((), dtype=torch.float32)
        return y, aux

    def _pick_entries(self, qi, head_weights, index_keys, pos):
        """The indexer's top-k entry ids [b, n, k] (int64, -1 = none) for queries at positions pos."""
        visible = visible_entries(pos, self.ratio)  # [n]
        n_visible = int(visible[-1])  # no query of the block sees past its last query's entries
        keys = index_keys[:, :n_visible]
        if isinstance(keys, torch.Tensor) and qi.dtype != keys.dtype:  # autocast: bf16 q, fp32 keys
            qi, head_weights = qi.to(keys.dtype), head_weights.to(keys.dtype)
        with torch.no_grad():
            return indexer_topk(qi, head_weights, keys, min(self.cfg.index_topk, n_visible), visible).long()

    def _attend_indexed(self, qr, keys, context, positions, freqs, compressed, index_keys,
                        head_weights):
        """The kernel path (Triton on CUDA): one KV buffer (window rows, then compressed entries)
        and an explicit row list per query (SPEC 4), fed to `ops.indexer_topk` and
        `ops.sparse_attention` a query block at a time. Equal to the torch path (tested under
        Triton's interpreter); the indexer loss and the dense CSA warm-up take the training path."""
        b, s = qr.shape[:2]
        win, backend = self.cfg.window_size, self.backend
        buffer = keys if compressed is None else torch.cat((keys, _dense(compressed).to(keys.dtype)), dim=1)
        offset = keys.size(1)  # buffer row of compressed entry 0
        n_entries = 0 if compressed is None else compressed.size(1)
        n_keys = win + (min(n_entries, self.cfg.index_topk) if self.kind == "csa" else n_entries)
        block = self._block_size(n_keys)
        steps = torch.arange(win, device=qr.device)
        y = None
        for a in range(0, s, block):
            e = min(s, a + block)
            pos = positions[a:e]
            q = self._queries(qr[:, a:e], pos, freqs)
            # Query j of the chunk is buffer row context + j; its window is the win rows ending there.
            rows = context + torch.arange(a, e, device=qr.device)[:, None] - win + 1 + steps  # [n, win]
            lists = [rows.masked_fill(rows < 0, -1).expand(b, -1, -1)]
            if compressed is not None:
                visible = visible_entries(pos, self.ratio)  # [n]
                if self.kind == "csa":
                    n_visible = int(visible[-1])
                    picks = indexer_topk(self.indexer.queries(qr[:, a:e], pos, freqs), head_weights[:, a:e],
                                         index_keys[:, :n_visible], min(self.cfg.index_topk, n_visible),
                                         visible, backend=backend)
                else:
                    picks = torch.arange(n_entries, device=qr.device).expand(len(pos), -1)
                    picks = picks.masked_fill(picks >= visible[:, None], -1).expand(b, -1, -1)
                lists.append(torch.where(picks >= 0, picks + offset, -1))
            indices = torch.cat(lists, dim=-1).to(torch.int32)
            o = sparse_attention(q, buffer, self.attn_sink, indices, self.scale, backend=backend)
            o = apply_rope(o.to(qr.dtype), pos, freqs, inverse=True)
            y = self._write_block(y, self._output(o), a, s)
        return y, {}  # aux is only asked for with return_aux, which takes the training path

    def _commit(self, state: LayerState, kv: torch.Tensor, updates: dict) -> None:
        """Write the call's rows into the state; runs only after everything was computed."""
        s = kv.size(1)
        if self.kind == "full":
            state.kv.append(kv)
        else:
            keep = min(s, self.cfg.window_size)
            state.write_window(state.pos + s, kv[:, s - keep:].detach())
        if "compressor" in updates:
            state.compressor = _detached(updates["compressor"])
            state.compressed.append(updates["compressed"])
        if "index_compressor" in updates:
            state.index_compressor = _detached(updates["index_compressor"])
            state.index_keys.append(updates["index_keys"])
        state.pos += s

    def _check_input(self, x, state, check_finite) -> None:
        check_tensor("x", x)
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq, dim], got {x.dim()} dims (shape {tuple(x.shape)})")
        if x.size(-1) != self.cfg.dim:
            raise ValueError(f"x has width {x.size(-1)}, the layer expects dim={self.cfg.dim}")
        if x.size(1) < 1 or x.size(0) < 1:
            raise ValueError(f"x must hold at least one token per sequence, got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype}, the layer holds {self.dtype}; "
                             f"cast x or the layer (layer.to({x.dtype}))")
        if x.device != self.wq_a.weight.device:
            raise ValueError(f"x is on {x.device}, the layer's weights are on {self.wq_a.weight.device}")
        if state is not None:
            self.check_state(state, x.size(0), x.size(1), x.device)
        elif x.size(1) > self.cfg.max_seq_len:
            raise ValueError(f"this chunk would reach position {x.size(1)}, past "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf values (check_finite=True)")

    def check_state(self, state: StreamingState, batch_size: int, seq_len: int,
                    device: torch.device | None = None, name: str = "state") -> None:
        """Raise unless `state` can take the next `seq_len` tokens of `batch_size` sequences (on
        `device`); errors call it `name`. The model checks every layer's state this way before any
        layer changes its own."""
        if not isinstance(state, StreamingState):
            raise TypeError(f"{name} must come from new_state() or a cache, got {type(state).__name__}")
        if state.layer_id != self.layer_id or state.kind != self.kind \
                or state.fingerprint != self._fingerprint:
            raise ValueError(f"{name} belongs to layer {state.layer_id} ({state.kind}), not to "
                             f"layer {self.layer_id} ({self.kind}) of this config")
        if state.batch_size != batch_size:
            raise ValueError(f"{name} holds {state.batch_size} sequences, x has batch {batch_size}")
        if state.dtype != self.dtype:
            raise ValueError(f"{name} holds {state.dtype} rows, the layer {self.dtype}")
        if device is not None and isinstance(state, LayerState) and state.device not in (None, device):
            raise ValueError(f"{name} is on {state.device}, x on {device}")
        if state.pos + seq_len > self.cfg.max_seq_len:
            raise ValueError(f"this chunk would reach position {state.pos + seq_len}, past "
                             f"max_seq_len={self.cfg.max_seq_len}")

    # Reference path -------------------------------------------------------------------------

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        """The official code's construction, for tests: one KV buffer and an explicit index list
        per query, fed to `ops.sparse_attention` (SPEC 3.4, 4). Prefill (state=None) or one decode
        token (x of length 1 after the state's tokens; the state is not changed). Not "full"."""
        if self.kind == "full":
            raise ValueError("reference_forward covers the official layer kinds, not 'full'")
        self._check_input(x, state, False)
        b, s, _ = x.shape
        win = self.cfg.window_size
        decode = state is not None
        if decode and s != 1:
            raise ValueError("reference_forward decodes one token at a time")
        start = state.pos if decode else 0
        work = state if decode else self.new_state(b, x.device)
        positions = torch.arange(start, start + s, device=x.device)
        freqs = self._freqs.to(x.device)
        q, kv, qr = self._project(x, positions, freqs)

        if decode:
            ring = work.window.clone()
            ring[:, start % win] = kv[:, 0]
            buffer_rows, offset = ring, win
            window = window_indices_decode(start, win)[None].expand(s, -1)
        else:
            buffer_rows, offset = kv, s
            window = window_indices_prefill(s, win)
        parts = [window.to(x.device)[None].expand(b, -1, -1)]  # [b, s, win]
        if self.compressor is not None:
            entries, _ = self.compressor(x, start, work.compressor, freqs, self.cfg.quant)
            compressed = work.compressed.with_appended(entries)
            buffer_rows = torch.cat((buffer_rows, compressed), dim=1)
            visible = visible_entries(positions, self.ratio)
            if self.kind == "hca":
                entry = torch.arange(compressed.size(1), device=x.device)
                part = torch.where(entry < visible[:, None], entry + offset, -1)
                parts.append(part[None].expand(b, -1, -1))
            elif compressed.size(1):
                new_keys, _ = self.indexer.compressor(x, start, work.index_compressor, freqs,
                                                      self.cfg.quant)
                keys = work.index_keys.with_appended(new_keys)
                qi = self.indexer.queries(qr, positions, freqs)
                ranking = index_scores(qi, self.indexer.head_weights(x), keys)
                picks = select_entries(ranking, visible, min(self.cfg.index_topk, keys.size(1)))
                parts.append(torch.where(picks >= 0, picks + offset, -1))
        indices = torch.cat(parts, dim=-1).to(torch.int32)
        o = sparse_attention(q, buffer_rows, self.attn_sink, indices, self.scale)
        o = apply_rope(o, positions, freqs, inverse=True)
        return self._output(o)

    # Official weights -----------------------------------------------------------------------

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load tensors under the official names (optionally under `prefix`, e.g. "layers.3.attn.").

        FP8 e4m3 weights come with a sibling `<name>.scale` (ue8m0, one per 128x128 block) and are
        dequantised; bf16 / fp32 tensors are cast to the parameter's dtype. Missing, unexpected or
        wrongly shaped tensors raise a ValueError naming the tensor, before anything is copied."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must map names to tensors, got {type(state_dict).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        for key, value in state_dict.items():
            if not isinstance(key, str):
                raise TypeError(f"state_dict keys must be tensor names (str), got {key!r}")
            if key.startswith(prefix) and not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        own = dict(self.named_parameters())
        given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        unexpected = [prefix + k for k in given if k not in own
                      and not (k.endswith(".scale") and k[: -len(".scale")] in own)]
        if unexpected:
            raise ValueError(f"unexpected tensors for layer {self.layer_id} ({self.kind}): {unexpected}")
        missing = [prefix + k for k in own if k not in given]
        if missing:
            raise ValueError(f"missing tensors for layer {self.layer_id} ({self.kind}): {missing}")
        loaded = {}
        for name, param in own.items():
            tensor = given[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"tensor {prefix + name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
            if tensor.dtype == torch.float8_e4m3fn:
                if tensor.dim() != 2:
                    raise ValueError(f"FP8 tensor {prefix + name} must be a 2-D weight (FP8 scales are "
                                     f"per 128x128 block), got shape {tuple(tensor.shape)}")
                scale = given.get(name + ".scale")
                if scale is None:
                    raise ValueError(f"FP8 tensor {prefix + name} has no {prefix + name}.scale")
                try:
                    tensor = dequantize_fp8_weight(tensor, scale)
                except ValueError as err:
                    raise ValueError(f"tensor {prefix + name}.scale: {err}") from None
            elif name + ".scale" in given:
                raise ValueError(f"tensor {prefix + name}.scale given for a {tensor.dtype} weight; "
                                 "scales belong to float8_e4m3fn weights")
            if not tensor.is_floating_point():
                raise ValueError(f"tensor {prefix + name} has dtype {tensor.dtype}, expected a float")
            loaded[name] = tensor.to(param.dtype)
            if not torch.isfinite(loaded[name]).all():
                raise ValueError(f"tensor {prefix + name} holds NaN or Inf values (in {param.dtype})")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(loaded[name])


def _called(function, *args):
    return function(*args)


def _checkpointed(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def _detached(state):
    return type(state)(state.kv.detach(), state.score.detach())


def _dense(rows):
    """Compressed entries as a tensor: a lazy view of a paged cache (`cache.PagedRowsView`, which
    otherwise decodes only the rows `gather_rows` picks) is decoded whole."""
    return rows if isinstance(rows, torch.Tensor) else rows.dense()


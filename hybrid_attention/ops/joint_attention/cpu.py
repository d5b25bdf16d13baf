"""The fast torch backend of `joint_attention`: forward and backward a chunk of queries at a time,
as a `torch.autograd.Function` (flash-attention style); and, at the end, the inference forward the
layer calls without autograd (`joint_attention_inference`).

Forward keeps only its inputs and the output. Backward recomputes each chunk's probabilities from
the saved inputs, and accumulates the gradients of the shared rows into one preallocated buffer per
input. Nothing of the size of the sequence is materialised per chunk, so a step's memory grows
linearly with the sequence: O(chunk * (win + k)) of work space and O(s * h * d) for the saved
inputs and output.

The window as bands: a chunk's queries go in sub-blocks of nb; the nb queries of a sub-block see,
between them, the nb + win - 1 rows starting at their first query's window, query t of the
sub-block the win rows t .. t + win - 1 of them. So a sub-block's window scores are one GEMM
[nb * h, d] x [d, nb + win - 1] with the rest of the band masked, and the chunk's sub-blocks are
one batched GEMM over overlapping views of the rows (copied only for a batch above 1). A band
does (nb + win - 1) / win of the useful multiply-adds (1.24x at nb = 32, win = 128), in GEMMs
instead of n tiny [h, d] x [d, win] ones. In backward each sub-block's band gradient
[nb + win - 1, d] is added back into the rows' buffer in ceil((nb + win - 1) / nb) shifted adds
over the whole chunk.

HCA's entries (or dense CSA's) are shared by every query of the chunk: one GEMM over the chunk's
queries and the entries the last of them sees, the later ones masked for the earlier queries.
CSA's picks are rows gathered per query. The sink is one more score column (zero value). So the
joint softmax is one `torch.softmax` over [band, entries or picks, sink], which handles the -inf
of the masks at full speed (`torch.exp` of -inf or of anything below about -87 takes a slow path,
7x slower), and the sink's gradient is its column of dZ.

With P the joint probabilities, dO the output's gradient and delta = <dO, O> per (query, head):
    dZ = P * (dO . V - delta)                  (softmax backward; the sink has a zero value)
    dq = scale * dZ @ K,   dK = scale * dZ^T q,   dV = P^T dO   (K = V: the same rows get both)
    dsink = sum_(b, t) dZ_sink = -sum_(b, t) P_sink * delta
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..autocast import without_autocast

# Queries per chunk (a multiple of SUB_BLOCK): the chunk's scores [b, n, h, nb + win - 1 + t or k]
# stay a few MB.
QUERY_BLOCK = 256
# Queries per band: nb + win - 1 rows for nb queries; smaller wastes less of the band but makes
# smaller GEMMs (32 measured fastest for win = 128 on the benchmark CPU).
SUB_BLOCK = 32


class _Call:
    """What every chunk of one call shares: the rows padded for the bands, the entries, the sink,
    the picks, and the band's mask bias for a sub-block that sees no position before 0 (cached)."""

    def __init__(self, q, kv, entries, sink, picks, scale, window_size, start, ratio):
        b, s, h, d = q.shape
        self.q, self.entries, self.sink, self.picks = q, entries, sink, picks
        self.scale, self.window_size, self.start, self.ratio = scale, window_size, start, ratio
        self.sub = min(SUB_BLOCK, QUERY_BLOCK)
        self.chunk = QUERY_BLOCK // self.sub * self.sub
        self.band = self.sub + window_size - 1  # rows of a sub-block's band
        self.shifts = math.ceil(self.band / self.sub)  # sub-block-sized pieces of a band
        # Query t's window is rows t .. t + win - 1 of the padded rows; at the end, rows for the
        # last sub-block's padding queries and for a band cut into whole sub-blocks.
        s_pad = math.ceil(s / self.sub) * self.sub
        self.front = window_size - 1 - (kv.size(1) - s)
        back = s_pad + self.shifts * self.sub - self.sub - (s + window_size - 1)
        self.kv_pad = F.pad(kv, (0, 0, self.front, back))  # [b, s_pad + (shifts - 1) * nb, d]
        self._interior = None

    def bias(self, a: int, n_sub: int) -> torch.Tensor:
        """The band mask of the chunk's n_sub sub-blocks from query a on: [1 or b * n_sub, nb * h, L],
        0 inside query t's window, -inf outside it and before position 0."""
        nb, win, h, L = self.sub, self.window_size, self.sink.numel(), self.band
        b = self.q.size(0)
        interior = self.start + a >= win - 1
        if interior and self._interior is not None:
            return self._interior
        dev = self.kv_pad.device
        column = torch.arange(L, device=dev)
        offset = column - torch.arange(nb, device=dev)[:, None]  # [nb, L]: window slot of the column
        masked = (offset < 0) | (offset >= win)
        if not interior:  # rows before position 0: band row c of sub-block i is position p0 + c
            first = self.start + a + torch.arange(n_sub, device=dev) * nb - win + 1
            masked = masked | (first[:, None, None] + column < 0)  # [n_sub, nb, L]
        bias = torch.zeros(masked.shape, dtype=self.kv_pad.dtype, device=dev)
        bias.masked_fill_(masked, float("-inf"))
        bias = bias.unsqueeze(-2).expand(*masked.shape[:-1], h, L).reshape(-1, nb * h, L)
        if interior:
            self._interior = bias
            return bias
        return bias.repeat(b, 1, 1)


class _Chunk:
    """One chunk's keys and joint probabilities, recomputed identically in forward and backward."""

    def __init__(self, call: _Call, a: int, e: int):
        b, _, h, d = call.q.shape
        nb, L = call.sub, call.band
        dev = call.q.device
        self.n = e - a
        self.n_sub = math.ceil(self.n / nb)
        n_pad = self.n_sub * nb
        self.shape = (b, n_pad, h, d)
        q = call.q[:, a:e].to(call.kv_pad.dtype) * call.scale
        if n_pad > self.n:  # the last chunk: zero queries to fill its last sub-block
            q = F.pad(q, (0, 0, 0, 0, 0, n_pad - self.n))
        self.q = q  # [b, n_pad, h, d], scaled
        # Sub-block i's band: rows a + i * nb .. a + i * nb + L - 1 of the padded rows (views).
        rows = call.kv_pad[:, a:a + n_pad - nb + L]
        self.bands = rows.unfold(1, L, nb).transpose(-1, -2).reshape(b * self.n_sub, L, d)
        z = torch.baddbmm(call.bias(a, self.n_sub), q.view(b * self.n_sub, nb * h, d),
                          self.bands.transpose(1, 2)).view(b, n_pad, h, L)
        segments = [z]
        self.entries = self.picked = self.ids = None
        if call.entries is not None and call.picks is None:  # HCA (or dense CSA): every visible entry
            visible = torch.div(call.start + torch.arange(a, a + n_pad, device=dev) + 1, call.ratio,
                                rounding_mode="floor").clamp_max(call.entries.size(1))
            n_visible = int(visible[self.n - 1])
            self.entries = call.entries[:, :n_visible]  # [b, t, d]
            z = (q.view(b, n_pad * h, d) @ self.entries.transpose(1, 2)).view(b, n_pad, h, n_visible)
            hidden = torch.arange(n_visible, device=dev) >= visible[:, None]  # [n_pad, t]
            segments.append(z.masked_fill_(hidden[None, :, None], float("-inf")))
        elif call.picks is not None:  # CSA: the indexer's picks, -1 = none
            ids = call.picks[:, a:e]  # [b, n, k]
            if n_pad > self.n:
                ids = F.pad(ids, (0, 0, 0, n_pad - self.n), value=-1)
            offsets = torch.arange(b, device=dev)[:, None, None] * call.entries.size(1)
            self.ids = (ids.clamp_min(0) + offsets).reshape(-1)
            k = ids.size(-1)
            self.picked = call.entries.reshape(-1, d).index_select(0, self.ids).view(b, n_pad, k, d)
            z = q @ self.picked.transpose(-1, -2)  # [b, n_pad, h, k]
            segments.append(z.masked_fill_((ids < 0)[:, :, None], float("-inf")))
        segments.append(call.sink[:, None].expand(b, n_pad, h, 1))
        # The joint softmax; a query's window holds its own row, so no row is all -inf.
        self.p = torch.softmax(torch.cat(segments, dim=-1), dim=-1)
        self.p_band, self.p_entries = self.p[..., :L], self.p[..., L:-1]  # entries or picks
        self.p_sink = self.p[..., -1]

    def entry_mass(self) -> torch.Tensor:
        """The compressed entries' (or picks') probabilities summed over heads: [b, n, t or k]."""
        return self.p_entries[:, :self.n].sum(2)

    def weighted_sum(self) -> torch.Tensor:
        """sum_j P_j V_j: [b, n, h, d] (the sink's value is the zero row)."""
        b, n_pad, h, d = self.shape
        nb = n_pad // self.n_sub
        out = (self.p_band.reshape(b * self.n_sub, nb * h, -1) @ self.bands).view(b, n_pad, h, d)
        if self.entries is not None:
            out += (self.p_entries.reshape(b, n_pad * h, -1) @ self.entries).view(b, n_pad, h, d)
        elif self.picked is not None:
            out += self.p_entries @ self.picked
        return out[:, :self.n]


class JointAttention(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, q, kv, compressed, sink, picks, scale, window_size, start, ratio, want_teacher,
                memo=None):
        acc = _accumulation_dtype(q)
        kv_acc = kv.to(acc)
        entries = compressed.to(acc).contiguous() if compressed is not None else None
        sink_acc = sink.to(acc)
        want_teacher = want_teacher and compressed is not None
        if memo:  # the same call again (activation checkpointing's rerun): its results as they were
            out, teacher = memo.pop("out"), memo.pop("teacher")
        else:
            call = _Call(q, kv_acc, entries, sink_acc, picks, scale, window_size, start, ratio)
            out, teacher = _forward(call, want_teacher)
            if memo is not None:
                memo.update(out=out, teacher=teacher)
        ctx.save_for_backward(q, kv_acc, entries, sink_acc, picks, out)
        ctx.scale, ctx.window_size, ctx.start, ctx.ratio = scale, window_size, start, ratio
        ctx.dtypes = (q.dtype, kv.dtype, None if compressed is None else compressed.dtype)
        if teacher is not None:
            ctx.mark_non_differentiable(teacher)
        return out, teacher

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_teacher):
        q, kv, entries, sink, picks, out = ctx.saved_tensors
        call = _Call(q, kv, entries, sink, picks, ctx.scale, ctx.window_size, ctx.start, ctx.ratio)
        b, s, h, d = q.shape
        nb, L, shifts = call.sub, call.band, call.shifts
        acc = kv.dtype
        dq = q.new_empty(b, s, h, d, dtype=acc)
        dkv_pad = torch.zeros_like(call.kv_pad)
        dentries = torch.zeros_like(entries) if entries is not None else None
        dsink = torch.zeros_like(sink)
        grad_out = grad_out.to(acc)
        for a in range(0, s, call.chunk):
            e = min(s, a + call.chunk)
            blk = _Chunk(call, a, e)
            n, n_sub = blk.n, blk.n_sub
            n_pad = n_sub * nb
            do, o = grad_out[:, a:e], out[:, a:e]
            if n_pad > n:  # the padding queries: zero gradient, so they add nothing
                do, o = (F.pad(t, (0, 0, 0, 0, 0, n_pad - n)) for t in (do, o))
            delta = (do * o).sum(-1, keepdim=True)  # [b, n_pad, h, 1]
            dsink -= (blk.p_sink * delta[..., 0]).sum((0, 1))

            # The bands: one batched GEMM per product over the chunk's sub-blocks.
            do_sub = do.reshape(b * n_sub, nb * h, d)
            q_sub = blk.q.view(b * n_sub, nb * h, d)
            p_band = blk.p_band.reshape(b * n_sub, nb * h, L)
            dz = p_band * (torch.bmm(do_sub, blk.bands.transpose(1, 2)) - delta.view(b * n_sub, nb * h, 1))
            dq_blk = torch.bmm(dz, blk.bands).view(b, n_pad, h, d)
            d_bands = torch.baddbmm(p_band.transpose(1, 2) @ do_sub, dz.transpose(1, 2), q_sub)
            # Sub-block i's band starts at row a + i * nb: add it back in whole sub-block pieces.
            d_bands = F.pad(d_bands, (0, 0, 0, shifts * nb - L)).view(b, n_sub, shifts, nb, d)
            target = dkv_pad[:, a:a + (n_sub + shifts - 1) * nb].view(b, n_sub + shifts - 1, nb, d)
            for j in range(shifts):
                target[:, j:j + n_sub] += d_bands[:, :, j]

            if blk.entries is not None:  # shared by the chunk's queries: GEMMs over all of them
                t = blk.entries.size(1)
                do_flat, q_flat = do.reshape(b, n_pad * h, d), blk.q.view(b, n_pad * h, d)
                p_flat = blk.p_entries.reshape(b, n_pad * h, t)
                dz = p_flat * (do_flat @ blk.entries.transpose(1, 2) - delta.view(b, n_pad * h, 1))
                dq_blk += (dz @ blk.entries).view(b, n_pad, h, d)
                dentries[:, :t] += torch.baddbmm(p_flat.transpose(1, 2) @ do_flat, dz.transpose(1, 2), q_flat)
            elif blk.picked is not None:  # the picks: gathered rows, gradients added back by index
                dz = blk.p_entries * (do @ blk.picked.transpose(-1, -2) - delta)  # [b, n_pad, h, k]
                dq_blk += dz @ blk.picked
                d_picked = torch.matmul(dz.transpose(-1, -2), blk.q) + blk.p_entries.transpose(-1, -2) @ do
                dentries.view(-1, d).index_add_(0, blk.ids, d_picked.reshape(-1, d))  # 0 for -1 picks
            dq[:, a:e] = dq_blk[:, :n] * ctx.scale

        q_dtype, kv_dtype, c_dtype = ctx.dtypes
        dkv = None
        if ctx.needs_input_grad[1]:
            dkv = dkv_pad[:, call.front:call.front + kv.size(1)].to(kv_dtype)
        dc = dentries.to(c_dtype) if dentries is not None and ctx.needs_input_grad[2] else None
        return (dq.to(q_dtype), dkv, dc, dsink if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


def _forward(call: _Call, want_teacher: bool):
    """out [b, s, h, d] and the teacher (or None), a chunk at a time."""
    q = call.q
    b, s, h, d = q.shape
    out = q.new_empty(b, s, h, d, dtype=call.kv_pad.dtype)
    teacher = None
    if want_teacher:
        width = call.picks.size(-1) if call.picks is not None else call.entries.size(1)
        teacher = q.new_zeros(b, s, width, dtype=call.kv_pad.dtype)
    for a in range(0, s, call.chunk):
        e = min(s, a + call.chunk)
        blk = _Chunk(call, a, e)
        out[:, a:e] = blk.weighted_sum()
        if teacher is not None:
            mass = blk.entry_mass()
            teacher[:, a:e, :mass.size(-1)] = mass
    return out, teacher


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs (as the reference accumulates), fp64 for fp64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def joint_attention_cpu(q, kv, sink, scale, window_size, start, compressed, ratio, picks, want_teacher,
                        memo=None):
    return JointAttention.apply(q, kv, compressed, sink, picks, scale, window_size, start, ratio,
                                want_teacher, memo)


# Inference ---------------------------------------------------------------------------------------
# Without autograd the layer calls these on each query block of a prefill or decode step: exactly
# the useful work (a window is its own rows, not a band), the keys prepared by the layer as views
# of its state and storage: `windows` the unfolded window rows, `entries` the compressed entries
# the block sees, `picked` the rows the indexer chose (gathered from a paged cache where needed).


def joint_attention_inference(q: torch.Tensor, positions: torch.Tensor, sink: torch.Tensor, scale: float,
                              windows: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                              entries: torch.Tensor | None = None, ratio: int = 0,
                              picked: torch.Tensor | None = None,
                              picks: torch.Tensor | None = None) -> torch.Tensor:
    """o [b, n, h, d] fp32 of queries q [b, n, h, d] at `positions` [n], over one joint softmax of:

    windows [b, n, d, win]: each query's window rows (slot j = position p - win + 1 + j, masked
      below position 0), or rows [b, p_last + 1, d]: every row up to the block's last query, causal
      (the "full" kind);
    entries [b, t, d] (HCA): compressed entries, entry i visible from position (i + 1) * ratio - 1;
    picked [b, n, k, d] with picks [b, n, k] (CSA): the rows of the indexer's picks, -1 = none;
    and the sink (one logit per head, zero value). Plain torch ops, so autograd can follow them
    (the "full" kind trains through this function; the other kinds through `JointAttention`)."""
    q = q.float() * scale
    scores, values = [], []  # segments: scores [b, n, h, k], and how to apply their values
    if rows is not None:
        rows = rows.float()
        z = torch.einsum("bqhd,bkd->bqhk", q, rows)
        future = torch.arange(rows.size(1), device=q.device)[None, :] > positions[:, None]  # [n, k]
        scores.append(z.masked_fill_(future[None, :, None], float("-inf")))
        values.append(("shared", rows))
    else:
        windows = windows.float()
        win = windows.size(-1)
        z = torch.einsum("bqhd,bqdw->bqhw", q, windows)
        if int(positions[0]) < win - 1:  # the first queries' windows reach before position 0
            key_pos = positions[:, None] - win + 1 + torch.arange(win, device=q.device)
            z.masked_fill_((key_pos < 0)[None, :, None], float("-inf"))
        scores.append(z)
        values.append(("window", windows))
    if entries is not None:
        entries = entries.float()
        visible = torch.div(positions + 1, ratio, rounding_mode="floor")  # [n]
        z = torch.einsum("bqhd,btd->bqht", q, entries)
        lo = int(visible[0])  # every query of the block sees the entries before this one
        hidden = torch.arange(lo, entries.size(1), device=q.device) >= visible[:, None]
        z[..., lo:].masked_fill_(hidden[None, :, None], float("-inf"))
        scores.append(z)
        values.append(("shared", entries))
    if picked is not None:
        picked = picked.float()
        z = q @ picked.transpose(-1, -2)  # [b, n, h, k]; bmm beats einsum here
        scores.append(z.masked_fill_((picks < 0)[:, :, None], float("-inf")))
        values.append(("picked", picked))
    probs = sink_softmax(scores, sink)
    out = 0
    for p, (how, v) in zip(probs.split([z.size(-1) for z in scores], dim=-1), values, strict=True):
        if how == "window":
            out = out + torch.einsum("bqhw,bqdw->bqhd", p, v)
        elif how == "shared":  # rows shared by the block's queries: one GEMM, no broadcast copy
            out = out + (p.flatten(1, 2) @ v).view(p.shape[:3] + (-1,))
        else:
            out = out + p @ v
    return out


def sink_softmax(segments: list[torch.Tensor], sink: torch.Tensor) -> torch.Tensor:
    """The joint softmax over the score segments [b, n, h, k_i] side by side, with the sink as one
    more column, in one fused `torch.softmax`: [b, n, h, sum k_i] fp32 (the sink's column dropped).
    Every row has a finite score (a query's window holds its own row), so no row is all -inf."""
    b, n, h = segments[0].shape[:3]
    sink_column = sink.float()[:, None].expand(b, n, h, 1)
    probs = torch.softmax(torch.cat((*segments, sink_column), dim=-1), dim=-1)
    return probs[..., :-1]


def full_attention_train(q: torch.Tensor, rows: torch.Tensor, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The "full" kind's training op: o [b, s, h, d] fp32 of queries q [b, s, h, d] at positions
    0 .. s - 1 over the causal rows [b, s, d] and the sink, differentiable in all three, through
    `scaled_dot_product_attention` (a fused kernel with its own backward, memory O(s)), equal to
    `joint_attention_inference(q, positions, sink, scale, rows=rows)` (tested, forward and backward),
    which keeps [b, s, h, s] probabilities for autograd.

    The sink is one more key: every query gets a constant 1 in an extra dimension, every row a 0
    there, and the sink key of head h is zero except sink[h] there, with a zero value; so its score
    is sink[h] for every query. It sits before row 0, and one zero query before query 0 makes the
    mask square: query t (row t + 1) then sees the sink and rows 0 .. t under `is_causal`."""
    b, s, h, d = q.shape
    qh = q.float().transpose(1, 2) * scale  # [b, h, s, d]
    queries = torch.cat((qh, qh.new_ones(b, h, s, 1)), dim=-1)
    queries = torch.cat((qh.new_zeros(b, h, 1, d + 1), queries), dim=2)  # [b, h, s + 1, d + 1]
    keys = rows.float()[:, None].expand(b, h, s, d)
    keys = torch.cat((keys, keys.new_zeros(b, h, s, 1)), dim=-1)
    sink_key = torch.cat((qh.new_zeros(h, d), sink.float()[:, None]), dim=-1)  # [h, d + 1]
    keys = torch.cat((sink_key[None, :, None].expand(b, h, 1, d + 1), keys), dim=2)  # [b, h, s + 1, d + 1]
    # The values: the keys with the sink's zeroed (their extra dimension is 0 for the rows too).
    # As wide as the keys: torch's fused CPU kernel wants one head size (with d it takes the math
    # path, no faster than the blocked one).
    values = torch.cat((keys.new_zeros(b, h, 1, d + 1), keys[:, :, 1:]), dim=2)
    o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=1.0)
    return o[:, :, 1:, :d].transpose(1, 2)  # [b, s, h, d]


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
HAS_CPU_FLASH = _CPU_FLASH is not None


@torch.no_grad()
def full_attention_fused(q: torch.Tensor, rows: torch.Tensor, start: int, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The "full" kind's inference on torch's fused CPU flash kernel, which also returns the
    log-sum-exp: over the earlier rows (no mask) and the block's own rows (causal), the two partial
    softmaxes and the sink then merged:
        o = sum_i o_i e^(lse_i - m) / (sum_i e^(lse_i - m) + e^(sink - m)).
    q [b, n, h, d] at positions [start, start + n), rows [b, start + n, d]: o [b, n, h, d] fp32,
    equal to `joint_attention_inference(..., rows=rows)` (tested)."""
    b, s, h, d = q.shape
    qh = q.float().transpose(1, 2)  # [b, h, s, d]
    parts = []
    for part, causal in ((rows[:, :start], False), (rows[:, start:], True)):
        if part.size(1):
            kv = part.float()[:, None].expand(b, h, part.size(1), d)  # the one KV head, shared
            parts.append(_CPU_FLASH(qh, kv, kv, 0.0, causal, attn_mask=None, scale=scale)[:2])
    sink = sink.float()[None, :, None]  # [1, h, 1]
    m = torch.stack([lse for _, lse in parts]).amax(0).clamp_min(sink)  # [b, h, s]
    weights = [torch.exp(lse - m) for _, lse in parts]
    denom = sum(weights) + torch.exp(sink - m)
    o = sum(part * (w / denom)[..., None] for (part, _), w in zip(parts, weights, strict=True))
    return o.transpose(1, 2)  # [b, s, h, d] fp32

"""The fast torch backend of `joint_attention`: forward and backward a query block at a time, as a
`torch.autograd.Function` (flash-attention style); and, at the end, the inference forward the
layer calls without autograd (`joint_attention_inference`).

Forward keeps, per query and head, only the log-sum-exp of the joint softmax (window + compressed
+ sink) besides the output. Backward recomputes each block's scores from the saved inputs, and
accumulates the gradients of the shared rows into one preallocated buffer per input. Nothing of the
size of the sequence is materialised per block, so a step's memory grows linearly with the
sequence: O(block * (win + k)) of work space and O(s * h * d) for the saved inputs and output.

The window as a band: the n queries of a block see, between them, the n + win - 1 rows
a .. e + win - 2 of the front-padded KV, query t the win rows t .. t + win - 1. So the block's
window scores are one GEMM [n * h, d] x [d, n + win - 1] with everything outside the band masked;
its weighted sum, and in backward its dq and the rows' gradient, are GEMMs with the same band of
probabilities (zero outside). That does up to twice the useful multiply-adds in big GEMMs instead
of n tiny [h, d] x [d, win] ones, and the rows' gradient lands in the buffer in one add.

With P the joint probabilities, dO the output's gradient and delta = <dO, O> per (query, head):
    dZ = P * (dO . V - delta)                  (softmax backward; the sink has a zero value)
    dq = scale * dZ @ K,   dK = scale * dZ^T q,   dV = P^T dO   (K = V: the same rows get both)
    dsink = -sum_(b, t) P_sink * delta
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..autocast import without_autocast

# Queries per block: the band [n, n + win - 1] is half useful at n = win = 128; the block's scores
# [b, n, h, n + win - 1 + k] stay about a MB.
QUERY_BLOCK = 128


class _Block:
    """One query block's keys and masked scores, recomputed identically in forward and backward."""

    def __init__(self, qs, kv_pad, compressed, picks, start, a, e, window_size, ratio):
        b, n, h, d = qs.shape
        dev = qs.device
        self.shape = (b, n, h, d)
        self.flat_q = qs.reshape(b, n * h, d)
        band = kv_pad[:, a:e + window_size - 1]  # [b, L, d], L = n + win - 1
        self.n_band = band.size(1)
        column = torch.arange(self.n_band, device=dev)
        offset = column - torch.arange(n, device=dev)[:, None]  # row a + c is window row c - t of query t
        masked = (offset < 0) | (offset >= window_size) | (start - window_size + 1 + a + column < 0)
        self.rows, self.n_visible = band, 0
        if compressed is not None and picks is None:  # HCA (or dense CSA): every visible entry
            # Entries are shared by the block's queries like the band: one set of rows, one GEMM.
            visible = torch.div(start + torch.arange(a, e, device=dev) + 1, ratio, rounding_mode="floor")
            self.n_visible = int(visible[-1])
            self.rows = torch.cat((band, compressed[:, :self.n_visible]), dim=1)  # [b, L + t, d]
            hidden = torch.arange(self.n_visible, device=dev) >= visible[:, None]  # [n, t]
            masked = torch.cat((masked, hidden), dim=1)
        z = (self.flat_q @ self.rows.transpose(1, 2)).view(b, n, h, self.rows.size(1))
        self.z_shared = z.masked_fill_(masked[None, :, None], float("-inf"))  # [b, n, h, L (+ t)]
        self.z_entries = self.picked = self.ids = None
        if picks is not None:  # CSA: the indexer's picks, -1 = none
            ids = picks[:, a:e]  # [b, n, k]
            offsets = torch.arange(b, device=dev)[:, None, None] * compressed.size(1)
            self.ids = (ids.clamp_min(0) + offsets).reshape(-1)
            self.picked = compressed.reshape(-1, d).index_select(0, self.ids).view(b, n, ids.size(-1), d)
            z = qs @ self.picked.transpose(-1, -2)  # [b, n, h, k]
            self.z_entries = z.masked_fill_((ids < 0)[:, :, None], float("-inf"))

    def softmax(self, sink: torch.Tensor):
        """The joint softmax: (P of the shared rows, P of the picks or None, log-sum-exp [b, n, h]),
        in one exp pass. The max is finite: every query's window holds its own row."""
        m = self.z_shared.amax(-1, keepdim=True)  # [b, n, h, 1]
        if self.z_entries is not None and self.z_entries.size(-1):
            m = torch.maximum(m, self.z_entries.amax(-1, keepdim=True))
        m = torch.maximum(m, sink[:, None])
        p_shared = torch.exp(self.z_shared - m)
        denom = p_shared.sum(-1, keepdim=True) + torch.exp(sink[:, None] - m)
        p_picked = None
        if self.z_entries is not None:
            p_picked = torch.exp(self.z_entries - m)
            denom += p_picked.sum(-1, keepdim=True)
            p_picked /= denom
        p_shared /= denom
        return p_shared, p_picked, (m + torch.log(denom))[..., 0]

    def probabilities(self, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p_shared = torch.exp(self.z_shared - lse[..., None])  # zero outside the band
        p_picked = torch.exp(self.z_entries - lse[..., None]) if self.z_entries is not None else None
        return p_shared, p_picked

    def entry_mass(self, p_shared, p_picked) -> torch.Tensor:
        """The compressed entries' probabilities summed over heads: [b, n, t or k]."""
        return (p_picked if p_picked is not None else p_shared[..., self.n_band:]).sum(2)

    def weighted_sum(self, p_shared, p_picked) -> torch.Tensor:
        """sum_j P_j V_j: [b, n, h, d]."""
        b, n, h, d = self.shape
        out = (p_shared.reshape(b, n * h, -1) @ self.rows).view(b, n, h, d)
        if self.picked is not None:
            out += p_picked @ self.picked
        return out


class JointAttention(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, q, kv, compressed, sink, picks, scale, window_size, start, ratio, want_teacher,
                memo=None):
        b, s, h, d = q.shape
        acc = _accumulation_dtype(q)
        pad = window_size - 1 - (kv.size(1) - s)
        kv_pad = F.pad(kv.to(acc), (0, 0, pad, 0))  # [b, s + win - 1, d]: query t's window starts at t
        entries = compressed.to(acc).contiguous() if compressed is not None else None
        sink_acc = sink.to(acc)
        want_teacher = want_teacher and compressed is not None
        if memo:  # the same call again (activation checkpointing's rerun): its results as they were
            out, lse, teacher = memo.pop("out"), memo.pop("lse"), memo.pop("teacher")
        else:
            out, lse, teacher = _forward(q, kv_pad, entries, sink_acc, picks, scale, window_size, start,
                                         ratio, want_teacher)
            if memo is not None:
                memo.update(out=out, lse=lse, teacher=teacher)
        ctx.save_for_backward(q, kv_pad, entries, sink_acc, picks, out, lse)
        ctx.scale, ctx.window_size, ctx.start, ctx.ratio = scale, window_size, start, ratio
        ctx.pad, ctx.dtypes = pad, (q.dtype, kv.dtype, None if compressed is None else compressed.dtype)
        if teacher is not None:
            ctx.mark_non_differentiable(teacher)
        return out, teacher

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_teacher):
        q, kv_pad, entries, sink, picks, out, lse = ctx.saved_tensors
        scale, win, start, ratio = ctx.scale, ctx.window_size, ctx.start, ctx.ratio
        b, s, h, d = q.shape
        acc = kv_pad.dtype
        dq = q.new_empty(b, s, h, d, dtype=acc)
        dkv_pad = torch.zeros_like(kv_pad)
        dentries = torch.zeros_like(entries) if entries is not None else None
        dsink = torch.zeros_like(sink)
        grad_out = grad_out.to(acc)
        for a in range(0, s, QUERY_BLOCK):
            e = min(s, a + QUERY_BLOCK)
            n = e - a
            blk = _Block(q[:, a:e].to(acc) * scale, kv_pad, entries, picks, start, a, e, win, ratio)
            block_lse = lse[:, a:e]
            p_shared, p_picked = blk.probabilities(block_lse)
            do = grad_out[:, a:e]  # [b, n, h, d]
            do_flat = do.reshape(b, n * h, d)
            delta = (do * out[:, a:e]).sum(-1, keepdim=True)  # [b, n, h, 1]
            dsink -= (torch.exp(sink[:, None] - block_lse[..., None]) * delta).sum((0, 1, 3))

            # The shared rows (band, and HCA's entries): every product is a GEMM over them.
            width = blk.rows.size(1)
            dz = p_shared * ((do_flat @ blk.rows.transpose(1, 2)).view(b, n, h, width) - delta)
            dz_flat, p_flat = dz.view(b, n * h, width), p_shared.view(b, n * h, width)
            dq_blk = dz_flat @ blk.rows  # [b, n * h, d]
            d_rows = torch.baddbmm(p_flat.transpose(1, 2) @ do_flat, dz_flat.transpose(1, 2), blk.flat_q)
            dkv_pad[:, a:e + win - 1] += d_rows[:, :blk.n_band]
            if blk.n_visible:
                dentries[:, :blk.n_visible] += d_rows[:, blk.n_band:]
            dq_blk = dq_blk.view(b, n, h, d)
            if blk.picked is not None:  # the picks: gathered rows, gradients added back by index
                dz_c = p_picked * (do @ blk.picked.transpose(-1, -2) - delta)  # [b, n, h, k]
                dq_blk += dz_c @ blk.picked
                qs = blk.flat_q.view(b, n, h, d)
                d_picked = torch.matmul(dz_c.transpose(-1, -2), qs) + p_picked.transpose(-1, -2) @ do
                dentries.view(-1, d).index_add_(0, blk.ids, d_picked.reshape(-1, d))  # 0 for -1 picks
            dq[:, a:e] = dq_blk * scale

        q_dtype, kv_dtype, c_dtype = ctx.dtypes
        dkv = dkv_pad[:, ctx.pad:].to(kv_dtype) if ctx.needs_input_grad[1] else None
        dc = dentries.to(c_dtype) if dentries is not None and ctx.needs_input_grad[2] else None
        return (dq.to(q_dtype), dkv, dc, dsink if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


def _forward(q, kv_pad, entries, sink, picks, scale, window_size, start, ratio, want_teacher):
    """out [b, s, h, d], lse [b, s, h] and the teacher (or None), a query block at a time."""
    b, s, h, d = q.shape
    acc = kv_pad.dtype
    out = q.new_empty(b, s, h, d, dtype=acc)
    lse = q.new_empty(b, s, h, dtype=acc)
    teacher = None
    if want_teacher:
        width = picks.size(-1) if picks is not None else entries.size(1)
        teacher = q.new_zeros(b, s, width, dtype=acc)
    for a in range(0, s, QUERY_BLOCK):
        e = min(s, a + QUERY_BLOCK)
        blk = _Block(q[:, a:e].to(acc) * scale, kv_pad, entries, picks, start, a, e, window_size, ratio)
        p_shared, p_picked, lse[:, a:e] = blk.softmax(sink)
        out[:, a:e] = blk.weighted_sum(p_shared, p_picked)
        if teacher is not None:
            mass = blk.entry_mass(p_shared, p_picked)
            teacher[:, a:e, :mass.size(-1)] = mass
    return out, lse, teacher


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

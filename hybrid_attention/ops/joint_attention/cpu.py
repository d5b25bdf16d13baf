"""The fast torch backend of `joint_attention`: forward and backward a query block at a time, as a
`torch.autograd.Function` (flash-attention style); and, at the end, the inference forward the
layer calls without autograd (`joint_attention_inference`).

Forward keeps only its inputs and the output. Backward recomputes each block's probabilities from
the saved inputs, and accumulates the gradients of the shared rows into one preallocated buffer per
input. Nothing of the size of the sequence is materialised per block, so a step's memory grows
linearly with the sequence: O(block * (win + k)) of work space and O(s * h * d) for the saved
inputs and output.

The window as a band: the n queries of a block see, between them, the n + win - 1 rows
a .. e + win - 2 of the front-padded KV, query t the win rows t .. t + win - 1. So the block's
window scores are one GEMM [n * h, d] x [d, n + win - 1] with everything outside the band masked;
its weighted sum, and in backward its dq and the rows' gradient, are GEMMs with the same band of
probabilities (zero outside). That does up to twice the useful multiply-adds in big GEMMs instead
of n tiny [h, d] x [d, win] ones, and the rows' gradient lands in the buffer in one add.

The block's shared keys are [zero row, band, (HCA) entries]: the zero row is the sink, whose logit
and the band's mask come in as the bias of the score GEMM (`baddbmm`: sink[h] in column 0, -inf
outside the band, 0 elsewhere), and whose value is zero. So the joint softmax is one
`torch.softmax` over the scores (with CSA's picked entries beside them), which handles the -inf of
the masks at full speed (`torch.exp` of -inf or of anything below about -87 takes a slow path, 7x
slower), and the sink's gradient is its column of dZ.

With P the joint probabilities, dO the output's gradient and delta = <dO, O> per (query, head):
    dZ = P * (dO . V - delta)                  (softmax backward; the sink has a zero value)
    dq = scale * dZ @ K,   dK = scale * dZ^T q,   dV = P^T dO   (K = V: the same rows get both)
    dsink = sum_(b, t) dZ_sink = -sum_(b, t) P_sink * delta
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..autocast import without_autocast

# Queries per block: the band [n, n + win - 1] is half useful at n = win = 128; the block's scores
# [b, n, h, n + win - 1 + k] stay about a MB.
QUERY_BLOCK = 128


class _Call:
    """What every block of one call shares: the padded rows with the sink's zero row, and the
    score bias of a block of QUERY_BLOCK queries that sees no position before 0 (cached)."""

    def __init__(self, q, kv_pad, entries, sink, picks, scale, window_size, start, ratio):
        self.q, self.kv_pad, self.entries, self.sink, self.picks = q, kv_pad, entries, sink, picks
        self.scale, self.window_size, self.start, self.ratio = scale, window_size, start, ratio
        self.zero_row = kv_pad.new_zeros(kv_pad.size(0), 1, kv_pad.size(2))
        self._interior = None

    def bias(self, a: int, e: int) -> torch.Tensor:
        """[n, h, 1 + n + win - 1]: sink[h] in column 0, then 0 inside query t's band, -inf outside
        it and before position 0."""
        n, win, h = e - a, self.window_size, self.sink.numel()
        interior = n == QUERY_BLOCK and self.start + a >= win - 1
        if interior and self._interior is not None:
            return self._interior
        dev = self.kv_pad.device
        column = torch.arange(n + win - 1, device=dev)
        offset = column - torch.arange(n, device=dev)[:, None]  # row a + c is window row c - t of query t
        masked = (offset < 0) | (offset >= win) | (self.start - win + 1 + a + column < 0)
        band = torch.zeros(masked.shape, dtype=self.kv_pad.dtype, device=dev)
        band.masked_fill_(masked, float("-inf"))
        bias = torch.cat((self.sink[None, :, None].expand(n, h, 1), band[:, None].expand(n, h, -1)), dim=-1)
        if interior:
            self._interior = bias
        return bias


class _Block:
    """One query block's keys and joint probabilities, recomputed identically in forward and
    backward."""

    def __init__(self, call: _Call, a: int, e: int):
        b, _, h, d = call.q.shape
        n = e - a
        dev = call.q.device
        self.shape = (b, n, h, d)
        self.flat_q = (call.q[:, a:e].to(call.kv_pad.dtype) * call.scale).reshape(b, n * h, d)
        band = call.kv_pad[:, a:e + call.window_size - 1]  # [b, L, d], L = n + win - 1
        self.n_band = band.size(1)
        keys = [call.zero_row, band]
        self.n_visible = 0
        if call.entries is not None and call.picks is None:  # HCA (or dense CSA): every visible entry
            # Entries are shared by the block's queries like the band: one set of rows, one GEMM.
            visible = torch.div(call.start + torch.arange(a, e, device=dev) + 1, call.ratio,
                                rounding_mode="floor")
            self.n_visible = int(visible[-1])
            keys.append(call.entries[:, :self.n_visible])
        self.rows = torch.cat(keys, dim=1)  # [b, 1 + L (+ t), d]
        width = self.rows.size(1)
        bias = call.bias(a, e)  # [n, h, 1 + L]
        if self.n_visible:
            bias = torch.cat((bias, bias.new_zeros(n, h, self.n_visible)), dim=-1)
        z = torch.baddbmm(bias.view(1, n * h, -1), self.flat_q, self.rows.transpose(1, 2))
        z = z.view(b, n, h, width)
        if self.n_visible:
            hidden = torch.arange(self.n_visible, device=dev) >= visible[:, None]  # [n, t]
            z[..., 1 + self.n_band:].masked_fill_(hidden[None, :, None], float("-inf"))
        self.picked = self.ids = None
        if call.picks is not None:  # CSA: the indexer's picks, -1 = none
            ids = call.picks[:, a:e]  # [b, n, k]
            offsets = torch.arange(b, device=dev)[:, None, None] * call.entries.size(1)
            self.ids = (ids.clamp_min(0) + offsets).reshape(-1)
            self.picked = call.entries.reshape(-1, d).index_select(0, self.ids).view(b, n, ids.size(-1), d)
            z_picked = self.flat_q.view(b, n, h, d) @ self.picked.transpose(-1, -2)  # [b, n, h, k]
            z = torch.cat((z, z_picked.masked_fill_((ids < 0)[:, :, None], float("-inf"))), dim=-1)
        # The joint softmax; a query's window holds its own row, so no row is all -inf.
        self.p = torch.softmax(z, dim=-1)
        self.p_shared = self.p[..., :width]  # [b, n, h, 1 + L (+ t)]: the sink, band (and entries)
        self.p_picked = self.p[..., width:] if self.picked is not None else None  # [b, n, h, k]

    def entry_mass(self) -> torch.Tensor:
        """The compressed entries' probabilities summed over heads: [b, n, t or k]."""
        if self.p_picked is not None:
            return self.p_picked.sum(2)
        return self.p_shared[..., 1 + self.n_band:].sum(2)

    def weighted_sum(self) -> torch.Tensor:
        """sum_j P_j V_j: [b, n, h, d] (the sink's value is the zero row)."""
        b, n, h, d = self.shape
        out = (self.p_shared.reshape(b, n * h, -1) @ self.rows).view(b, n, h, d)
        if self.picked is not None:
            out += self.p_picked @ self.picked
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
            out, teacher = memo.pop("out"), memo.pop("teacher")
        else:
            call = _Call(q, kv_pad, entries, sink_acc, picks, scale, window_size, start, ratio)
            out, teacher = _forward(call, want_teacher)
            if memo is not None:
                memo.update(out=out, teacher=teacher)
        ctx.save_for_backward(q, kv_pad, entries, sink_acc, picks, out)
        ctx.scale, ctx.window_size, ctx.start, ctx.ratio = scale, window_size, start, ratio
        ctx.pad, ctx.dtypes = pad, (q.dtype, kv.dtype, None if compressed is None else compressed.dtype)
        if teacher is not None:
            ctx.mark_non_differentiable(teacher)
        return out, teacher

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_teacher):
        q, kv_pad, entries, sink, picks, out = ctx.saved_tensors
        call = _Call(q, kv_pad, entries, sink, picks, ctx.scale, ctx.window_size, ctx.start, ctx.ratio)
        win = ctx.window_size
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
            blk = _Block(call, a, e)
            do = grad_out[:, a:e]  # [b, n, h, d]
            do_flat = do.reshape(b, n * h, d)
            delta = (do * out[:, a:e]).sum(-1, keepdim=True)  # [b, n, h, 1]

            # The shared rows (sink, band, and HCA's entries): every product is a GEMM over them.
            width = blk.rows.size(1)
            dz = blk.p_shared * ((do_flat @ blk.rows.transpose(1, 2)).view(b, n, h, width) - delta)
            dsink += dz[..., 0].sum((0, 1))
            dz_flat, p_flat = dz.reshape(b, n * h, width), blk.p_shared.reshape(b, n * h, width)
            dq_blk = dz_flat @ blk.rows  # [b, n * h, d]
            d_rows = torch.baddbmm(p_flat.transpose(1, 2) @ do_flat, dz_flat.transpose(1, 2), blk.flat_q)
            dkv_pad[:, a:e + win - 1] += d_rows[:, 1:1 + blk.n_band]
            if blk.n_visible:
                dentries[:, :blk.n_visible] += d_rows[:, 1 + blk.n_band:]
            dq_blk = dq_blk.view(b, n, h, d)
            if blk.picked is not None:  # the picks: gathered rows, gradients added back by index
                dz_c = blk.p_picked * (do @ blk.picked.transpose(-1, -2) - delta)  # [b, n, h, k]
                dq_blk += dz_c @ blk.picked
                qs = blk.flat_q.view(b, n, h, d)
                d_picked = torch.matmul(dz_c.transpose(-1, -2), qs) + blk.p_picked.transpose(-1, -2) @ do
                dentries.view(-1, d).index_add_(0, blk.ids, d_picked.reshape(-1, d))  # 0 for -1 picks
            dq[:, a:e] = dq_blk * ctx.scale

        q_dtype, kv_dtype, c_dtype = ctx.dtypes
        dkv = dkv_pad[:, ctx.pad:].to(kv_dtype) if ctx.needs_input_grad[1] else None
        dc = dentries.to(c_dtype) if dentries is not None and ctx.needs_input_grad[2] else None
        return (dq.to(q_dtype), dkv, dc, dsink if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


def _forward(call: _Call, want_teacher: bool):
    """out [b, s, h, d] and the teacher (or None), a query block at a time."""
    q = call.q
    b, s, h, d = q.shape
    acc = call.kv_pad.dtype
    out = q.new_empty(b, s, h, d, dtype=acc)
    teacher = None
    if want_teacher:
        width = call.picks.size(-1) if call.picks is not None else call.entries.size(1)
        teacher = q.new_zeros(b, s, width, dtype=acc)
    for a in range(0, s, QUERY_BLOCK):
        e = min(s, a + QUERY_BLOCK)
        blk = _Block(call, a, e)
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

"""The fast torch backend of `joint_attention`: forward and backward a query block at a time, as a
`torch.autograd.Function` (flash-attention style).

Forward keeps, per query and head, only the log-sum-exp of the joint softmax (window + compressed
+ sink) besides the output. Backward recomputes each block's scores from the saved inputs, and
accumulates the gradients of the shared rows into one preallocated buffer per input: the window
rows by `win` shifted adds (query t's window is rows t .. t + win - 1 of the padded KV), HCA's
entries by one GEMM per block, CSA's picked entries by `index_add_`. Nothing of the size of the
sequence is materialised per block, so a step's memory grows linearly with the sequence:
O(s * (win + k)) per block of work and O(s * h * d) for the saved inputs and output.

With P the joint probabilities, dO the output's gradient and delta = <dO, O> per (query, head):
    dZ = P * (dO . V - delta)                  (softmax backward; the sink has a zero value)
    dq = scale * dZ @ K,   dK = scale * dZ^T q,   dV = P^T dO   (K = V: the same rows get both)
    dsink = -sum_(b, t) P_sink * delta
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Queries per block: the block's scores [b, n, h, win + k] and window gradients [b, n, win, d]
# stay a few MB.
QUERY_BLOCK = 128


class _Block:
    """One query block's keys and scores, recomputed identically in forward and backward."""

    def __init__(self, qs, kv_pad, compressed, picks, start, a, e, window_size, ratio):
        b, n = qs.shape[:2]
        self.windows = kv_pad[:, a:e + window_size - 1].unfold(1, window_size, 1)  # [b, n, d, win]
        z_window = torch.einsum("bqhd,bqdw->bqhw", qs, self.windows)
        if start + a < window_size - 1:  # the first queries' windows reach before position 0
            key_pos = start + torch.arange(a, e)[:, None] - window_size + 1 + torch.arange(window_size)
            z_window.masked_fill_((key_pos < 0)[None, :, None], float("-inf"))
        segments = [z_window]
        self.entries = self.rows = self.ids = None
        self.n_visible = 0
        if compressed is not None and picks is None:  # HCA (or dense CSA): every visible entry
            visible = torch.div(start + torch.arange(a, e) + 1, ratio, rounding_mode="floor")  # [n]
            self.n_visible = int(visible[-1])
            self.entries = compressed[:, :self.n_visible]  # [b, t, d]
            z = (qs.flatten(1, 2) @ self.entries.transpose(1, 2)).view(b, n, -1, self.n_visible)
            hidden = torch.arange(self.n_visible) >= visible[:, None]  # [n, t]
            segments.append(z.masked_fill_(hidden[None, :, None], float("-inf")))
        elif picks is not None:  # CSA: the indexer's picks, -1 = none
            ids = picks[:, a:e]  # [b, n, k]
            offsets = torch.arange(b)[:, None, None] * compressed.size(1)
            self.ids = (ids.clamp_min(0) + offsets).reshape(-1)
            self.rows = compressed.reshape(-1, compressed.size(-1)).index_select(0, self.ids).view(
                b, n, ids.size(-1), -1)  # [b, n, k, d]
            z = qs @ self.rows.transpose(-1, -2)  # [b, n, h, k]
            segments.append(z.masked_fill_((ids < 0)[:, :, None], float("-inf")))
        self.widths = [z.size(-1) for z in segments]
        self.scores = torch.cat(segments, dim=-1)  # [b, n, h, win + k]

    def probabilities(self, lse: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.exp(self.scores - lse[..., None]).split(self.widths, dim=-1))

    def weighted_sum(self, probs: list[torch.Tensor]) -> torch.Tensor:
        """sum_j P_j V_j: [b, n, h, d]."""
        out = torch.einsum("bqhw,bqdw->bqhd", probs[0], self.windows)
        if self.entries is not None:
            b, n, h, t = probs[1].shape
            out += (probs[1].reshape(b, n * h, t) @ self.entries).view(b, n, h, -1)
        elif self.rows is not None:
            out += probs[1] @ self.rows
        return out


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs (as the reference accumulates), fp64 for fp64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _lse_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    b, n, h = scores.shape[:3]
    return torch.logsumexp(torch.cat((scores, sink[:, None].expand(b, n, h, 1)), dim=-1), dim=-1)


class JointAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, compressed, sink, picks, scale, window_size, start, ratio, want_teacher):
        b, s, h, d = q.shape
        acc = _accumulation_dtype(q)
        pad = window_size - 1 - (kv.size(1) - s)
        kv_pad = F.pad(kv.to(acc), (0, 0, pad, 0))  # [b, s + win - 1, d]: query t's window starts at t
        entries = compressed.to(acc).contiguous() if compressed is not None else None
        sink32 = sink.to(acc)
        out = q.new_empty(b, s, h, d, dtype=acc)
        lse = q.new_empty(b, s, h, dtype=acc)
        teacher = None
        if want_teacher and compressed is not None:
            width = picks.size(-1) if picks is not None else compressed.size(1)
            teacher = q.new_zeros(b, s, width, dtype=acc)
        for a in range(0, s, QUERY_BLOCK):
            e = min(s, a + QUERY_BLOCK)
            qs = q[:, a:e].to(acc) * scale
            blk = _Block(qs, kv_pad, entries, picks, start, a, e, window_size, ratio)
            lse[:, a:e] = _lse_with_sink(blk.scores, sink32)
            probs = blk.probabilities(lse[:, a:e])
            out[:, a:e] = blk.weighted_sum(probs)
            if teacher is not None:
                teacher[:, a:e, :probs[1].size(-1)] = probs[1].sum(2)
        ctx.save_for_backward(q, kv_pad, entries, sink32, picks, out, lse)
        ctx.scale, ctx.window_size, ctx.start, ctx.ratio = scale, window_size, start, ratio
        ctx.pad, ctx.dtypes = pad, (q.dtype, kv.dtype, None if compressed is None else compressed.dtype)
        if teacher is not None:
            ctx.mark_non_differentiable(teacher)
        return out, teacher

    @staticmethod
    def backward(ctx, grad_out, grad_teacher):
        q, kv_pad, entries, sink, picks, out, lse = ctx.saved_tensors
        scale, win, start, ratio = ctx.scale, ctx.window_size, ctx.start, ctx.ratio
        b, s, h, d = q.shape
        acc = kv_pad.dtype
        dq = torch.empty(b, s, h, d, dtype=acc)
        dkv_pad = torch.zeros_like(kv_pad)
        dentries = torch.zeros_like(entries) if entries is not None else None
        dsink = torch.zeros_like(sink)
        grad_out = grad_out.to(acc)
        for a in range(0, s, QUERY_BLOCK):
            e = min(s, a + QUERY_BLOCK)
            n = e - a
            qs = q[:, a:e].to(acc) * scale
            blk = _Block(qs, kv_pad, entries, picks, start, a, e, win, ratio)
            block_lse = lse[:, a:e]
            probs = blk.probabilities(block_lse)
            do = grad_out[:, a:e]  # [b, n, h, d]
            delta = (do * out[:, a:e]).sum(-1, keepdim=True)  # [b, n, h, 1]
            dsink -= (torch.exp(sink[:, None] - block_lse[..., None]) * delta).sum((0, 1, 3))

            # Window rows: dZ, dq, and per query the rows' gradient [win, d] = [dZ | P]^T [q ; dO].
            p_win = probs[0]
            dz_win = p_win * (torch.einsum("bqhd,bqdw->bqhw", do, blk.windows) - delta)
            dq_blk = torch.einsum("bqhw,bqdw->bqhd", dz_win, blk.windows)
            both = torch.cat((dz_win, p_win), dim=2).transpose(2, 3)  # [b, n, win, 2h]
            d_rows = both @ torch.cat((qs, do), dim=2)  # [b, n, win, d]
            for j in range(win):  # row t + j of the padded KV is query t's window row j
                dkv_pad[:, a + j:e + j] += d_rows[:, :, j]

            if blk.entries is not None:  # every visible entry, shared by the block's queries
                t = blk.n_visible
                p_c = probs[1].reshape(b, n * h, t)
                do_flat = do.reshape(b, n * h, d)
                dz_c = p_c * (do_flat @ blk.entries.transpose(1, 2) - delta.reshape(b, n * h, 1))
                dq_blk += (dz_c @ blk.entries).view(b, n, h, d)
                both = torch.cat((dz_c, p_c), dim=1).transpose(1, 2)  # [b, t, 2 n h]
                dentries[:, :t] += both @ torch.cat((qs.reshape(b, n * h, d), do_flat), dim=1)
            elif blk.rows is not None:  # the picks: gathered rows, gradients added back by index
                p_c = probs[1]  # [b, n, h, k]
                dz_c = p_c * (do @ blk.rows.transpose(-1, -2) - delta)
                dq_blk += dz_c @ blk.rows
                both = torch.cat((dz_c, p_c), dim=2).transpose(2, 3)  # [b, n, k, 2h]
                d_picked = both @ torch.cat((qs, do), dim=2)  # [b, n, k, d]; 0 for -1 picks
                dentries.view(-1, d).index_add_(0, blk.ids, d_picked.reshape(-1, d))
            dq[:, a:e] = dq_blk * scale

        q_dtype, kv_dtype, c_dtype = ctx.dtypes
        dkv = dkv_pad[:, ctx.pad:].to(kv_dtype) if ctx.needs_input_grad[1] else None
        dc = dentries.to(c_dtype) if dentries is not None and ctx.needs_input_grad[2] else None
        return (dq.to(q_dtype), dkv, dc, dsink if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None)


def joint_attention_cpu(q, kv, sink, scale, window_size, start, compressed, ratio, picks, want_teacher):
    return JointAttention.apply(q, kv, compressed, sink, picks, scale, window_size, start, ratio,
                                want_teacher)

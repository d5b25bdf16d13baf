"""The Triton backend of `joint_attention`: the SPEC.md section 4 row lists, then the sparse-attention
kernels (forward and backward) over them.

The keys of a chunk's queries are rows of one buffer, cat(kv, compressed): `joint_index_lists`
names each query's window rows and compressed entries there (-1 = none), and
`sparse_attention_triton_with_lse` attends over those lists with the sink. Autograd carries the
gradients: the kernels' backward gives dq, dsink and the buffer's gradient, which the concatenation
splits back into those of kv and compressed.

The teacher is read off the forward's log-sum-exp, with no second softmax: each compressed entry's
probability is exp(scale * <q, entry> - lse), summed over heads, a query block at a time (no
gradient).

Like the sparse-attention kernels, the dots run in q's dtype with fp32 accumulation; o comes back
in fp32, as from the torch backend.
"""

from __future__ import annotations

import torch

from ..sparse_attention.triton import sparse_attention_triton_with_lse
from .reference import joint_index_lists

# Queries per block of the teacher: it holds their scores [b, n, h, k or t] (and, CSA, their picked
# entries [b, n, k, d]) at once.
QUERY_BLOCK = 128


def joint_attention_triton(q, kv, sink, scale, window_size, start, compressed, ratio, picks, want_teacher):
    """(o [b, s, h, d] fp32, teacher or None); see `api.joint_attention` (inputs already validated)."""
    b, s = q.shape[:2]
    n_kv = kv.size(1)
    if compressed is not None and picks is None:  # HCA / dense CSA: no list past the last visible entry
        compressed = compressed[:, :(start + s) // ratio]
    n_entries = compressed.size(1) if compressed is not None else 0
    buffer = kv if compressed is None else torch.cat((kv, compressed.to(kv.dtype)), dim=1)
    with q.device:  # the lists' aranges where q and the picks are
        lists = joint_index_lists(s, start, window_size, n_kv - s, n_entries, ratio, picks, b)
    lists = lists.to(torch.int32)  # half the bytes of int64; the buffer has far fewer rows than 2^31
    o, lse = sparse_attention_triton_with_lse(q, buffer, sink, lists, scale)
    teacher = None
    if want_teacher and compressed is not None:
        teacher = _teacher(q, buffer[:, n_kv:], picks, lse, scale, start, ratio)
    return o.float(), teacher


@torch.no_grad()
def _teacher(q, entries, picks, lse, scale, start, ratio) -> torch.Tensor:
    """The entries' share of each query's softmax, summed over heads: [b, s, k] with picks, else
    [b, s, n]; zero for -1 picks and for entries a query cannot see yet."""
    b, s = q.shape[:2]
    entries = entries.to(q.dtype).float()  # the rows as the kernel read them
    width = picks.size(-1) if picks is not None else entries.size(1)
    teacher = q.new_zeros(b, s, width, dtype=torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        for a in range(0, s, QUERY_BLOCK):
            e = min(s, a + QUERY_BLOCK)
            qs = q[:, a:e].float() * scale  # [b, n, h, d]
            if picks is not None:
                z, hidden = _picked_scores(qs, entries, picks[:, a:e])
            else:
                z, hidden = _visible_scores(qs, entries, start + a, ratio)
            p = torch.exp(z - lse[:, a:e, :, None]).masked_fill_(hidden, 0.0)
            teacher[:, a:e, :z.size(-1)] = p.sum(2)
    return teacher


def _picked_scores(qs, entries, ids):
    """CSA: scores [b, n, h, k] of the picked entries, and where the picks are -1 ([b, n, 1, k])."""
    batch = torch.arange(ids.size(0), device=ids.device)[:, None, None]
    picked = entries[batch, ids.clamp_min(0)]  # [b, n, k, d]
    return qs @ picked.transpose(-1, -2), (ids < 0)[:, :, None]


def _visible_scores(qs, entries, first, ratio):
    """HCA / dense CSA: scores [b, n, h, t] of the t entries the block's last query sees (queries at
    positions first ..), and where a query cannot see them yet ([1, n, 1, t])."""
    b, n, h, d = qs.shape
    dev = qs.device
    visible = torch.div(first + torch.arange(n, device=dev) + 1, ratio, rounding_mode="floor")  # [n]
    t = (first + n) // ratio
    z = (qs.reshape(b, n * h, d) @ entries[:, :t].transpose(1, 2)).view(b, n, h, t)
    return z, (torch.arange(t, device=dev) >= visible[:, None])[None, :, None]

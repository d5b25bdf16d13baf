"""Readable torch reference of the joint attention of one window / HCA / CSA layer: the SPEC.md
section 4 construction of each query's row list, then sparse attention with a sink (SPEC 7). The
oracle of `cpu.py`, through autograd.

Query t of a chunk that starts at absolute position p0 sits at p = p0 + t. Its keys (= values) are
    the window: the rows of positions p - win + 1 .. p (those >= 0), and
    compressed entries: HCA every entry i < (p + 1) // ratio; CSA the entries its indexer picked.
Over these keys plus the sink (a logit with a zero value):
    o = sum_j e^(z_j) v_j / (sum_j e^(z_j) + e^(sink)),   z_j = scale * <q, v_j>
The teacher of the indexer loss is the compressed part of the same softmax, summed over heads.
"""

from __future__ import annotations

import torch


def joint_index_lists(s: int, start: int, window_size: int, n_context: int, n_entries: int = 0,
                      ratio: int = 0, picks: torch.Tensor | None = None, batch: int = 1) -> torch.Tensor:
    """[b, s, win + k] rows of the buffer cat(kv, compressed) each query attends to, -1 = none.

    kv holds `n_context` rows before the chunk's own s rows; compressed entry i is buffer row
    n_context + s + i. k = picks' width (CSA), or n_entries (HCA: every entry, masked by position)."""
    t = torch.arange(s)[:, None]
    rows = n_context + t - window_size + 1 + torch.arange(window_size)  # [s, win]
    positions = start + t - window_size + 1 + torch.arange(window_size)
    lists = [rows.masked_fill(positions < 0, -1).expand(batch, s, window_size)]
    offset = n_context + s
    if picks is not None:
        lists.append(torch.where(picks >= 0, picks + offset, -1))
    elif n_entries:
        visible = torch.div(start + t + 1, ratio, rounding_mode="floor")  # [s, 1]
        entry = torch.arange(n_entries)
        lists.append(torch.where(entry < visible, entry + offset, -1).expand(batch, s, n_entries))
    return torch.cat(lists, dim=-1)


def joint_attention_reference(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float,
                              window_size: int, start: int = 0, compressed: torch.Tensor | None = None,
                              ratio: int = 0, picks: torch.Tensor | None = None):
    """(o [b, s, h, d] fp32, teacher [b, s, k] fp32 or None); see `api.joint_attention`."""
    b, s, h, d = q.shape
    n_context = kv.size(1) - s
    n_entries = compressed.size(1) if compressed is not None else 0
    lists = joint_index_lists(s, start, window_size, n_context, n_entries, ratio, picks, b)
    buffer = kv if compressed is None else torch.cat((kv, compressed.to(kv.dtype)), dim=1)
    offsets = torch.arange(b, device=buffer.device)[:, None, None] * buffer.size(1)
    flat = (lists.clamp_min(0) + offsets).reshape(-1)
    rows = buffer.reshape(-1, d).index_select(0, flat).view(b, s, -1, d).float()  # [b, s, n, d]
    scores = torch.einsum("bshd,bsnd->bshn", q.float(), rows) * scale
    scores = scores.masked_fill((lists < 0)[:, :, None], float("-inf"))
    logits = torch.cat((scores, sink.float()[:, None].expand(b, s, h, 1)), dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # [b, s, h, n]
    out = probs @ rows
    teacher = probs[..., window_size:].sum(2) if compressed is not None else None
    return out, teacher

"""The lightning indexer of CSA layers: scores every visible compressed entry for every query and
keeps the top-k (SPEC.md section 6), plus the KL loss that trains it (SPEC 12).

I[t, i] = sum_h w[t, h] * relu(qi[t, h] . K[i]). Scores are computed a query block and a head at
a time, so memory stays [block, entries], never [seq, heads, entries].
"""

from __future__ import annotations

import torch
from torch import nn

from .compressor import Compressor
from .config import AttentionConfig
from .modules import Linear, linear
from .ops.indexer_topk.reference import topk_lowest_index_ties
from .quant import fake_quant_fp4, hadamard_rotate
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: AttentionConfig, dtype: torch.dtype | None = None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(cfg, AttentionConfig):
            raise TypeError(f"cfg must be an AttentionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, dtype,
                           cfg.fp8_gemm_inputs)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False, dtype=dtype)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, cfg.csa_ratio, overlap=True,
                                     rope_dim=cfg.rope_head_dim, norm_eps=cfg.norm_eps,
                                     rotate=True, hadamard=cfg.hadamard, backend=backend)

    def queries(self, qr: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """qr [b, s, q_lora] -> indexer queries [b, s, hi, di]: RoPE, Hadamard, FP4."""
        qi = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        qi = apply_rope(qi, positions, freqs)
        if self.cfg.hadamard:
            qi = hadamard_rotate(qi)
        if self.cfg.quant == "official":
            qi = fake_quant_fp4(qi, block=32)
        return qi

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, dim] -> per-head weights [b, s, hi], scaled by (di * hi)^-1/2."""
        scale = self.head_dim**-0.5 * self.n_heads**-0.5
        return linear(x, self.weights_proj.weight) * scale


def index_scores(qi: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """qi [b, q, hi, di], weights [b, q, hi], keys [b, t, di] -> scores [b, q, t] in qi.dtype.

    Per-head products are rounded to qi.dtype, as the reference's bf16 ops do; the sum over heads
    accumulates in fp32 and rounds once (which is what a bf16 `sum` does)."""
    total = None
    for h in range(qi.size(2)):
        head = torch.relu(qi[:, :, h] @ keys.transpose(1, 2)) * weights[:, :, h, None]  # [b, q, t]
        total = head.float() if total is None else total + head.float()
    return total.to(qi.dtype)


def gather_rows(rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """rows [b, t, d], indices [b, q, k] (>= 0) -> [b, q, k, d].

    rows may also be a lazy rows object (`cache.PagedRowsView`), which gathers (and decodes) the
    chosen rows itself."""
    if not isinstance(rows, torch.Tensor):
        return rows.gather_rows(indices)
    b, q, k = indices.shape
    # index_select copies whole rows (much faster on CPU than gather with an expanded index)
    if b == 1:
        return rows[0].index_select(0, indices.reshape(-1)).view(b, q, k, rows.size(-1))
    offsets = torch.arange(b, device=rows.device)[:, None, None] * rows.size(1)
    return rows.reshape(-1, rows.size(-1)).index_select(0, (indices + offsets).reshape(-1)).view(
        b, q, k, rows.size(-1))


def select_entries(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """scores [b, q, t], visible entry counts [q] -> top-k entry ids [b, q, k], -1 where a query
    sees fewer than k entries (SPEC 6, prefill masking)."""
    t = scores.size(-1)
    entry = torch.arange(t, device=scores.device)
    masked = scores.float().masked_fill(entry >= visible[:, None], float("-inf"))
    picks = topk_lowest_index_ties(masked, k)
    return picks.masked_fill(picks >= visible[:, None], -1)

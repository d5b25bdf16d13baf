"""indexer_loss: the lightning indexer's KL loss towards the main attention, over its picks."""

from __future__ import annotations

import torch

from .cpu import indexer_loss_cpu


def indexer_loss(qi: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, picks: torch.Tensor,
                 teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL(teacher || softmax(student)) over the counted queries, their number).

    qi [b, s, hi, di] indexer queries, weights [b, s, hi] head weights, keys [b, n, di] indexer keys,
    picks [b, s, k] int64 entry ids (-1 = none), teacher [b, s, k] the main attention's mass on each
    pick summed over heads (`joint_attention(..., want_teacher=True)`), detached. A query counts when
    it has a valid pick with teacher mass. Differentiable in qi, weights and keys; see reference.py.
    """
    if not torch.compiler.is_compiling():
        _validate(qi, weights, keys, picks, teacher)
    return indexer_loss_cpu(qi, weights, keys, picks, teacher)


def _validate(qi, weights, keys, picks, teacher) -> None:
    if not isinstance(qi, torch.Tensor) or qi.dim() != 4:
        raise ValueError(f"qi must be [batch, seq, index_heads, index_head_dim], got "
                         f"{tuple(getattr(qi, 'shape', ()))}")
    b, s, hi, di = qi.shape
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (b, s, hi):
        raise ValueError(f"weights must be [{b}, {s}, {hi}], got {tuple(getattr(weights, 'shape', ()))}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or tuple(keys.shape[::2]) != (b, di):
        raise ValueError(f"keys must be [{b}, entries, {di}], got {tuple(getattr(keys, 'shape', ()))}")
    if not isinstance(picks, torch.Tensor) or picks.dtype != torch.int64 or picks.dim() != 3 \
            or tuple(picks.shape[:2]) != (b, s):
        raise ValueError(f"picks must be int64 [{b}, {s}, k], got {getattr(picks, 'dtype', None)} "
                         f"{tuple(getattr(picks, 'shape', ()))}")
    if not isinstance(teacher, torch.Tensor) or teacher.shape != picks.shape:
        raise ValueError(f"teacher must be {list(picks.shape)} like picks, got "
                         f"{tuple(getattr(teacher, 'shape', ()))}")
    if not picks.is_cuda and picks.numel() and (int(picks.max()) >= keys.size(1) or int(picks.min()) < -1):
        raise ValueError(f"picks must lie in [-1, {keys.size(1)}), got "
                         f"[{int(picks.min())}, {int(picks.max())}]")

"""Readable torch reference of the lightning indexer's KL loss over the entries it picked
(SPEC.md section 12), through autograd: the oracle of `cpu.py`.

For query t with picks k (valid where the pick is not -1):
    student[t, k] = sum_h w[t, h] * relu(qi[t, h] . K[pick_k])              (the indexer's score)
    teacher[t, k] = the main attention's joint-softmax mass on entry pick_k, summed over heads,
                    L1-normalised over the valid picks (detached)
    loss_t        = KL(teacher_t || softmax(student_t))
Returns the sum of loss_t over the queries whose teacher has mass, and their number.
"""

from __future__ import annotations

import torch


def indexer_loss_reference(qi: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, picks: torch.Tensor,
                           teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, k = picks.shape
    valid = picks >= 0
    offsets = torch.arange(b, device=keys.device)[:, None, None] * keys.size(1)
    flat = (picks.clamp_min(0) + offsets).reshape(-1)
    chosen = keys.reshape(-1, keys.size(-1)).index_select(0, flat).view(b, s, k, -1)  # [b, s, k, di]
    per_head = torch.relu(torch.einsum("bshd,bskd->bshk", qi, chosen))
    student = (per_head * weights[..., None]).sum(dim=2)  # [b, s, k]
    return kl_to_teacher(teacher, student, valid)


def kl_to_teacher(teacher: torch.Tensor, student: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over counted queries of KL(normalised teacher || softmax(student)), and their number.

    teacher [.., k] (unnormalised mass, detached here), student [.., k] scores, valid [.., k]."""
    target = teacher.detach().masked_fill(~valid, 0)
    mass = target.sum(-1, keepdim=True)
    counted = (mass[..., 0] > 0) & valid.any(-1)
    target = target / mass.clamp_min(torch.finfo(target.dtype).tiny)
    log_student = student.masked_fill(~valid, float("-inf")).log_softmax(-1)
    log_student = torch.where(valid, log_student, torch.zeros_like(log_student))
    log_target = torch.where(target > 0, target.log(), torch.zeros_like(target))
    kl = (target * (log_target - log_student)).sum(-1)
    return (kl * counted).sum(), counted.sum()

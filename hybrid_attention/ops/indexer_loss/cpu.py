"""The fast torch backend of `indexer_loss`: a `torch.autograd.Function` that works a query block
at a time in forward and backward, gathering each block's picked keys and adding their gradients
back into one buffer by `index_add_`, so no [s, k, di] gather of the whole sequence is held.

With S = softmax(student) over the valid picks and T the normalised teacher, a counted query has
d loss / d student = S - T; through student = sum_h w_h relu(u_h), u_h = qi_h . K:
    dw_h = sum_k g_k relu(u_hk),   du_hk = g_k w_h [u_hk > 0],   dqi_h = du_h @ K,   dK = du^T qi
"""

from __future__ import annotations

import torch

from ..autocast import without_autocast

QUERY_BLOCK = 256


def _block(qi, weights, keys, picks, teacher, a, e):
    """The block's gathered keys, per-head products, student scores and normalised teacher."""
    b = qi.size(0)
    ids = picks[:, a:e]  # [b, n, k]
    valid = ids >= 0
    offsets = torch.arange(b, device=keys.device)[:, None, None] * keys.size(1)
    flat = (ids.clamp_min(0) + offsets).reshape(-1)
    di = keys.size(-1)
    chosen = keys.reshape(-1, di).index_select(0, flat).view(*ids.shape, di)  # [b, n, k, di]
    u = qi[:, a:e] @ chosen.transpose(-1, -2)  # [b, n, hi, k]
    w = weights[:, a:e, :, None]  # [b, n, hi, 1]
    student = (torch.relu(u) * w).sum(2).masked_fill(~valid, float("-inf"))  # [b, n, k]
    target = teacher[:, a:e].masked_fill(~valid, 0)
    mass = target.sum(-1, keepdim=True)
    counted = (mass[..., 0] > 0) & valid.any(-1)  # [b, n]
    target = target / mass.clamp_min(torch.finfo(target.dtype).tiny)
    return flat, valid, chosen, u, w, student, target, counted


class IndexerLoss(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, qi, weights, keys, picks, teacher):
        ctx.dtypes = (qi.dtype, weights.dtype, keys.dtype)
        acc = torch.float64 if qi.dtype == torch.float64 else torch.float32  # bf16 accumulates in fp32
        qi, weights, keys, teacher = (t.to(acc) for t in (qi, weights, keys, teacher))
        total = qi.new_zeros(())
        count = 0
        for a in range(0, qi.size(1), QUERY_BLOCK):
            e = min(qi.size(1), a + QUERY_BLOCK)
            _, valid, _, _, _, student, target, counted = _block(qi, weights, keys, picks, teacher, a, e)
            log_student = torch.where(valid, student.log_softmax(-1), torch.zeros_like(student))
            log_target = torch.where(target > 0, target.log(), torch.zeros_like(target))
            kl = (target * (log_target - log_student)).sum(-1)  # [b, n]
            total += (kl * counted).sum()
            count += int(counted.sum())
        ctx.save_for_backward(qi, weights, keys, picks, teacher)
        count = torch.tensor(count)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @without_autocast
    def backward(ctx, grad_total, grad_count):
        qi, weights, keys, picks, teacher = ctx.saved_tensors
        dqi = torch.empty_like(qi)
        dweights = torch.empty_like(weights)
        dkeys = torch.zeros_like(keys)
        grad_total = grad_total.to(qi.dtype)
        for a in range(0, qi.size(1), QUERY_BLOCK):
            e = min(qi.size(1), a + QUERY_BLOCK)
            flat, valid, chosen, u, w, student, target, counted = _block(qi, weights, keys, picks,
                                                                        teacher, a, e)
            g = (torch.softmax(student, -1).nan_to_num(0.0) - target) * counted[..., None] * grad_total
            g = g.masked_fill(~valid, 0)[:, :, None]  # [b, n, 1, k]
            dweights[:, a:e] = (g * torch.relu(u)).sum(-1)
            du = g * w * (u > 0)  # [b, n, hi, k]
            dqi[:, a:e] = du @ chosen
            d_chosen = du.transpose(-1, -2) @ qi[:, a:e]  # [b, n, k, di]
            dkeys.view(-1, keys.size(-1)).index_add_(0, flat, d_chosen.reshape(-1, keys.size(-1)))
        return (*(grad.to(dtype) for grad, dtype in zip((dqi, dweights, dkeys), ctx.dtypes, strict=True)),
                None, None)


def indexer_loss_cpu(qi, weights, keys, picks, teacher):
    return IndexerLoss.apply(qi, weights, keys.contiguous(), picks, teacher.detach())

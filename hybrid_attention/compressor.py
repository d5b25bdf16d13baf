"""The token compressor: softmax-gated pooling of `ratio` tokens into one KV entry (SPEC.md section 5).

Each token gets a projected value `a` and a gate score `g` (plus a learned per-slot bias `ape`).
An entry is a per-feature softmax over its slots of the gates, weighting the values. With overlap
(CSA) an entry also pools the previous block through the first half of the features, so entry i
covers tokens [(i-1)r, (i+1)r).

The same code serves a whole prefill and a stream of chunks: the rows of the unfinished block (and,
with overlap, the last complete block) wait in a `CompressorState` until their block completes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checks import check_bool, check_int, check_positive_finite, check_tensor
from .config import QUANT_MODES
from .modules import RMSNorm, linear
from .ops.compress import compress
from .quant import fake_quant_fp4, fake_quant_nope_fp8, hadamard_rotate
from .rope import apply_rope

# Tokens pooled per step of a long chunk (rounded down to whole blocks): 4 MB per fp32 temporary.
CHUNK_TOKENS = 4096


@dataclass
class CompressorState:
    """Pending rows (SPEC 5.1): `kv` / `score` [b, c*r, c*d] fp32, score -inf where a slot is empty.

    Overlap: slots [0, r) hold the last complete block, slots [r, 2r) the unfinished one.
    Non-overlap: slots [0, r) hold the unfinished block.
    """

    kv: torch.Tensor
    score: torch.Tensor

    def nbytes(self) -> int:
        return self.kv.nbytes + self.score.nbytes

    def clone(self) -> "CompressorState":
        return CompressorState(self.kv.clone(), self.score.clone())


class Compressor(nn.Module):
    """Main compressor (d = head_dim, FP8 on the non-rope dims) or the indexer's (rotate=True:
    Hadamard then FP4 over all dims)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, rope_dim: int,
                 norm_eps: float, rotate: bool = False, hadamard: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("head_dim", head_dim), ("ratio", ratio)):
            check_int(name, value, 1)
        check_int("rope_dim", rope_dim, 0)
        if rope_dim > head_dim:
            raise ValueError(f"rope_dim must not exceed head_dim={head_dim}, got {rope_dim}")
        check_positive_finite("norm_eps", norm_eps)
        for name, value in (("overlap", overlap), ("rotate", rotate), ("hadamard", hadamard)):
            check_bool(name, value)
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.rope_dim, self.rotate, self.hadamard = rope_dim, rotate, hadamard
        self.backend = backend  # of `ops.compress`: "auto" takes Triton for CUDA tensors
        width = (2 if overlap else 1) * head_dim
        # The reference keeps these in fp32 (SPEC 5.1, 11); the pooling is fp32 throughout.
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.norm = RMSNorm(head_dim, norm_eps)

    @property
    def n_slots(self) -> int:
        return (2 if self.overlap else 1) * self.ratio

    def new_state(self, batch_size: int, device: torch.device | None = None) -> CompressorState:
        check_int("batch_size", batch_size, 1)
        shape = (batch_size, self.n_slots, self.ape.size(1))
        return CompressorState(torch.zeros(shape, device=device),
                               torch.full(shape, float("-inf"), device=device))

    def forward(self, x: torch.Tensor, start_pos: int, state: CompressorState, freqs: torch.Tensor,
                quant: str) -> tuple[torch.Tensor, CompressorState]:
        """Feed tokens x [b, s, dim] at positions start_pos.. ; return the entries their arrival
        completes [b, n, d] (in x.dtype, post-processed) and the next state. `state` is not changed.

        A long chunk is pooled CHUNK_TOKENS at a time (pieces cut at block boundaries, the state
        carried between them), so the fp32 projections and slots stay cache-sized."""
        if not torch.compiler.is_compiling():
            self._check_input(x, start_pos, state, quant)
        r = self.ratio
        filled = start_pos % r
        step = max(1, CHUNK_TOKENS // r) * r
        if self._trains(x):  # autograd would slice and stitch the pieces: pool the chunk at once
            step = x.size(1) + r
        pooled, a = [], 0
        for e in [*range(step - filled, x.size(1), step), x.size(1)]:
            piece, state = self._pool(x[:, a:e], start_pos + a, state)
            pooled.append(piece)
            a = e
        pooled = torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]  # [b, n, d] fp32
        first_entry = (start_pos - filled) // r
        positions = (first_entry + torch.arange(pooled.size(1), device=x.device)) * r  # entry i sits at i*r
        return self._finish(pooled.to(x.dtype), positions, freqs, quant), state

    def _trains(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.wkv.weight.requires_grad)

    def _check_input(self, x: torch.Tensor, start_pos: int, state: CompressorState, quant: str) -> None:
        check_tensor("x", x)
        if x.dim() != 3 or x.size(-1) != self.wkv.in_features or not x.is_floating_point():
            raise ValueError(f"x must be a float [batch, seq, {self.wkv.in_features}] tensor, got {x.dtype} "
                             f"{tuple(x.shape)}")
        check_int("start_pos", start_pos, 0)
        if not isinstance(state, CompressorState):
            raise TypeError(f"state must be a CompressorState (from new_state()), got {type(state).__name__}")
        expected = (x.size(0), self.n_slots, self.ape.size(1))
        if tuple(state.kv.shape) != expected or tuple(state.score.shape) != expected:
            raise ValueError(f"state must hold kv and score of shape {expected}, got "
                             f"{tuple(state.kv.shape)} and {tuple(state.score.shape)}")
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")

    def _pool(self, x: torch.Tensor, start_pos: int, state: CompressorState
              ) -> tuple[torch.Tensor, CompressorState]:
        """The entries x [b, s, dim] completes, pooled (fp32, before `_finish`), and the next state."""
        s = x.size(1)
        r = self.ratio
        xf = x.float()
        slot = torch.arange(start_pos, start_pos + s, device=x.device) % r
        if self._trains(x):  # one GEMM for both projections, and one for their input gradient
            both = linear(xf, torch.cat((self.wkv.weight, self.wgate.weight)).float())
            kv, score = both.split(self.wkv.out_features, dim=-1)
            score = score + self.ape.float()[slot]
        else:
            kv = linear(xf, self.wkv.weight.float())  # [b, s, c*d]
            score = linear(xf, self.wgate.weight.float()).add_(self.ape.float()[slot])

        # Rows from the start of the unfinished block, then the new ones.
        filled = start_pos % r
        first = r if self.overlap else 0
        if filled:
            kv = torch.cat((state.kv[:, first:first + filled], kv), dim=1)
            score = torch.cat((state.score[:, first:first + filled], score), dim=1)
        n = kv.size(1) // r
        cut = n * r
        # The scores hold the slot bias already (the state's rows do too): compress adds none.
        previous = (state.kv[:, :r], state.score[:, :r]) if self.overlap else None
        pooled = compress(kv[:, :cut], score[:, :cut], None, r, self.overlap, previous,
                          backend=self.backend)  # [b, n, d] fp32
        blocks_kv = kv[:, :cut].unflatten(1, (n, r))  # [b, n, r, c*d]
        blocks_score = score[:, :cut].unflatten(1, (n, r))
        return pooled, self._next_state(state, kv[:, cut:], score[:, cut:], blocks_kv, blocks_score)

    def _finish(self, entries: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                quant: str) -> torch.Tensor:
        """Norm, RoPE at the entry's position, then the quantisation of SPEC 5.2."""
        entries = apply_rope(self.norm(entries), positions, freqs)
        if self.rotate:
            if self.hadamard:
                entries = hadamard_rotate(entries)
            if quant == "official":
                entries = fake_quant_fp4(entries, block=32)
        elif quant == "official":
            entries = fake_quant_nope_fp8(entries, self.rope_dim, block=64)
        return entries

    def _next_state(self, state: CompressorState, rest_kv: torch.Tensor, rest_score: torch.Tensor,
                    blocks_kv: torch.Tensor, blocks_score: torch.Tensor) -> CompressorState:
        r = self.ratio
        first = r if self.overlap else 0
        new = CompressorState(torch.zeros_like(state.kv), torch.full_like(state.score, float("-inf")))
        if self.overlap:
            done = blocks_kv.size(1) > 0
            new.kv[:, :r] = blocks_kv[:, -1] if done else state.kv[:, :r]
            new.score[:, :r] = blocks_score[:, -1] if done else state.score[:, :r]
        rem = rest_kv.size(1)
        new.kv[:, first:first + rem] = rest_kv
        new.score[:, first:first + rem] = rest_score
        return new

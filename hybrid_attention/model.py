"""HybridTransformer: the small decoder LM that the engine, the demo and training use.

tokens -> embedding -> N x [x + attn(attn_norm(x)); x + ffn(ffn_norm(x))] -> norm -> head.
Layer i is `HybridAttention(cfg.attention, i)`, so its kind comes from `compress_ratios[i]`.
Parameter names follow the official checkpoint (`layers.{i}.attn_norm.weight`, `layers.{i}.attn.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import HybridAttention
from .checks import check_bool, check_float_dtype
from .config import ModelConfig
from .modules import RMSNorm, linear
from .state import LayerState


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, bias=False, dtype=dtype)
        self.w3 = nn.Linear(dim, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.silu(linear(x, self.w1.weight)) * linear(x, self.w3.weight)
        return linear(hidden, self.w2.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        eps = cfg.attention.norm_eps
        self.attn_norm = RMSNorm(cfg.attention.dim, eps)
        self.attn = HybridAttention(cfg.attention, layer_id, dtype)
        self.ffn_norm = RMSNorm(cfg.attention.dim, eps)
        self.ffn = SwiGLU(cfg.attention.dim, cfg.ffn_hidden, dtype)

    def forward(self, x: torch.Tensor, state: LayerState | None = None, return_aux: bool = False,
                dense_csa: bool = False):
        attn = self.attn(self.attn_norm(x), state=state, return_aux=return_aux, dense_csa=dense_csa)
        attn, aux = attn if return_aux else (attn, None)
        x = x + attn
        x = x + self.ffn(self.ffn_norm(x))
        return (x, aux) if return_aux else x


class HybridTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        check_float_dtype("dtype", dtype, allow_none=True)
        self.cfg = cfg
        dim = cfg.attention.dim
        self.embed = nn.Embedding(cfg.vocab_size, dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.n_layers))
        self.norm = RMSNorm(dim, cfg.attention.norm_eps)
        self.head = nn.Linear(dim, cfg.vocab_size, bias=False, dtype=dtype)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 1.0)

    def new_states(self, batch_size: int, device=None) -> list[LayerState]:
        """One streaming state per layer (see `HybridAttention.new_state`)."""
        return [block.attn.new_state(batch_size, device) for block in self.layers]

    def forward(self, tokens: torch.Tensor, states: list[LayerState] | None = None,
                return_aux: bool = False, dense_csa: bool = False):
        """tokens [b, s] int -> logits [b, s, vocab] (fp32). With `states`, continue those sequences.

        return_aux: also return {"indexer_loss": the sum over layers, "picks": {layer id: [b, s, k]
        entry ids} for CSA layers that used their indexer}. dense_csa: CSA layers attend to every
        visible compressed entry (the dense phases of training, see `HybridAttention.forward`).

        Errors leave every state untouched: the tokens and every layer's state are checked here,
        before the first layer changes its own."""
        check_bool("return_aux", return_aux)
        check_bool("dense_csa", dense_csa)
        self._check_tokens(tokens, states)
        x = self.embed(tokens)
        losses, picks = [], {}
        for i, block in enumerate(self.layers):
            state = states[i] if states is not None else None
            if return_aux:
                x, aux = block(x, state, return_aux=True, dense_csa=dense_csa)
                losses.append(aux["indexer_loss"])
                if "picks" in aux:
                    picks[i] = aux["picks"]
            else:
                x = block(x, state, dense_csa=dense_csa)
        logits = linear(self.norm(x), self.head.weight).float()
        if return_aux:
            return logits, {"indexer_loss": torch.stack(losses).sum(), "picks": picks}
        return logits

    def _check_tokens(self, tokens: torch.Tensor, states) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a [batch, seq] torch.Tensor of integer ids, got "
                            f"{type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, seq] integer tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):  # what nn.Embedding takes
            raise ValueError(f"tokens must hold integer ids (int64 or int32), got dtype {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(f"tokens are on {tokens.device}, the model's weights on "
                             f"{self.embed.weight.device}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if states is None:
            if tokens.size(1) > self.cfg.attention.max_seq_len:
                raise ValueError(f"tokens has {tokens.size(1)} positions, past "
                                 f"max_seq_len={self.cfg.attention.max_seq_len}")
            return
        if not isinstance(states, list | tuple):
            raise TypeError(f"states must be the list that new_states() returns, got {type(states).__name__}")
        if len(states) != len(self.layers):
            raise ValueError(f"states has {len(states)} entries, the model has {len(self.layers)} layers")
        b, s = tokens.shape
        for i, (block, state) in enumerate(zip(self.layers, states, strict=True)):
            block.attn.check_state(state, b, s, tokens.device, name=f"states[{i}]")
        positions = {state.pos for state in states}
        if len(positions) != 1:
            raise ValueError(f"states are at different positions {sorted(positions)}")


def forward_ragged(model: HybridTransformer, chunks: list[torch.Tensor], states: list[list]) -> torch.Tensor:
    """Run chunks of different sequences (token ids [s_i], each after its own states) in one pass.

    Embedding, norms, MLPs and the LM head see all tokens packed together; each sequence's
    attention runs on its own states. Returns the logits of each chunk's last token [n, vocab].
    The caller validates ids and lengths first, so no sequence's state changes when one is bad."""
    lengths = [c.numel() for c in chunks]
    x = model.embed(torch.cat(chunks))[None]  # [1, sum(s_i), dim]
    for layer_id, block in enumerate(model.layers):
        h = block.attn_norm(x)
        parts = h.split(lengths, dim=1)
        x = x + torch.cat([block.attn(p, state=s[layer_id]) for p, s in zip(parts, states, strict=True)], 1)
        x = x + block.ffn(block.ffn_norm(x))
    ends = torch.tensor(lengths).cumsum(0) - 1
    return model.head(model.norm(x[0, ends])).float()

"""Configuration of the hybrid attention layer: presets, validation, HF config import.

Field names follow the official inference code (SPEC.md section 1.1); `from_hf_config` maps the
Hugging Face `config.json` keys onto them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

QUANT_MODES = ("none", "official", "official-torch-port")
FULL = "full"


@dataclass
class AttentionConfig:
    """Shapes and numerics of one DeepSeek-V4 style attention stack."""

    # Model width and the query / shared-KV head shapes (SPEC 1.1).
    dim: int = 1024
    n_heads: int = 8
    head_dim: int = 128
    rope_head_dim: int = 64
    q_lora_rank: int = 256
    o_groups: int = 2
    o_lora_rank: int = 256

    # Layer schedule: one entry per layer. 0 = sliding window only, `csa_ratio` = CSA (overlapping
    # compression + lightning indexer), any other ratio > 1 = HCA (dense over non-overlapping
    # compressed entries), "full" = dense causal attention over the shared KV head.
    compress_ratios: list = field(default_factory=lambda: [128, 4, 128, 4, 0])
    csa_ratio: int = 4
    n_layers: int | None = None  # main layers; the rest of compress_ratios are MTP blocks
    window_size: int = 128

    # Lightning indexer (CSA layers).
    index_n_heads: int = 8
    index_head_dim: int = 64
    index_topk: int = 64
    hadamard: bool = True  # rotate indexer queries and keys with a Walsh-Hadamard matrix (SPEC 6)

    # RoPE. Window-only and full layers use `rope_theta` without YaRN, compressed layers use
    # `compress_rope_theta` with YaRN (SPEC 2).
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    norm_eps: float = 1e-6

    # Numerics. quant="official" rounds KV to FP8 and indexer q/keys to FP4 at the points of SPEC 8
    # (true rounding, as the GPU kernels do); "official-torch-port" reproduces the pure-torch port
    # where those four in-place sites are the identity; "none" keeps full precision.
    quant: str = "none"
    fp8_gemm_inputs: bool = False  # also round GEMM inputs to FP8 (block 128), as the FP8 model does

    # Run-time limits.
    max_seq_len: int = 1 << 20
    query_block_size: int = 1024  # queries processed together in prefill (memory stays linear)

    def __post_init__(self) -> None:
        self.compress_ratios = list(self.compress_ratios)
        if self.n_layers is None:
            self.n_layers = len(self.compress_ratios)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ValueError(f"AttentionConfig.{name}: {message}")

        for name in ("dim", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                     "window_size", "index_n_heads", "index_head_dim", "max_seq_len",
                     "query_block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even, got {self.head_dim}")
        need(isinstance(self.rope_head_dim, int) and 0 < self.rope_head_dim <= self.head_dim
             and self.rope_head_dim % 2 == 0, "rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim}")
        need(self.rope_head_dim <= self.index_head_dim, "rope_head_dim",
             f"must not exceed index_head_dim={self.index_head_dim}, got {self.rope_head_dim}")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"must divide n_heads={self.n_heads}, got {self.o_groups}")
        need(isinstance(self.index_topk, int) and self.index_topk >= 1, "index_topk",
             f"must be >= 1, got {self.index_topk}")
        if self.hadamard:
            d = self.index_head_dim
            need(d & (d - 1) == 0, "index_head_dim",
                 f"must be a power of two when hadamard=True, got {d}")
        need(self.index_head_dim % 32 == 0 or self.quant == "none", "index_head_dim",
             f"must be a multiple of 32 (the FP4 block) when quant={self.quant!r}, got {self.index_head_dim}")
        need((self.head_dim - self.rope_head_dim) % 64 == 0 or self.quant == "none", "head_dim",
             f"non-rope width {self.head_dim - self.rope_head_dim} must be a multiple of 64 "
             f"(the FP8 block) when quant={self.quant!r}")
        need(self.quant in QUANT_MODES, "quant", f"must be one of {QUANT_MODES}, got {self.quant!r}")
        need(isinstance(self.csa_ratio, int) and self.csa_ratio > 1, "csa_ratio",
             f"must be an integer > 1, got {self.csa_ratio!r}")
        need(len(self.compress_ratios) >= 1, "compress_ratios", "must list at least one layer")
        for i, ratio in enumerate(self.compress_ratios):
            ok = ratio == FULL or (isinstance(ratio, int) and not isinstance(ratio, bool)
                                   and (ratio == 0 or ratio > 1))
            need(ok, "compress_ratios", f"entry {i} must be 0, an integer > 1 or 'full', got {ratio!r}")
        need(isinstance(self.n_layers, int) and 1 <= self.n_layers <= len(self.compress_ratios),
             "n_layers", f"must be in [1, {len(self.compress_ratios)}], got {self.n_layers!r}")
        need(self.rope_factor >= 1, "rope_factor", f"must be >= 1, got {self.rope_factor}")
        need(self.original_seq_len >= 0, "original_seq_len", f"must be >= 0, got {self.original_seq_len}")
        need(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")

    # Derived values -------------------------------------------------------------------------

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def n_total_layers(self) -> int:
        return len(self.compress_ratios)

    def layer_kind(self, layer_id: int) -> str:
        """"window", "csa", "hca" or "full" for layer `layer_id` (MTP blocks count after main layers)."""
        if not 0 <= layer_id < len(self.compress_ratios):
            raise ValueError(f"layer_id {layer_id} is outside [0, {len(self.compress_ratios)})")
        ratio = self.compress_ratios[layer_id]
        if ratio == FULL:
            return "full"
        if ratio == 0:
            return "window"
        return "csa" if ratio == self.csa_ratio else "hca"

    def compress_ratio(self, layer_id: int) -> int:
        kind = self.layer_kind(layer_id)
        return self.compress_ratios[layer_id] if kind in ("csa", "hca") else 0

    def fingerprint(self) -> str:
        """A stable text identity of every shape-relevant field (states and files check it)."""
        return json.dumps(asdict(self), sort_keys=True)

    def replace(self, **changes: Any) -> "AttentionConfig":
        return replace(self, **changes)

    # Constructors ---------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AttentionConfig":
        """The real V4 shapes ("v4-pro", "v4-flash") or a CPU-sized one ("small", "tiny")."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name](), **overrides})

    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | dict, **overrides: Any) -> "AttentionConfig":
        """Read a DeepSeek-V4 `config.json` (a path or the parsed dict); quant defaults to official."""
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            hf = json.loads(path.read_text())

        def get(key: str, default: Any = _REQUIRED) -> Any:
            if key in hf:
                return hf[key]
            if default is _REQUIRED:
                raise ValueError(f"config.json is missing the key {key!r}")
            return default

        rope_scaling = hf.get("rope_scaling") or {}
        n_layers = get("num_hidden_layers")
        n_mtp = get("num_nextn_predict_layers", 0)
        ratios = list(get("compress_ratios"))
        if len(ratios) < n_layers:
            raise ValueError(f"config.json: compress_ratios has {len(ratios)} entries, "
                             f"num_hidden_layers is {n_layers}")
        ratios = ratios[: n_layers + n_mtp]
        if get("num_key_value_heads", 1) != 1:
            raise ValueError("config.json: num_key_value_heads must be 1 (one shared KV head)")
        fields = dict(
            dim=get("hidden_size"),
            n_heads=get("num_attention_heads"),
            head_dim=get("head_dim"),
            rope_head_dim=get("qk_rope_head_dim"),
            q_lora_rank=get("q_lora_rank"),
            o_groups=get("o_groups"),
            o_lora_rank=get("o_lora_rank"),
            window_size=get("sliding_window"),
            compress_ratios=ratios,
            n_layers=n_layers,
            index_n_heads=get("index_n_heads"),
            index_head_dim=get("index_head_dim"),
            index_topk=get("index_topk"),
            rope_theta=float(get("rope_theta", 10000.0)),
            compress_rope_theta=float(get("compress_rope_theta", 160000.0)),
            rope_factor=float(rope_scaling.get("factor", 1.0)),
            original_seq_len=int(rope_scaling.get("original_max_position_embeddings", 0)),
            beta_fast=float(rope_scaling.get("beta_fast", 32.0)),
            beta_slow=float(rope_scaling.get("beta_slow", 1.0)),
            norm_eps=float(get("rms_norm_eps", 1e-6)),
            quant="official",
        )
        return cls(**{**fields, **overrides})


_REQUIRED = object()


def _v4_common() -> dict:
    return dict(head_dim=512, rope_head_dim=64, o_lora_rank=1024, window_size=128,
                index_n_heads=64, index_head_dim=128, rope_theta=10000.0,
                compress_rope_theta=160000.0, rope_factor=16.0, original_seq_len=65536,
                beta_fast=32.0, beta_slow=1.0, norm_eps=1e-6, quant="official")


_PRESETS = {
    "v4-pro": lambda: dict(_v4_common(), dim=7168, n_heads=128, q_lora_rank=1536, o_groups=16,
                           index_topk=1024, n_layers=61,
                           compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0]),
    "v4-flash": lambda: dict(_v4_common(), dim=4096, n_heads=64, q_lora_rank=1024, o_groups=8,
                             index_topk=512, n_layers=43,
                             compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0]),
    "small": lambda: dict(dim=1024, n_heads=8, head_dim=128, rope_head_dim=64, q_lora_rank=256,
                          o_groups=2, o_lora_rank=256, window_size=128, index_n_heads=8,
                          index_head_dim=64, index_topk=64, compress_ratios=[128, 4, 128, 4, 0]),
    # A small configuration for tests: every layer kind, short blocks so streams cross many,
    # 64 non-rope dims so quant="official" (FP8 blocks of 64) applies too.
    "tiny": lambda: dict(dim=64, n_heads=4, head_dim=80, rope_head_dim=16, q_lora_rank=32,
                         o_groups=2, o_lora_rank=32, window_size=8, index_n_heads=4,
                         index_head_dim=32, index_topk=4, compress_ratios=[4, 8, 0, FULL],
                         original_seq_len=64, max_seq_len=4096, query_block_size=16),
}


def yarn_correction_range(rope_dim: int, theta: float, original_seq_len: int,
                          beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """(lo, hi) pair indices of the YaRN blend (SPEC 2), computed in float64 as the reference does."""

    def corr(n: float) -> float:
        return rope_dim * math.log(original_seq_len / (2 * math.pi * n)) / (2 * math.log(theta))

    lo = max(math.floor(corr(beta_fast)), 0)
    hi = min(math.ceil(corr(beta_slow)), rope_dim - 1)
    if lo == hi:
        hi = lo + 0.001
    return float(lo), float(hi)


@dataclass
class ModelConfig:
    """A small decoder LM around the attention stack: embedding, one block per entry of
    `attention.compress_ratios` (RMSNorm, HybridAttention, RMSNorm, SwiGLU MLP), norm, LM head."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    vocab_size: int = 32000
    ffn_hidden: int = 2816

    def __post_init__(self) -> None:
        for name in ("vocab_size", "ffn_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}: must be a positive integer, got {value!r}")

    @property
    def n_layers(self) -> int:
        return self.attention.n_total_layers

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """"small" and "tiny" reuse the attention presets; "v4-flash" / "v4-pro" give the real
        attention shapes with a dense MLP stand-in (for memory and timing studies, not checkpoints)."""
        attention = AttentionConfig.preset(name)
        sizes = {"tiny": (256, 128), "small": (32000, 2816)}.get(name, (129280, 4 * attention.dim))
        return cls(**{**dict(attention=attention, vocab_size=sizes[0], ffn_hidden=sizes[1]), **overrides})

"""Configuration of the hybrid attention layer: presets, validation, HF config import.

Field names follow the official inference code (SPEC.md section 1.1); `from_hf_config` maps the
Hugging Face `config.json` keys onto them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .checks import is_finite_number, is_int

QUANT_MODES = ("none", "official", "official-torch-port")
FULL = "full"
_REQUIRED = object()

# Integer fields that must be >= 1.
_POSITIVE_INT_FIELDS = ("dim", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window_size",
                        "index_n_heads", "index_head_dim", "max_seq_len", "query_block_size")

# config.json keys read as AttentionConfig fields: key -> (field, type, default); `int` keys take
# JSON integers only, `float` keys any JSON number; _REQUIRED: the key must be present.
HF_KEYS = {
    "hidden_size": ("dim", int, _REQUIRED),
    "num_attention_heads": ("n_heads", int, _REQUIRED),
    "head_dim": ("head_dim", int, _REQUIRED),
    "qk_rope_head_dim": ("rope_head_dim", int, _REQUIRED),
    "q_lora_rank": ("q_lora_rank", int, _REQUIRED),
    "o_groups": ("o_groups", int, _REQUIRED),
    "o_lora_rank": ("o_lora_rank", int, _REQUIRED),
    "sliding_window": ("window_size", int, _REQUIRED),
    "index_n_heads": ("index_n_heads", int, _REQUIRED),
    "index_head_dim": ("index_head_dim", int, _REQUIRED),
    "index_topk": ("index_topk", int, _REQUIRED),
    "rope_theta": ("rope_theta", float, 10000.0),
    "compress_rope_theta": ("compress_rope_theta", float, 160000.0),
    "rms_norm_eps": ("norm_eps", float, 1e-6),
}
# The same for the keys of the `rope_scaling` object (YaRN, SPEC 2); null or absent: no YaRN.
HF_ROPE_SCALING_KEYS = {
    "factor": ("rope_factor", float, 1.0),
    "original_max_position_embeddings": ("original_seq_len", int, 0),
    "beta_fast": ("beta_fast", float, 32.0),
    "beta_slow": ("beta_slow", float, 1.0),
}


class ConfigError(ValueError):
    """A config field with a bad value: "AttentionConfig.<field>: <message>". `field` and `message`
    are kept apart so that `from_hf_config` can name the config.json key instead."""

    def __init__(self, owner: str, field_name: str, message: str) -> None:
        super().__init__(f"{owner}.{field_name}: {message}")
        self.field, self.message = field_name, message


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
        if not isinstance(self.compress_ratios, list | tuple):
            raise ConfigError("AttentionConfig", "compress_ratios",
                              f"must be a list with one ratio per layer, got {self.compress_ratios!r}")
        self.compress_ratios = list(self.compress_ratios)
        if self.n_layers is None:
            self.n_layers = len(self.compress_ratios)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError("AttentionConfig", name, message)

        # Types and ranges of single fields first, so the cross-field checks below can do arithmetic.
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            need(is_int(value) and value >= 1, name, f"must be a positive integer, got {value!r}")
        for name in ("hadamard", "fp8_gemm_inputs"):
            value = getattr(self, name)
            need(isinstance(value, bool), name, f"must be True or False, got {value!r}")
        for name in ("rope_theta", "compress_rope_theta"):
            # theta = 1 divides by log(theta) = 0 in the YaRN range; below 1 no rotary base makes sense.
            value = getattr(self, name)
            need(is_finite_number(value) and value > 1, name, f"must be a finite number > 1, got {value!r}")
        need(is_finite_number(self.rope_factor) and self.rope_factor >= 1, "rope_factor",
             f"must be a finite number >= 1, got {self.rope_factor!r}")
        # The YaRN range takes log(original_seq_len / (2 pi beta)): both betas must be positive, and
        # beta_fast > beta_slow puts the blend's low end below its high end.
        need(is_finite_number(self.beta_slow) and self.beta_slow > 0, "beta_slow",
             f"must be a positive finite number, got {self.beta_slow!r}")
        need(is_finite_number(self.beta_fast) and self.beta_fast > self.beta_slow, "beta_fast",
             f"must be a finite number > beta_slow={self.beta_slow}, got {self.beta_fast!r}")
        # 2**53: the largest length a float holds exactly (the YaRN range divides it as a float).
        need(is_int(self.original_seq_len) and 0 <= self.original_seq_len <= 2**53, "original_seq_len",
             f"must be an integer in [0, 2**53] (0: no YaRN), got {self.original_seq_len!r}")
        need(is_finite_number(self.norm_eps) and self.norm_eps > 0, "norm_eps",
             f"must be a positive finite number, got {self.norm_eps!r}")
        need(isinstance(self.quant, str) and self.quant in QUANT_MODES, "quant",
             f"must be one of {QUANT_MODES}, got {self.quant!r}")
        need(is_int(self.index_topk) and self.index_topk >= 1, "index_topk",
             f"must be a positive integer, got {self.index_topk!r}")
        need(is_int(self.csa_ratio) and self.csa_ratio > 1, "csa_ratio",
             f"must be an integer > 1, got {self.csa_ratio!r}")

        need(self.head_dim % 2 == 0, "head_dim", f"must be even, got {self.head_dim}")
        need(is_int(self.rope_head_dim) and 0 < self.rope_head_dim <= self.head_dim
             and self.rope_head_dim % 2 == 0, "rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim!r}")
        need(self.rope_head_dim <= self.index_head_dim, "rope_head_dim",
             f"must not exceed index_head_dim={self.index_head_dim}, got {self.rope_head_dim}")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"must divide n_heads={self.n_heads}, got {self.o_groups}")
        if self.hadamard:
            d = self.index_head_dim
            need(d & (d - 1) == 0, "index_head_dim",
                 f"must be a power of two when hadamard=True, got {d}")
        need(self.index_head_dim % 32 == 0 or self.quant == "none", "index_head_dim",
             f"must be a multiple of 32 (the FP4 block) when quant={self.quant!r}, got {self.index_head_dim}")
        need((self.head_dim - self.rope_head_dim) % 64 == 0 or self.quant == "none", "head_dim",
             f"non-rope width {self.head_dim - self.rope_head_dim} must be a multiple of 64 "
             f"(the FP8 block) when quant={self.quant!r}")
        need(len(self.compress_ratios) >= 1, "compress_ratios", "must list at least one layer")
        for i, ratio in enumerate(self.compress_ratios):
            ok = ratio == FULL or (is_int(ratio) and (ratio == 0 or ratio > 1))
            need(ok, "compress_ratios", f"entry {i} must be 0, an integer > 1 or 'full', got {ratio!r}")
        need(is_int(self.n_layers) and 1 <= self.n_layers <= len(self.compress_ratios),
             "n_layers", f"must be an integer in [1, {len(self.compress_ratios)}], got {self.n_layers!r}")

    # Derived values -------------------------------------------------------------------------

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def n_total_layers(self) -> int:
        return len(self.compress_ratios)

    def layer_kind(self, layer_id: int) -> str:
        """"window", "csa", "hca" or "full" for layer `layer_id` (MTP blocks count after main layers)."""
        if not is_int(layer_id):
            raise TypeError(f"layer_id must be an int, got {layer_id!r}")
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
        _check_field_names(type(self), changes)
        return replace(self, **changes)

    # Constructors ---------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AttentionConfig":
        """The real V4 shapes ("v4-pro", "v4-flash") or a CPU-sized one ("small", "tiny")."""
        if not isinstance(name, str) or name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(_PRESETS)}")
        _check_field_names(cls, overrides)
        return cls(**{**_PRESETS[name](), **overrides})

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> "AttentionConfig":
        """Read a DeepSeek-V4 `config.json` (a path, its folder, or the parsed dict); quant defaults
        to official. A missing file, bad JSON, a missing key or a value of the wrong type or range
        raises a ValueError naming the file and the key; numbers are never read from strings."""
        _check_field_names(cls, overrides)
        hf, source = _read_hf_config(path_or_dict)
        top = _HFReader(hf, source)
        n_layers = top.get("num_hidden_layers", int, minimum=1)
        n_mtp = top.get("num_nextn_predict_layers", int, 0, minimum=0)
        ratios = top.get("compress_ratios", list)
        if len(ratios) < n_layers:
            raise ValueError(f"{source}: 'compress_ratios' has {len(ratios)} entries, "
                             f"'num_hidden_layers' is {n_layers}")
        if top.get("num_key_value_heads", int, 1) != 1:
            raise ValueError(f"{source}: 'num_key_value_heads' must be 1 (one shared KV head)")
        values = dict(compress_ratios=ratios[: n_layers + n_mtp], n_layers=n_layers, quant="official")
        keys = {"compress_ratios": "compress_ratios", "n_layers": "num_hidden_layers"}  # field -> key
        for reader, table in ((top, HF_KEYS), (top.section("rope_scaling"), HF_ROPE_SCALING_KEYS)):
            for key, (name, kind, default) in table.items():
                values[name] = reader.get(key, kind, default)
                keys[name] = reader.prefix + key
        try:
            return cls(**{**values, **overrides})
        except ConfigError as err:
            if err.field in overrides or err.field not in keys:
                raise
            raise ValueError(f"{source}: {keys[err.field]!r} (AttentionConfig.{err.field}): "
                             f"{err.message}") from None


def _check_field_names(cls: type, names: dict) -> None:
    """Unknown keyword arguments as a ValueError that lists the fields (not a TypeError from __init__)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; "
                         f"its fields are {', '.join(sorted(known))}")


def _shown(value: Any) -> str:
    """A config value as config.json would spell it (null, "abc"), cut to a readable length."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_hf_config(path_or_dict: str | os.PathLike | dict) -> tuple[dict, str]:
    """(the parsed config, the name errors give it): a dict as it is, else the file's JSON object."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config.json"
    if not isinstance(path_or_dict, str | os.PathLike):
        raise TypeError(f"from_hf_config takes a path or a dict, got {type(path_or_dict).__name__}")
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the config file is not UTF-8 text") from None
    try:
        hf = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {_shown(hf)}")
    return hf, str(path)


# What `_HFReader.get` accepts for each kind: (the words of the error, the test).
_JSON_KINDS = {
    int: ("an integer", is_int),
    float: ("a finite number", is_finite_number),
    list: ("a list", lambda value: isinstance(value, list)),
    dict: ("an object", lambda value: isinstance(value, dict)),
}


class _HFReader:
    """Typed reads of the keys of one JSON object of a config.json; errors name the file and the key
    (`prefix` is the path of a nested object, e.g. "rope_scaling.")."""

    def __init__(self, hf: dict, source: str, prefix: str = "") -> None:
        self.hf, self.source, self.prefix = hf, source, prefix

    def get(self, key: str, kind: type, default: Any = _REQUIRED, minimum: int | None = None) -> Any:
        """hf[key] checked to be of `kind` (int: a JSON integer; float: a finite JSON number,
        returned as a float; list; dict), `default` when the key is absent (_REQUIRED: an error)."""
        if key not in self.hf:
            if default is _REQUIRED:
                raise ValueError(f"{self.source} is missing the key {self.prefix + key!r}")
            return default
        value = self.hf[key]
        wanted, ok = _JSON_KINDS[kind]
        if not ok(value) or (minimum is not None and value < minimum):
            wanted += f" >= {minimum}" if minimum is not None else ""
            raise ValueError(f"{self.source}: {self.prefix + key!r} must be {wanted}, got {_shown(value)}")
        return float(value) if kind is float else value

    def section(self, key: str) -> "_HFReader":
        """The nested object under `key`; null or absent reads as an empty one."""
        value = self.get(key, dict) if self.hf.get(key) is not None else {}
        return _HFReader(value, self.source, f"{self.prefix}{key}.")


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
        if not isinstance(self.attention, AttentionConfig):
            raise ConfigError("ModelConfig", "attention",
                              f"must be an AttentionConfig, got {type(self.attention).__name__}")
        for name in ("vocab_size", "ffn_hidden"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError("ModelConfig", name, f"must be a positive integer, got {value!r}")

    @property
    def n_layers(self) -> int:
        return self.attention.n_total_layers

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """"small" and "tiny" reuse the attention presets; "v4-flash" / "v4-pro" give the real
        attention shapes with a dense MLP stand-in (for memory and timing studies, not checkpoints)."""
        _check_field_names(cls, overrides)
        attention = AttentionConfig.preset(name)
        sizes = {"tiny": (256, 128), "small": (32000, 2816)}.get(name, (129280, 4 * attention.dim))
        return cls(**{**dict(attention=attention, vocab_size=sizes[0], ffn_hidden=sizes[1]), **overrides})

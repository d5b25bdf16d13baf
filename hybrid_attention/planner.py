"""KV-cache, FLOPs and memory planner for hybrid (DeepSeek-V4), MLA, GQA and MHA models.

Every figure is counted from the shapes in a config, never measured:

- `kv_cache_bytes_by_type(model, context, batch, precisions)`: the cache a batch of sequences holds
  after `context` tokens, split by storage type (the pools a heterogeneous cache keeps apart), with
  the storage format of each type an explicit choice (`FORMATS`, defaults in `DEFAULT_PRECISIONS`).
- `layer_state_bytes_by_type(cfg, layer_id, context, batch, dtype)`: the bytes of this repo's own
  plain-tensor `LayerState` (SPEC.md section 9 without its fixed-size buffers).
- `decode_flops` / `prefill_flops`: FLOPs of one token at context L and of a whole prompt of L
  tokens, split by component; `decode_bytes_read`: the cache bytes one decode step reads.
- `weights_bytes_by_group`: the checkpoint at its own precisions.

"Context L" means L tokens are in the cache, the newest included: a decoded token at context L sits at
position L - 1 and sees L tokens (SPEC 4 with p + 1 = L). `hybrid-attention plan` is the CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .cli import UsageError, positive_int, token_count
from .config import AttentionConfig, ModelConfig

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# Storage formats -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageFormat:
    """How one cached row is stored: `bits` per value, plus one scale of `scale_bytes` per `block`
    values. The rope dims of a KV entry stay unquantised beside a quantised rest, `rope_bytes` each
    (bf16 in DeepSeek's stack, SPEC 3.3, 12; fp32 in an fp32 model's cache); indexer keys are
    quantised over every dim. Rows are padded to `ROW_ALIGN` bytes."""

    name: str
    bits: int
    block: int = 0
    scale_bytes: int = 0
    description: str = ""
    rope_bytes: int = 2

    @property
    def quantised(self) -> bool:
        return self.bits < 16

    def row_bytes(self, dims: int, rope_dims: int = 0) -> int:
        if not self.quantised:
            return dims * self.bits // 8
        packed = dims - rope_dims
        data = math.ceil(packed * self.bits / 8)
        scales = math.ceil(packed / self.block) * self.scale_bytes if self.block else 0
        return _round_up(data + scales + self.rope_bytes * rope_dims, ROW_ALIGN)


ROW_ALIGN = 4
FORMATS = {f.name: f for f in (
    StorageFormat("fp32", 32, description="float32"),
    StorageFormat("bf16", 16, description="bfloat16"),
    StorageFormat("fp8", 8, 64, 1, "FP8 e4m3, one ue8m0 scale per 64 values, rope dims bf16 (DeepSeek-V4)"),
    StorageFormat("fp8-rope32", 8, 64, 1,
                  "FP8 e4m3, one ue8m0 scale per 64 values, rope dims fp32 (an fp32 model's cache)",
                  rope_bytes=4),
    StorageFormat("fp8-b128", 8, 128, 4,
                  "FP8 e4m3, one fp32 scale per 128 values, rope dims bf16 (DeepSeek-V3.2, FlashMLA)"),
    StorageFormat("fp8-tensor", 8, description="FP8 e4m3 with one scale per tensor (negligible)"),
    StorageFormat("fp4", 4, 32, 1, "FP4 e2m1 packed two per byte, one ue8m0 scale per 32 values"),
)}

# Storage types: the pools a cache keeps apart. Hybrid layers: the window ring, compressed entries
# of CSA and HCA layers, CSA indexer keys, the compressors' pending rows and the "full" layer kind's
# rows. MLA: the latent + rope row and (DeepSeek-V3.2) the indexer key. GQA / MHA: K and V.
HYBRID_TYPES = ("window", "csa_compressed", "csa_indexer_keys", "hca_compressed", "compressor_tail", "full")
MLA_TYPES = ("mla_latent", "mla_indexer_keys")
GQA_TYPES = ("kv",)
STORAGE_TYPES = HYBRID_TYPES + MLA_TYPES + GQA_TYPES

# What DeepSeek's own stacks store. V4: FP8 entries with bf16 rope dims (584 bytes per 512-dim
# entry) and FP4 indexer keys (68 bytes per 128-dim key); compressor state fp32 as in the
# reference. V3.2: FlashMLA's FP8 latent (656 bytes) and FP8 indexer keys with an fp32 scale
# (132 bytes). GQA / MHA: bf16, the usual serving default.
DEFAULT_PRECISIONS = {
    "window": "fp8", "csa_compressed": "fp8", "hca_compressed": "fp8", "full": "fp8",
    "csa_indexer_keys": "fp4", "compressor_tail": "fp32",
    "mla_latent": "fp8-b128", "mla_indexer_keys": "fp8-b128",
    "kv": "bf16",
}
TAIL_FORMATS = ("fp32", "bf16")


def official_precisions(value_bytes: int) -> dict[str, str]:
    """The formats the Engine's cache uses with quant="official" for a model of `value_bytes` per
    value: FP8 entries whose rope dims keep the model's dtype, FP4 indexer keys (the defaults)."""
    if value_bytes == 2:
        return {}
    return {key: "fp8-rope32" for key, fmt in DEFAULT_PRECISIONS.items() if fmt == "fp8"}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Model description ---------------------------------------------------------------------------


@dataclass
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3), with V3.2's lightning indexer if index_topk > 0."""

    n_heads: int
    q_lora_rank: int  # 0: a plain q projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0


@dataclass
class GQASpec:
    """Grouped-query attention; n_kv_heads == n_heads is MHA, n_kv_heads == 1 is MQA."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass
class FFNSpec:
    """The first `n_dense_layers` dense (width `dense_intermediate`), then MoE layers; without
    routed experts every layer is dense."""

    n_dense_layers: int = 0
    dense_intermediate: int = 0
    n_routed_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # all shared experts together
    n_hash_layers: int = 0  # DeepSeek-V4: the first MoE layers route by token id (a lookup table)

    def is_dense(self, layer_id: int) -> bool:
        return layer_id < self.n_dense_layers or not self.n_routed_experts


@dataclass
class ModelSpec:
    """What the planner knows about a model: its attention, and optionally the rest of it."""

    name: str
    dim: int
    n_layers: int  # main layers; MTP blocks come after them
    attention: AttentionConfig | MLASpec | GQASpec
    n_mtp_layers: int = 0
    ffn: FFNSpec | None = None  # None with vocab_size None: the config describes attention only
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    hc_mult: int = 1  # DeepSeek-V4 hyper-connections: residual streams per token
    weight_format: str = "bf16"  # linear weights in the checkpoint: "bf16", "fp32" or "fp8"
    expert_format: str = "bf16"  # routed experts: as above or "fp4"
    fp8_scale_bytes: int = 4  # one scale per 128x128 block: ue8m0 (1, V4) or fp32 (4, V3)
    max_position_embeddings: int | None = None

    @property
    def family(self) -> str:
        if isinstance(self.attention, AttentionConfig):
            return "hybrid"
        if isinstance(self.attention, MLASpec):
            return "mla"
        heads, kv_heads = self.attention.n_heads, self.attention.n_kv_heads
        return "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"

    @property
    def whole_model(self) -> bool:
        return self.ffn is not None and self.vocab_size is not None

    def storage_types(self) -> tuple[str, ...]:
        return {"hybrid": HYBRID_TYPES, "mla": MLA_TYPES}.get(self.family, GQA_TYPES)

    def layers(self, include_mtp: bool = False) -> list[tuple[int, str]]:
        """(layer id, kind) of every layer, MTP blocks last when asked for."""
        count = self.n_layers + (self.n_mtp_layers if include_mtp else 0)
        if isinstance(self.attention, AttentionConfig):
            return [(i, self.attention.layer_kind(i)) for i in range(count)]
        return [(i, self.family) for i in range(count)]

    @classmethod
    def from_attention_config(cls, cfg: AttentionConfig, name: str = "attention") -> "ModelSpec":
        """Attention only: KV and attention FLOPs, no whole-model figures."""
        return cls(name=name, dim=cfg.dim, n_layers=cfg.n_layers, attention=cfg,
                   n_mtp_layers=cfg.n_total_layers - cfg.n_layers)


def as_model(model: ModelSpec | AttentionConfig) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec.from_attention_config(model)


# Loading configs -----------------------------------------------------------------------------

PRESETS = {  # planner preset -> (shipped config file, display name)
    "v4-pro": ("deepseek-v4-pro.json", "DeepSeek-V4-Pro"),
    "v4-flash": ("deepseek-v4-flash.json", "DeepSeek-V4-Flash"),
    "v3.2": ("deepseek-v3.2.json", "DeepSeek-V3.2"),
    "llama-3.1-70b": ("llama-3.1-70b.json", "Llama-3.1-70B"),
}
ATTENTION_PRESETS = ("small", "tiny")  # AttentionConfig presets: attention only


def known_presets() -> list[str]:
    return sorted(PRESETS) + list(ATTENTION_PRESETS)


def load_preset(name: str) -> ModelSpec:
    if name in PRESETS:
        file_name, display = PRESETS[name]
        text = resources.files("hybrid_attention").joinpath("configs", file_name).read_text()
        return model_from_hf_config(json.loads(text), display)
    if name in ATTENTION_PRESETS:
        return ModelSpec.from_attention_config(AttentionConfig.preset(name), name)
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known_presets())}")


def load_config(path: str | Path) -> ModelSpec:
    """A Hugging Face `config.json` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no config file at {str(path)!r}")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path} is not a readable JSON file: {err}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object")
    name = path.parent.name if path.stem == "config" and path.parent.name else path.stem
    try:
        return model_from_hf_config(hf, name)
    except (TypeError, ValueError) as err:  # a key missing or of the wrong type
        raise ValueError(f"{path}: {err}") from None


def load_model(preset_or_path: str) -> ModelSpec:
    """A preset name, else a path to a config.json."""
    if preset_or_path in PRESETS or preset_or_path in ATTENTION_PRESETS:
        return load_preset(preset_or_path)
    if Path(preset_or_path).exists():
        return load_config(preset_or_path)
    raise ValueError(f"{preset_or_path!r} is neither a known preset ({', '.join(known_presets())}) "
                     f"nor an existing config.json path")


def _getter(hf: dict):
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        if key in hf and hf[key] is not None:
            return hf[key]
        if required:
            raise ValueError(f"config.json is missing the key {key!r}")
        return default
    return get


HYBRID_KEYS = ("compress_ratios", "o_groups", "o_lora_rank")  # any of them: a DeepSeek-V4 config
MLA_KEYS = ("kv_lora_rank", "qk_nope_head_dim")


# Keys read as sizes; a value of another type would otherwise fail deep in the arithmetic.
POSITIVE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "num_experts_per_tok",
                 "intermediate_size", "moe_intermediate_size", "max_position_embeddings")
COUNT_KEYS = ("num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim", "index_n_heads",
              "index_head_dim", "index_topk", "n_routed_experts", "num_local_experts", "num_experts",
              "first_k_dense_replace", "n_shared_experts", "shared_expert_intermediate_size",
              "num_hash_layers", "hc_mult")


def _check_sizes(hf: dict) -> None:
    for keys, low in ((POSITIVE_KEYS, 1), (COUNT_KEYS, 0)):
        for key in keys:
            value = hf.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"config.json: {key!r} must be an integer >= {low}, got {value!r}")


def model_from_hf_config(hf: dict, name: str = "model") -> ModelSpec:
    """DeepSeek-V4 (`compress_ratios`, `o_groups`), DeepSeek-V2/V3/V3.2 (`kv_lora_rank`,
    `qk_nope_head_dim`), else GQA / MHA. A needed key that is missing, or a size that is not a
    positive integer, raises a ValueError naming it."""
    _check_sizes(hf)
    get = _getter(hf)
    dim = get("hidden_size", required=True)
    n_layers = get("num_hidden_layers", required=True)
    n_mtp = get("num_nextn_predict_layers", 0)
    if any(key in hf for key in HYBRID_KEYS):
        attention = AttentionConfig.from_hf_config(hf)
        n_mtp = attention.n_total_layers - attention.n_layers
    elif any(key in hf for key in MLA_KEYS):
        index_topk = get("index_topk", 0)
        attention = MLASpec(
            n_heads=get("num_attention_heads", required=True),
            q_lora_rank=get("q_lora_rank", 0),
            kv_lora_rank=get("kv_lora_rank", required=True),
            qk_nope_head_dim=get("qk_nope_head_dim", required=True),
            qk_rope_head_dim=get("qk_rope_head_dim", required=True),
            v_head_dim=get("v_head_dim", required=True),
            index_n_heads=get("index_n_heads", required=True) if index_topk else 0,
            index_head_dim=get("index_head_dim", required=True) if index_topk else 0,
            index_topk=index_topk,
        )
    else:
        heads = get("num_attention_heads", required=True)
        attention = GQASpec(n_heads=heads, n_kv_heads=get("num_key_value_heads", heads),
                            head_dim=get("head_dim", dim // heads))

    ffn, vocab = _ffn_from_hf(hf), get("vocab_size")
    if ffn is not None and vocab is None:
        raise ValueError("config.json is missing the key 'vocab_size' (needed with the FFN keys)")
    quant = hf.get("quantization_config") or {}
    dtype_format = {"float32": "fp32"}.get(get("torch_dtype", "bfloat16"), "bf16")
    weight_format = "fp8" if quant.get("quant_method") == "fp8" else dtype_format
    return ModelSpec(
        name=name, dim=dim, n_layers=n_layers, attention=attention, n_mtp_layers=n_mtp,
        ffn=ffn, vocab_size=vocab if ffn is not None else None,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        hc_mult=get("hc_mult", 1), weight_format=weight_format,
        expert_format="fp4" if get("expert_dtype") == "fp4" else weight_format,
        # V4 checkpoints store float8_e8m0fnu block scales (SPEC 11), V3 ones fp32 `weight_scale_inv`.
        fp8_scale_bytes=1 if isinstance(attention, AttentionConfig) else 4,
        max_position_embeddings=get("max_position_embeddings"),
    )


def _ffn_from_hf(hf: dict) -> FFNSpec | None:
    get = _getter(hf)
    routed = get("n_routed_experts") or get("num_local_experts") or get("num_experts")
    if not routed:
        if "intermediate_size" not in hf:
            return None
        return FFNSpec(dense_intermediate=hf["intermediate_size"])
    n_dense = get("first_k_dense_replace", 0)
    expert_width = get("moe_intermediate_size") or get("intermediate_size", required=True)
    shared = get("shared_expert_intermediate_size") or get("n_shared_experts", 0) * expert_width
    return FFNSpec(
        n_dense_layers=n_dense,
        dense_intermediate=get("intermediate_size", required=True) if n_dense else 0,
        n_routed_experts=routed, experts_per_token=get("num_experts_per_tok", required=True),
        expert_intermediate=expert_width, shared_intermediate=shared,
        n_hash_layers=get("num_hash_layers", 0),
    )


# KV cache ------------------------------------------------------------------------------------


def resolve_precisions(model: ModelSpec | AttentionConfig,
                       precisions: dict[str, str] | None = None) -> dict[str, str]:
    """The storage format of each of the model's storage types: defaults, then `"all"` (every
    cache-entry type; the compressor tail keeps its own), then named types. Types the model does
    not have are ignored, so one set of overrides can serve a model and its baseline."""
    model = as_model(model)
    precisions = dict(precisions or {})
    for key, fmt in precisions.items():
        if key != "all" and key not in STORAGE_TYPES:
            raise ValueError(f"unknown storage type {key!r}; known: all, {', '.join(STORAGE_TYPES)}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown storage format {fmt!r} for {key}; known: {', '.join(FORMATS)}")
    if precisions.get("compressor_tail", "fp32") not in TAIL_FORMATS:
        raise ValueError(f"compressor_tail holds pending fp32 rows and -inf scores; "
                         f"choose one of {', '.join(TAIL_FORMATS)}")
    chosen = {}
    for key in model.storage_types():
        fmt = DEFAULT_PRECISIONS[key]
        if "all" in precisions and key != "compressor_tail":
            fmt = precisions["all"]
        chosen[key] = precisions.get(key, fmt)
    return chosen


def _hybrid_rows(cfg: AttentionConfig, kind: str, ratio: int, context: int,
                 full_window: bool = False) -> dict[str, int]:
    """Rows one sequence holds in a hybrid layer after `context` tokens (SPEC 9), by what they are:
    window / compressed / indexer_keys / full rows, and tail_values (fp32 values of the compressor
    states: a kv and a score tensor each, [c*r, c*d] per compressor, SPEC 5.1)."""
    rows = {"window": 0, "compressed": 0, "indexer_keys": 0, "full": 0, "tail_values": 0}
    if kind == "full":
        rows["full"] = context
    else:
        rows["window"] = cfg.window_size if full_window else min(context, cfg.window_size)
    if kind in ("csa", "hca"):
        overlap = 2 if kind == "csa" else 1
        rows["compressed"] = context // ratio
        rows["tail_values"] = 2 * (overlap * ratio) * (overlap * cfg.head_dim)
    if kind == "csa":
        rows["indexer_keys"] = context // ratio
        rows["tail_values"] += 2 * (2 * ratio) * (2 * cfg.index_head_dim)
    return rows


def _layer_kv_bytes(model: ModelSpec, layer_id: int, kind: str, context: int,
                    formats: dict[str, str]) -> dict[str, int]:
    """Bytes one sequence holds in one layer, by storage type (no zero entries)."""
    att = model.attention
    fmt = {key: FORMATS[name] for key, name in formats.items()}
    if isinstance(att, AttentionConfig):
        ratio = att.compress_ratio(layer_id)
        rows = _hybrid_rows(att, kind, ratio, context)
        entry = lambda key: fmt[key].row_bytes(att.head_dim, att.rope_head_dim)  # rope dims kept bf16
        parts = {
            "window": rows["window"] * entry("window"),
            "full": rows["full"] * entry("full"),
            "compressor_tail": rows["tail_values"] * fmt["compressor_tail"].bits // 8,
        }
        if ratio:
            parts[f"{kind}_compressed"] = rows["compressed"] * entry(f"{kind}_compressed")
        if kind == "csa":  # keys are rotated and quantised over every dim (SPEC 5.2)
            parts["csa_indexer_keys"] = rows["indexer_keys"] * fmt["csa_indexer_keys"].row_bytes(
                att.index_head_dim)
    elif isinstance(att, MLASpec):
        latent = fmt["mla_latent"].row_bytes(att.kv_lora_rank + att.qk_rope_head_dim, att.qk_rope_head_dim)
        parts = {"mla_latent": context * latent}
        if att.index_topk:
            parts["mla_indexer_keys"] = context * fmt["mla_indexer_keys"].row_bytes(att.index_head_dim)
    else:
        parts = {"kv": context * 2 * att.n_kv_heads * fmt["kv"].row_bytes(att.head_dim)}
    return {key: n for key, n in parts.items() if n}


def kv_cache_bytes_per_layer(model: ModelSpec | AttentionConfig, context: int, batch: int = 1,
                             precisions: dict[str, str] | None = None,
                             include_mtp: bool = False) -> list[dict]:
    """[{"layer", "kind", "bytes_by_type", "bytes"}] for every layer, for `batch` sequences."""
    model = as_model(model)
    _check_counts(context, batch)
    formats = resolve_precisions(model, precisions)
    out = []
    for layer_id, kind in model.layers(include_mtp):
        one = _layer_kv_bytes(model, layer_id, kind, context, formats)
        by_type = {key: batch * n for key, n in one.items()}
        out.append({"layer": layer_id, "kind": kind, "bytes_by_type": by_type,
                    "bytes": sum(by_type.values())})
    return out


def kv_cache_bytes_by_type(model: ModelSpec | AttentionConfig, context: int, batch: int = 1,
                           precisions: dict[str, str] | None = None,
                           include_mtp: bool = False) -> dict[str, int]:
    """Total cache bytes of `batch` sequences after `context` tokens, by storage type.

    The window ring counts min(context, window_size) rows, as a paged cache holds; the compressor
    tail is its fixed-size pending state. A cache built by type can assert its measured bytes equal
    this, type by type."""
    model = as_model(model)
    totals = dict.fromkeys(model.storage_types(), 0)
    for layer in kv_cache_bytes_per_layer(model, context, batch, precisions, include_mtp):
        for key, n in layer["bytes_by_type"].items():
            totals[key] += n
    return totals


def kv_cache_bytes(model: ModelSpec | AttentionConfig, context: int, batch: int = 1,
                   precisions: dict[str, str] | None = None, include_mtp: bool = False) -> int:
    return sum(kv_cache_bytes_by_type(model, context, batch, precisions, include_mtp).values())


def layer_state_bytes_by_type(cfg: AttentionConfig, layer_id: int, context: int, batch: int = 1,
                              dtype: str = "bf16") -> dict[str, int]:
    """What `LayerState.nbytes_by_type()` reports after `context` tokens of `batch` sequences.

    The state holds plain tensors in the layer dtype: the window ring at full size [b, window, d]
    from the start, every KV row of a "full" layer, compressed rows and indexer keys; the compressor
    states are fp32 whatever the layer dtype."""
    if dtype not in TAIL_FORMATS:
        raise ValueError(f"dtype must be one of {TAIL_FORMATS}, got {dtype!r}")
    _check_counts(context, batch, allow_zero=True)
    kind, ratio = cfg.layer_kind(layer_id), cfg.compress_ratio(layer_id)
    rows = _hybrid_rows(cfg, kind, ratio, context, full_window=True)
    value = FORMATS[dtype].bits // 8
    parts = {
        "window": rows["window"] * cfg.head_dim * value,
        "full_kv": rows["full"] * cfg.head_dim * value,
        "compressed_kv": rows["compressed"] * cfg.head_dim * value,
        "indexer_keys": rows["indexer_keys"] * cfg.index_head_dim * value,
        "compressor_tail": rows["tail_values"] * 4,
    }
    return {key: batch * n for key, n in parts.items() if n}


def _check_counts(context: int, batch: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(context, int) or context < low:
        raise ValueError(f"context must be an integer >= {low}, got {context!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


# FLOPs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCount:
    """How many cached rows a token touches at context n: floor(n / ratio), capped at `topk`, or
    min(n, window). `summed(L)` is the sum over n = 1 .. L, the work of a causal prefill."""

    ratio: int = 1
    window: int = 0
    topk: int = 0

    def at(self, n: int) -> int:
        if self.window:
            return min(n, self.window)
        visible = n // self.ratio
        return min(visible, self.topk) if self.topk else visible

    def summed(self, n: int) -> int:
        if self.window:
            w = self.window
            return n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w
        if self.topk:
            first_full = self.topk * self.ratio  # from this n on, the cap holds
            if n < first_full:
                return _floor_sum(n, self.ratio)
            return _floor_sum(first_full - 1, self.ratio) + (n - first_full + 1) * self.topk
        return _floor_sum(n, self.ratio)


def _floor_sum(n: int, r: int) -> int:
    """sum of floor(m / r) for m = 1 .. n."""
    q, rem = divmod(n, r)
    return r * q * (q - 1) // 2 + q * (rem + 1)


@dataclass(frozen=True)
class FlopTerm:
    """`flops` per token (per touched row when `keys` is set), run at `precision`. `once` terms run
    once per forward call (the LM head: a prefill needs only the last token's logits)."""

    component: str
    flops: int
    precision: str
    keys: KeyCount | None = None
    once: bool = False

    def decode(self, context: int) -> int:
        return self.flops * (self.keys.at(context) if self.keys else 1)

    def prefill(self, tokens: int) -> int:
        if self.keys:
            return self.flops * self.keys.summed(tokens)
        return self.flops * (1 if self.once else tokens)


ATTENTION_COMPONENTS = ("projections", "compressor", "indexer_projections", "indexer_scoring", "topk",
                        "window_attention", "compressed_attention", "full_attention", "attention")

# "bf16-equivalent" accounting weighs each FLOP by the tensor-core rate of the precision it runs at:
# FP8 and FP4 matmuls run at 2x and 4x the bf16 rate on current NVIDIA parts, so they count 1/2 and
# 1/4. The fp32 matmuls (compressors, V4's gate and head) use bf16 checkpoint weights and count as
# bf16. "plain" counts every FLOP alike.
FLOP_COST = {"fp32": 1.0, "bf16": 1.0, "fp8": 0.5, "fp4": 0.25, "other": 1.0}
FLOP_ACCOUNTING = ("plain", "bf16-equivalent")
DEFAULT_ACCOUNTING = "bf16-equivalent"  # what `plan` and the CLI report; see docs/planner.md


def _hybrid_attention_terms(model: ModelSpec, cfg: AttentionConfig, layer_id: int, kind: str) -> list:
    """One token through one V4 attention layer (SPEC 3, 5, 6, 7); 2 FLOPs per multiply-add."""
    dim, h, d, q_lora = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    linear = model.weight_format
    terms = [
        FlopTerm("projections", 2 * dim * q_lora, linear),  # wq_a
        FlopTerm("projections", 2 * q_lora * h * d, linear),  # wq_b
        FlopTerm("projections", 2 * dim * d, linear),  # wkv
        FlopTerm("projections", 2 * h * d * cfg.o_lora_rank, "bf16"),  # wo_a: g groups of [R, h*d/g]
        FlopTerm("projections", 2 * cfg.o_groups * cfg.o_lora_rank * dim, linear),  # wo_b
    ]
    per_key = 2 * 2 * h * d  # q.k and p.v per head, the shared KV row is both key and value
    if kind == "full":
        terms.append(FlopTerm("full_attention", per_key, "bf16", KeyCount()))
        return terms
    terms.append(FlopTerm("window_attention", per_key, "bf16", KeyCount(window=cfg.window_size)))
    ratio = cfg.compress_ratio(layer_id)
    if not ratio:
        return terms
    overlap = 2 if kind == "csa" else 1
    # wkv and wgate [c*d, dim] in fp32; the pooled sum over c*r slots, once per r tokens (SPEC 5).
    terms.append(FlopTerm("compressor", 2 * 2 * overlap * d * dim, "fp32"))
    terms.append(FlopTerm("compressor", 2 * overlap * d, "fp32"))
    if kind == "hca":
        terms.append(FlopTerm("compressed_attention", per_key, "bf16", KeyCount(ratio=ratio)))
        return terms
    hi, di = cfg.index_n_heads, cfg.index_head_dim
    index_precision = "fp4" if cfg.quant == "official" else "bf16"
    visible = KeyCount(ratio=ratio)
    terms += [
        FlopTerm("compressed_attention", per_key, "bf16", KeyCount(ratio=ratio, topk=cfg.index_topk)),
        FlopTerm("indexer_projections", 2 * q_lora * hi * di, linear),  # indexer wq_b
        FlopTerm("indexer_projections", 2 * dim * hi, "bf16"),  # weights_proj
        FlopTerm("indexer_projections", 2 * 2 * 2 * di * dim, "fp32"),  # its compressor, overlapping
        FlopTerm("indexer_projections", 2 * 2 * di, "fp32"),
        FlopTerm("indexer_scoring", 2 * hi * di, index_precision, visible),  # qi[h] . K[i]
        FlopTerm("indexer_scoring", 2 * hi, "bf16", visible),  # sum_h w[h] * relu(.)
        FlopTerm("topk", 1, "other", visible),  # one comparison per scored entry
    ]
    return terms


def _mla_attention_terms(model: ModelSpec, att: MLASpec) -> list:
    """One token through an MLA layer in the absorbed (MQA) form that decode and DSA use: queries are
    mapped into the latent space, every head scores the shared [kv_lora + rope] row and reads back
    the kv_lora part."""
    dim, h, linear = model.dim, att.n_heads, model.weight_format
    qk = att.qk_nope_head_dim + att.qk_rope_head_dim
    q_terms = ([FlopTerm("projections", 2 * dim * att.q_lora_rank, linear),
                FlopTerm("projections", 2 * att.q_lora_rank * h * qk, linear)]
               if att.q_lora_rank else [FlopTerm("projections", 2 * dim * h * qk, linear)])
    terms = q_terms + [
        FlopTerm("projections", 2 * dim * (att.kv_lora_rank + att.qk_rope_head_dim), linear),  # kv_a
        FlopTerm("projections", 2 * h * att.qk_nope_head_dim * att.kv_lora_rank, "bf16"),  # q into latent
        FlopTerm("projections", 2 * h * att.kv_lora_rank * att.v_head_dim, "bf16"),  # latent out to v
        FlopTerm("projections", 2 * h * att.v_head_dim * dim, linear),  # o_proj
        FlopTerm("attention", 2 * h * (2 * att.kv_lora_rank + att.qk_rope_head_dim), "bf16",
                 KeyCount(topk=att.index_topk)),
    ]
    if att.index_topk:
        hi, di = att.index_n_heads, att.index_head_dim
        q_in = att.q_lora_rank or dim
        terms += [
            FlopTerm("indexer_projections", 2 * q_in * hi * di, linear),  # wq_b
            FlopTerm("indexer_projections", 2 * dim * di, linear),  # wk
            FlopTerm("indexer_projections", 2 * dim * hi, "bf16"),  # weights_proj
            FlopTerm("indexer_scoring", 2 * hi * di, "fp8", KeyCount()),
            FlopTerm("indexer_scoring", 2 * hi, "bf16", KeyCount()),
            FlopTerm("topk", 1, "other", KeyCount()),
        ]
    return terms


def _gqa_attention_terms(model: ModelSpec, att: GQASpec) -> list:
    dim, h, kv, hd, linear = model.dim, att.n_heads, att.n_kv_heads, att.head_dim, model.weight_format
    return [
        FlopTerm("projections", 2 * dim * h * hd, linear),  # q
        FlopTerm("projections", 2 * 2 * dim * kv * hd, linear),  # k, v
        FlopTerm("projections", 2 * h * hd * dim, linear),  # o
        FlopTerm("attention", 2 * 2 * h * hd, "bf16", KeyCount()),
    ]


def _ffn_terms(model: ModelSpec, layer_id: int) -> list:
    ffn, dim = model.ffn, model.dim
    if ffn.is_dense(layer_id):
        return [FlopTerm("ffn", 2 * 3 * dim * ffn.dense_intermediate, model.weight_format)]
    # Routed experts: FP4 weights meet FP8 activations, which runs at the FP8 rate (SPEC 3.1).
    expert_precision = "fp8" if model.expert_format == "fp4" else model.expert_format
    gate_precision = "fp32" if model.family == "hybrid" else "bf16"  # V4 scores its gate in fp32
    return [
        FlopTerm("ffn", 2 * 3 * dim * ffn.experts_per_token * ffn.expert_intermediate, expert_precision),
        FlopTerm("ffn", 2 * 3 * dim * ffn.shared_intermediate, model.weight_format),
        FlopTerm("moe_gate", 2 * dim * ffn.n_routed_experts, gate_precision),
    ]


def _hyper_connection_terms(model: ModelSpec) -> list:
    """Per block, twice (attention and FFN): the mixing weights from the hc*dim stream, the weighted
    sum into one stream and the post mix back into hc streams (DeepSeek-V4 mHC)."""
    hc, dim = model.hc_mult, model.dim
    mix = (2 + hc) * hc
    per_site = 2 * mix * hc * dim + 2 * hc * dim + 2 * (hc * hc * dim + hc * dim)
    return [FlopTerm("hyper_connections", 2 * per_site, "fp32")]


def flop_terms(model: ModelSpec | AttentionConfig, include_mtp: bool = False,
               whole_model: bool = True) -> list[tuple[int, str, list[FlopTerm]]]:
    """(layer id, kind, terms) per layer, then (-1, "model", terms) for the head and MTP inputs."""
    model = as_model(model)
    whole_model = whole_model and model.whole_model
    att, out = model.attention, []
    for layer_id, kind in model.layers(include_mtp):
        if isinstance(att, AttentionConfig):
            terms = _hybrid_attention_terms(model, att, layer_id, kind)
        elif isinstance(att, MLASpec):
            terms = _mla_attention_terms(model, att)
        else:
            terms = _gqa_attention_terms(model, att)
        if whole_model:
            terms += _ffn_terms(model, layer_id)
            if model.hc_mult > 1:
                terms += _hyper_connection_terms(model)
        out.append((layer_id, kind, terms))
    if whole_model:
        head_precision = "fp32" if model.family == "hybrid" else "bf16"  # V4 computes logits in fp32
        head = [FlopTerm("lm_head", 2 * model.dim * model.vocab_size, head_precision, once=True)]
        if model.hc_mult > 1:
            hc = model.hc_mult
            head.append(FlopTerm("hyper_connections", 2 * (hc * hc * model.dim + hc * model.dim), "fp32"))
        if include_mtp:
            for _ in range(model.n_mtp_layers):
                # the draft's input projections (V4: e_proj, h_proj; V3: eh_proj) and its own logits
                head.append(FlopTerm("mtp", 2 * 2 * model.dim * model.dim, model.weight_format))
                head.append(FlopTerm("mtp", 2 * model.dim * model.vocab_size, head_precision, once=True))
        out.append((-1, "model", head))
    return out


def _sum_terms(model: ModelSpec | AttentionConfig, include_mtp: bool, whole_model: bool,
               value: Callable[[FlopTerm], int], accounting: str) -> dict[str, float]:
    if accounting not in FLOP_ACCOUNTING:
        raise ValueError(f"flops accounting must be one of {FLOP_ACCOUNTING}, got {accounting!r}")
    by_component: dict[str, float] = {}
    for _, _, terms in flop_terms(model, include_mtp, whole_model):
        for term in terms:
            weight = FLOP_COST[term.precision] if accounting == "bf16-equivalent" else 1
            by_component[term.component] = by_component.get(term.component, 0) + weight * value(term)
    if accounting == "plain":
        by_component = {key: int(v) for key, v in by_component.items()}
    return by_component


def decode_flops(model: ModelSpec | AttentionConfig, context: int, include_mtp: bool = False,
                 whole_model: bool = True, accounting: str = "plain") -> dict[str, float]:
    """FLOPs of one decoded token at context L (position L - 1), per sequence, by component.

    Counts 2 FLOPs per multiply-add of every matmul-like step and one per top-k comparison;
    elementwise work (norms, RoPE, softmax, SwiGLU, quantisation, the Hadamard rotation) is left
    out. `whole_model=False` (or a config without FFN / vocab) gives the attention layers alone.
    `accounting="bf16-equivalent"` weighs each FLOP by the cost of its precision (`FLOP_COST`)."""
    _check_counts(context, 1)
    return _sum_terms(model, include_mtp, whole_model, lambda t: t.decode(context), accounting)


def prefill_flops(model: ModelSpec | AttentionConfig, tokens: int, include_mtp: bool = False,
                  whole_model: bool = True, accounting: str = "plain") -> dict[str, float]:
    """FLOPs of a causal prefill of `tokens` tokens from an empty cache, per sequence: each query
    touches only what it may see (no masked work), logits for the last token only."""
    _check_counts(tokens, 1)
    return _sum_terms(model, include_mtp, whole_model, lambda t: t.prefill(tokens), accounting)


def attention_only(by_component: dict[str, float]) -> float:
    return sum(v for key, v in by_component.items() if key in ATTENTION_COMPONENTS)


def decode_bytes_read(model: ModelSpec | AttentionConfig, context: int,
                      precisions: dict[str, str] | None = None, include_mtp: bool = False) -> int:
    """Cache bytes one decode step of one sequence reads at context L: the window, the entries
    attention uses (CSA: top-k; HCA, full, dense MLA, GQA: all), every indexer key (they are all
    scored) and the compressor state; the memory-bandwidth floor of decoding, weights aside."""
    model = as_model(model)
    _check_counts(context, 1)
    formats = resolve_precisions(model, precisions)
    total = 0
    for layer_id, kind in model.layers(include_mtp):
        stored = _layer_kv_bytes(model, layer_id, kind, context, formats)
        att = model.attention
        if kind == "csa":
            entries = context // att.compress_ratio(layer_id)
            row = FORMATS[formats["csa_compressed"]].row_bytes(att.head_dim, att.rope_head_dim)
            stored["csa_compressed"] = min(entries, att.index_topk) * row
        elif kind == "mla" and att.index_topk:
            row = FORMATS[formats["mla_latent"]].row_bytes(att.kv_lora_rank + att.qk_rope_head_dim,
                                                           att.qk_rope_head_dim)
            stored["mla_latent"] = min(context, att.index_topk) * row
        total += sum(stored.values())
    return total


# Weights -------------------------------------------------------------------------------------


def _tensor_bytes(out_features: int, in_features: int, fmt: str, scale_bytes: int) -> int:
    n = out_features * in_features
    if fmt == "fp8":  # one scale per 128x128 block (SPEC 11)
        return n + math.ceil(out_features / 128) * math.ceil(in_features / 128) * scale_bytes
    if fmt == "fp4":  # e2m1 two per byte, one ue8m0 scale per 32 inputs
        return n // 2 + out_features * math.ceil(in_features / 32)
    return n * {"fp32": 4, "bf16": 2, "int32": 4}[fmt]


def _weight_tensors(model: ModelSpec, include_mtp: bool) -> list[tuple[str, int, int, str, bool]]:
    """(group, out, in, format, in an MTP block) of every checkpoint tensor; vectors are [n, 1]."""
    dim, lin, att, out = model.dim, model.weight_format, model.attention, []
    mtp = False

    def add(group, rows, cols, fmt):
        out.append((group, rows, cols, fmt, mtp))

    for layer_id, kind in model.layers(include_mtp):
        mtp = layer_id >= model.n_layers
        if isinstance(att, AttentionConfig):
            h, d, q_lora = att.n_heads, att.head_dim, att.q_lora_rank
            g, r = att.o_groups, att.o_lora_rank
            add("attention", h, 1, "fp32")  # attn_sink
            add("attention", q_lora, dim, lin)  # wq_a
            add("attention", h * d, q_lora, lin)  # wq_b
            add("attention", d, dim, lin)  # wkv
            add("attention", g * r, h * d // g, lin)  # wo_a
            add("attention", dim, g * r, lin)  # wo_b
            add("attention", q_lora + d, 1, "bf16")  # q_norm, kv_norm
            ratio = att.compress_ratio(layer_id)
            if ratio:
                width = (2 if kind == "csa" else 1) * d
                add("attention", ratio, width, "fp32")  # ape
                add("attention", 2 * width, dim, "bf16")  # compressor wkv, wgate
                add("attention", d, 1, "bf16")
            if kind == "csa":
                hi, di = att.index_n_heads, att.index_head_dim
                add("attention", hi * di, q_lora, lin)  # indexer wq_b
                add("attention", hi, dim, "bf16")  # weights_proj
                add("attention", ratio, 2 * di, "fp32")  # indexer compressor ape
                add("attention", 2 * 2 * di, dim, "bf16")  # its wkv, wgate
                add("attention", di, 1, "bf16")
        elif isinstance(att, MLASpec):
            h, qk = att.n_heads, att.qk_nope_head_dim + att.qk_rope_head_dim
            if att.q_lora_rank:
                add("attention", att.q_lora_rank, dim, lin)  # q_a_proj
                add("attention", h * qk, att.q_lora_rank, lin)  # q_b_proj
                add("attention", att.q_lora_rank, 1, "bf16")
            else:
                add("attention", h * qk, dim, lin)
            add("attention", att.kv_lora_rank + att.qk_rope_head_dim, dim, lin)  # kv_a_proj_with_mqa
            add("attention", h * (att.qk_nope_head_dim + att.v_head_dim), att.kv_lora_rank, lin)  # kv_b_proj
            add("attention", dim, h * att.v_head_dim, lin)  # o_proj
            add("attention", att.kv_lora_rank, 1, "bf16")
            if att.index_topk:
                hi, di = att.index_n_heads, att.index_head_dim
                add("attention", hi * di, att.q_lora_rank or dim, lin)  # wq_b
                add("attention", di, dim, lin)  # wk
                add("attention", 2 * di, 1, "bf16")  # k_norm weight and bias
                add("attention", hi, dim, "bf16")  # weights_proj
        else:
            add("attention", att.n_heads * att.head_dim, dim, lin)  # q
            add("attention", 2 * att.n_kv_heads * att.head_dim, dim, lin)  # k, v
            add("attention", dim, att.n_heads * att.head_dim, lin)  # o
        if not model.whole_model:
            continue
        ffn = model.ffn
        add("norms", 2 * dim, 1, "bf16")  # the block's two norms
        if ffn.is_dense(layer_id):
            add("ffn", 3 * ffn.dense_intermediate, dim, lin)
        else:
            add("moe_routed", 3 * ffn.n_routed_experts * ffn.expert_intermediate, dim, model.expert_format)
            if ffn.shared_intermediate:
                add("moe_shared", 3 * ffn.shared_intermediate, dim, lin)
            add("moe_gate", ffn.n_routed_experts, dim, "bf16")
            if layer_id < ffn.n_hash_layers:
                add("moe_gate", model.vocab_size, ffn.experts_per_token, "int32")  # tid2eid
            else:
                add("moe_gate", ffn.n_routed_experts, 1, "fp32")  # routing bias
        if model.hc_mult > 1:
            hc = model.hc_mult
            add("hyper_connections", 2 * (2 + hc) * hc, hc * dim + 1, "fp32")  # fn and base, twice
        if mtp:
            add("attention", dim, 2 * dim, lin)  # e_proj + h_proj (V4) or eh_proj (V3)
            add("norms", 3 * dim, 1, "bf16")  # embedding and head are shared with the main model
    mtp = False
    if model.whole_model:
        add("embedding", model.vocab_size, dim, "bf16")
        if not model.tie_word_embeddings:
            add("lm_head", model.vocab_size, dim, "bf16")
        add("norms", dim, 1, "bf16")
        if model.hc_mult > 1:
            add("hyper_connections", model.hc_mult, model.hc_mult * dim + 1, "fp32")
    return out


def weights_bytes_by_group(model: ModelSpec | AttentionConfig, include_mtp: bool = False) -> dict[str, int]:
    """Checkpoint bytes by group (MTP blocks in "mtp"), at the checkpoint's precisions: FP8 linears
    with 128x128 block scales, V4's FP4 routed experts with a ue8m0 scale per 32, bf16 embedding,
    head and norms, fp32 sinks, ape and hyper-connection weights. An attention-only config gives
    the attention layers alone."""
    model = as_model(model)
    totals: dict[str, int] = {}
    for group, rows, cols, fmt, mtp in _weight_tensors(model, include_mtp):
        key = "mtp" if mtp else group
        totals[key] = totals.get(key, 0) + _tensor_bytes(rows, cols, fmt, model.fp8_scale_bytes)
    return totals


def parameter_counts(model: ModelSpec | AttentionConfig, include_mtp: bool = False) -> dict[str, int]:
    """{"total", "activated"}: parameters, and those one token uses (DeepSeek's convention: the
    embedding counts, routed experts only for the ones chosen, lookup tables not at all)."""
    model = as_model(model)
    total = activated = 0
    for group, rows, cols, fmt, _ in _weight_tensors(model, include_mtp):
        n = rows * cols
        total += n
        if group == "moe_routed":
            n = n * model.ffn.experts_per_token // model.ffn.n_routed_experts
        activated += 0 if fmt == "int32" else n
    return {"total": total, "activated": activated}


def weights_bytes(model: ModelSpec | AttentionConfig, include_mtp: bool = False) -> int:
    return sum(weights_bytes_by_group(model, include_mtp).values())


# Memory fit ----------------------------------------------------------------------------------

GPUS = {  # nominal memory; usable memory is a little less (driver, CUDA context, workspace)
    "A100-40GB": 40 * GiB, "A100-80GB": 80 * GiB, "H100-80GB": 80 * GiB, "H100-NVL-94GB": 94 * GiB,
    "H20-96GB": 96 * GiB, "H200-141GB": 141 * GiB, "B200-180GB": 180 * GiB, "B300-288GB": 288 * GiB,
    "MI300X-192GB": 192 * GiB, "MI325X-256GB": 256 * GiB, "L40S-48GB": 48 * GiB,
    "RTX-4090-24GB": 24 * GiB, "RTX-5090-32GB": 32 * GiB, "RTX-PRO-6000-96GB": 96 * GiB,
}


def gpu_memory(name: str) -> tuple[str, int]:
    """"H100-80GB" or "8xH100-80GB" (case-insensitive) -> (canonical name, bytes)."""
    match = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?(.+)", name.strip(), flags=re.IGNORECASE)
    count = int(match.group(1) or 1)
    by_lower = {key.lower(): key for key in GPUS}
    key = by_lower.get(match.group(2).lower())
    if key is None or count < 1:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (optionally as 8x<name>), "
                         f"or give --memory")
    return (f"{count}x{key}" if count > 1 else key), count * GPUS[key]


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}


def parse_memory(text: str) -> int:
    """"80GiB", "80GB", "1.5TiB", "85899345920" -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text), flags=re.IGNORECASE)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory must be a positive size like 80GiB, 80GB or 85899345920, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_CONTEXT_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB}


def parse_context(text: str | int) -> int:
    """"128K" -> 131072, "1M" -> 1048576, "1048576" -> 1048576 (K and M are binary, as context
    windows are quoted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"context must be a positive token count like 131072, 128K or 1M, got {text!r}")
    tokens = float(match.group(1)) * _CONTEXT_UNITS[match.group(2).lower()]
    if tokens < 1 or tokens != int(tokens):
        raise ValueError(f"context must be a positive whole number of tokens, got {text!r}")
    return int(tokens)


def longest_context(model: ModelSpec, memory: int, batch: int = 1, precisions: dict | None = None,
                    include_mtp: bool = False, limit: int = 1 << 40) -> dict:
    """The longest context whose KV cache (for `batch` sequences) fits in `memory` next to the
    weights; activations and workspace are not counted. "memory_limit_context" is what memory
    alone allows (`limit` and "unbounded" when the cache stops growing); "longest_context" also
    respects the model's `max_position_embeddings` when the config gives one."""
    weights = weights_bytes(model, include_mtp) if model.whole_model else None
    free = memory - (weights or 0)
    fits = lambda n: kv_cache_bytes(model, n, batch, precisions, include_mtp) <= free
    reach, unbounded = 0, False
    if free > 0 and fits(1):
        if fits(limit):
            reach, unbounded = limit, True
        else:
            low, high = 1, limit  # fits(low), not fits(high); the cache only grows with the context
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            reach = low
    cap = model.max_position_embeddings
    return {"memory_bytes": memory, "weights_bytes": weights, "batch": batch, "free_bytes": free,
            "longest_context": min(reach, cap) if cap else reach, "memory_limit_context": reach,
            "unbounded": unbounded, "max_position_embeddings": cap}


# Serving memory ------------------------------------------------------------------------------


def model_spec_from_model_config(cfg: ModelConfig, name: str = "HybridTransformer") -> ModelSpec:
    """The planner's view of `HybridTransformer(cfg)`: one block per entry of compress_ratios (the
    MTP entries are ordinary blocks there), a dense SwiGLU MLP of width ffn_hidden in every block and
    an untied head. `parameter_counts` of it is the module's parameter count."""
    att = cfg.attention
    return ModelSpec(name=name, dim=att.dim, n_layers=att.n_total_layers, attention=att,
                     ffn=FFNSpec(dense_intermediate=cfg.ffn_hidden), vocab_size=cfg.vocab_size,
                     weight_format="fp32")


def engine_memory(cfg: ModelConfig, context: int, batch: int, tokens_per_step: int, cache_bytes: int,
                  score_values: int, value_bytes: int = 4) -> dict[str, int]:
    """The memory of serving `batch` sequences of `context` tokens with `HybridTransformer(cfg)`
    (`value_bytes` per value: fp32) through the Engine, from the shapes. An estimate, in bytes:

    - "weights": every parameter (`parameter_counts` of `model_spec_from_model_config`);
    - "cache_budget": `cache_bytes`, which the engine's cache allocates and zeroes when it starts;
    - "activations": one engine step of `tokens_per_step` tokens: per token the residual and normed
      rows (4 * dim), the queries and attention outputs (3 * heads * head_dim) and the SwiGLU hidden
      rows (3 * ffn_hidden); plus one query block's fp32 attention scores (`score_values`, the
      layer's score budget). The small preset at 2048 tokens a step measured 179 MiB for 250 here;
    - "total": weights + cache_budget + activations;
    - "cache_needed": what the sequences hold in the cache at the end (`kv_cache_bytes`: rows in the
      model dtype, or FP8 / FP4 with quant="official"), a lower bound of what the budget must hold
      (pages round up).
    """
    att = cfg.attention
    spec = model_spec_from_model_config(cfg)
    weights = parameter_counts(spec)["total"] * value_bytes
    per_token = 4 * att.dim + 3 * att.n_heads * att.head_dim + 3 * cfg.ffn_hidden
    activations = tokens_per_step * per_token * value_bytes + score_values * 4
    value_format = {4: "fp32", 2: "bf16"}[value_bytes]
    precisions = official_precisions(value_bytes) if att.quant == "official" else {"all": value_format}
    cache_needed = kv_cache_bytes(spec, context, batch, precisions)
    return {"weights": weights, "cache_budget": cache_bytes, "activations": activations,
            "total": weights + cache_bytes + activations, "cache_needed": cache_needed}


# One model's plan ----------------------------------------------------------------------------


def plan(model: ModelSpec | AttentionConfig, context: int, batch: int = 1,
         precisions: dict[str, str] | None = None, include_mtp: bool = False,
         accounting: str = DEFAULT_ACCOUNTING, per_layer: bool = False) -> dict:
    """Every figure for one model at one context, as the JSON output holds it. FLOPs are per
    sequence in `accounting`; "plain_flops" repeats the three headline FLOP figures unweighted."""
    model = as_model(model)
    whole = model.whole_model
    flops = {}
    for mode in dict.fromkeys((accounting, "plain")):
        decode = decode_flops(model, context, include_mtp, accounting=mode)
        prefill = prefill_flops(model, context, include_mtp, accounting=mode)
        flops[mode] = {
            "decode_flops_per_token": sum(decode.values()) if whole else None,
            "attention_decode_flops_per_token": attention_only(decode),
            "prefill_flops": sum(prefill.values()) if whole else None,
            "attention_prefill_flops": attention_only(prefill),
            "decode_flops_by_component": decode,
        }
    by_type = kv_cache_bytes_by_type(model, context, batch, precisions, include_mtp)
    out = {
        "model": model.name,
        "family": model.family,
        "context": context,
        "batch": batch,
        "include_mtp": include_mtp,
        "kv_cache_bytes": sum(by_type.values()),
        "kv_cache_bytes_by_type": by_type,
        "kv_precisions": resolve_precisions(model, precisions),
        "flops_accounting": accounting,
        **flops[accounting],
        "plain_flops": {key: v for key, v in flops["plain"].items() if key != "decode_flops_by_component"},
        "decode_bytes_read_per_token": decode_bytes_read(model, context, precisions, include_mtp),
        "weights_bytes": weights_bytes(model, include_mtp) if whole else None,
        "weights_bytes_by_group": weights_bytes_by_group(model, include_mtp) if whole else None,
        "parameters": parameter_counts(model, include_mtp) if whole else None,
    }
    if per_layer:
        out["kv_cache_per_layer"] = kv_cache_bytes_per_layer(model, context, batch, precisions, include_mtp)
    return out


RATIO_KEYS = ("kv_cache_bytes", "decode_flops_per_token", "prefill_flops", "attention_decode_flops_per_token",
              "decode_bytes_read_per_token")


def ratios(model_plan: dict, baseline_plan: dict) -> dict[str, float | None]:
    """model / baseline for the headline figures, plus the unweighted FLOP ratios under "plain_*"."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {key: ratio(model_plan.get(key), baseline_plan.get(key)) for key in RATIO_KEYS}
    for key in ("decode_flops_per_token", "prefill_flops"):
        out[f"plain_{key}"] = ratio(model_plan["plain_flops"][key], baseline_plan["plain_flops"][key])
    return out


# Command line ------------------------------------------------------------------------------


def _gpu_argument(text: str) -> tuple[str, int]:
    try:
        return gpu_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _memory_argument(text: str) -> tuple[str, int]:
    try:
        return text.strip(), parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _precision_argument(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"takes TYPE=FORMAT (e.g. all=bf16), got {text!r}")
    return key.strip(), value.strip()


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def _plot_argument(text: str) -> str:
    """The image file to write: its folder must exist (a mistyped path should not create folders)
    and its suffix, if any, be a format matplotlib writes."""
    path = Path(text)
    folder = path.parent
    try:
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {str(folder)!r} does not "
                                             "exist (create it first)")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name such as plan.png")
    except OSError as err:  # a name the file system refuses (too long, a loop of links)
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {err.strerror or err}") from None
    suffix = path.suffix.lower().lstrip(".")
    if suffix and suffix not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"cannot write a {suffix!r} image; use one of "
                                         f"{', '.join(PLOT_FORMATS)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=known_presets(), metavar="NAME",
                        help=f"A shipped model: {', '.join(known_presets())}.")
    source.add_argument("--config", metavar="PATH",
                        help="A Hugging Face config.json, or the folder holding one.")
    parser.add_argument("--context", type=token_count, default="1M", metavar="TOKENS",
                        help="Context length: an integer, or with a K or M suffix (128K, 1M; 1K = 1024). "
                             "Default: %(default)s.")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N",
                        help="Sequences held at once. Default: %(default)s.")
    parser.add_argument("--baseline", metavar="NAME_OR_PATH",
                        help="Compare with this preset or config.json path, e.g. v3.2. Default: no baseline.")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--gpu", type=_gpu_argument, metavar="NAME",
                     help=f"Report the longest context that fits next to the weights on this GPU: "
                          f"{', '.join(GPUS)} (or 8x<name> for eight of them).")
    fit.add_argument("--memory", type=_memory_argument, metavar="SIZE",
                     help="As --gpu, for a memory size such as 80GiB, 80GB or 85899345920.")
    parser.add_argument("--precision", type=_precision_argument, action="append", default=[],
                        metavar="TYPE=FORMAT",
                        help=f"Storage format of one cache type, or all=FORMAT for every entry type; "
                             f"repeatable. Types: {', '.join(STORAGE_TYPES)}. Formats: {', '.join(FORMATS)}. "
                             f"Default: what each model serves with (FP8 entries, FP4 V4 indexer keys, "
                             f"bf16 for GQA).")
    parser.add_argument("--flops", choices=FLOP_ACCOUNTING, default=DEFAULT_ACCOUNTING,
                        help="FLOP accounting: bf16-equivalent weighs FP8 / FP4 matmuls by 1/2 / 1/4, "
                             "plain counts every FLOP alike. Default: %(default)s.")
    parser.add_argument("--mtp", action="store_true", help="Include the multi-token-prediction blocks.")
    parser.add_argument("--per-layer", action="store_true", help="Also list the KV cache of every layer.")
    parser.add_argument("--json", action="store_true", help="Print machine-readable JSON instead of a table.")
    parser.add_argument("--plot", type=_plot_argument, metavar="IMAGE",
                        help="Also draw KV bytes and decode FLOPs against context, 4K to 1M, into this "
                             "image file (png, pdf, svg, ...) in an existing folder. Needs matplotlib.")


def _load_argument(flag: str, text: str) -> ModelSpec:
    """A model named on the command line; a config file that cannot be used is the user's error."""
    try:
        return load_config(text) if flag == "--config" else load_model(text)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def run(args: argparse.Namespace) -> int:
    models = [load_preset(args.preset) if args.preset else _load_argument("--config", args.config)]
    if args.baseline:
        models.append(_load_argument("--baseline", args.baseline))
    precisions = dict(args.precision)
    try:
        for model in models:
            resolve_precisions(model, precisions)
    except ValueError as err:
        raise UsageError(f"--precision: {err}") from None
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib (pip install 'hybrid-attention[plot]')")

    context = args.context
    plans = [plan(m, context, args.batch, precisions, args.mtp, args.flops, args.per_layer) for m in models]
    report: dict[str, Any] = {"models": plans}
    if args.baseline:
        report["ratio_to_baseline"] = ratios(plans[0], plans[1])
    fit_device = args.gpu or args.memory
    if fit_device:
        label, memory = fit_device
        fits = [dict(model=m.name, **longest_context(m, memory, args.batch, precisions, args.mtp))
                for m in models]
        report["fit"] = {"device": label, "models": fits}
    if args.plot:
        try:
            plot(models, args.plot, args.batch, precisions, args.mtp, args.flops)
        except OSError as err:  # only the file is written; the folder was checked, but not its permissions
            raise UsageError(f"--plot: cannot write {args.plot!r}: {err.strerror or err}") from None
        report["plot"] = args.plot
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# Text output ---------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def human_flops(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} FLOP"


def _percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    """The side-by-side table (ratios in the last column when there is a baseline)."""
    plans, ratio = report["models"], report.get("ratio_to_baseline") or {}
    accounting = plans[0]["flops_accounting"]
    rows: list[list[str]] = [["family", *[p["family"] for p in plans], ""],
                             ["context (tokens)", *[f"{p['context']:,}" for p in plans], ""]]

    def add(label, values, fmt, ratio_key=None):
        rows.append([label, *[fmt(v) for v in values], _percent(ratio.get(ratio_key))])

    add(f"KV cache (batch {plans[0]['batch']})", [p["kv_cache_bytes"] for p in plans], human_bytes,
        "kv_cache_bytes")
    for key in dict.fromkeys(k for p in plans for k, v in p["kv_cache_bytes_by_type"].items() if v):
        cells = [f"{human_bytes(p['kv_cache_bytes_by_type'][key])} {p['kv_precisions'][key]}"
                 if p["kv_cache_bytes_by_type"].get(key) else "" for p in plans]
        rows.append([f"  {key}", *cells, ""])
    add(f"decode FLOPs / token ({accounting})", [p["decode_flops_per_token"] for p in plans], human_flops,
        "decode_flops_per_token")
    add("  attention only", [p["attention_decode_flops_per_token"] for p in plans], human_flops,
        "attention_decode_flops_per_token")
    if accounting != "plain":
        add("  plain count", [p["plain_flops"]["decode_flops_per_token"] for p in plans], human_flops,
            "plain_decode_flops_per_token")
    add(f"prefill FLOPs ({accounting})", [p["prefill_flops"] for p in plans], human_flops, "prefill_flops")
    if accounting != "plain":
        add("  plain count", [p["plain_flops"]["prefill_flops"] for p in plans], human_flops,
            "plain_prefill_flops")
    add("decode cache read / token", [p["decode_bytes_read_per_token"] for p in plans], human_bytes,
        "decode_bytes_read_per_token")
    add("weights", [p["weights_bytes"] for p in plans], human_bytes)
    rows.append(["parameters total / activated",
                 *[f"{p['parameters']['total'] / 1e9:.1f}B / {p['parameters']['activated'] / 1e9:.1f}B"
                   if p["parameters"] else "-" for p in plans], ""])

    header = ["", *[p["model"] for p in plans], "ratio" if ratio else ""]
    table = [header] + rows
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(line, widths, strict=True))).rstrip() for line in table]
    if "fit" in report:
        lines.append("")
        for fit in report["fit"]["models"]:
            lines.append(f"{fit['model']} on {report['fit']['device']} ({human_bytes(fit['memory_bytes'])}, "
                         f"batch {fit['batch']}): " + _fit_sentence(fit))
    for p in plans:
        if "kv_cache_per_layer" in p:
            lines += ["", f"{p['model']}: KV cache per layer (batch {p['batch']})"]
            for layer in p["kv_cache_per_layer"]:
                parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in layer["bytes_by_type"].items())
                lines.append(f"  layer {layer['layer']:>3} {layer['kind']:<6} "
                             f"{human_bytes(layer['bytes']):>10}  {parts}")
    if any(not p["parameters"] for p in plans):
        lines += ["", "'-': the config describes attention only (no FFN / vocab): no whole-model figure."]
    if "plot" in report:
        lines += ["", f"plot written to {report['plot']}"]
    return "\n".join(lines)


def _fit_sentence(fit: dict) -> str:
    weights, reach, cap = fit["weights_bytes"], fit["memory_limit_context"], fit["max_position_embeddings"]
    if weights is not None and fit["free_bytes"] <= 0:
        return f"the weights alone ({human_bytes(weights)}) do not fit."
    if reach == 0:
        return "not even one token of cache fits next to the weights."
    beside = f"next to {human_bytes(weights)} of weights" if weights is not None else "(weights not counted)"
    memory_says = ("any context: the cache stops growing" if fit["unbounded"] else f"{reach:,} tokens")
    if cap and reach >= cap:
        return f"the model's whole {cap:,}-token context fits {beside} (memory alone: {memory_says})."
    return f"longest context {memory_says} {beside}."


# Plot ----------------------------------------------------------------------------------------

PLOT_CONTEXTS = [int(round(4096 * 2 ** (i / 4))) for i in range(33)]  # 4K .. 1M, 4 points per octave


def plot(models: list[ModelSpec], path: str, batch: int = 1, precisions: dict | None = None,
         include_mtp: bool = False, accounting: str = DEFAULT_ACCOUNTING) -> None:
    """KV cache bytes and decode FLOPs per token against context (log-log, 4K to 1M), one line per
    model; with two or more models, each line is labelled at 1M with its ratio to the last one."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is the "plot" extra
        raise ValueError("--plot needs matplotlib (pip install 'hybrid-attention[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_kv, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = []
    for model in models:
        kv = [kv_cache_bytes(model, n, batch, precisions, include_mtp) / GiB for n in PLOT_CONTEXTS]
        flops = [sum(decode_flops(model, n, include_mtp, accounting=accounting).values()) / 1e9
                 for n in PLOT_CONTEXTS]
        label = model.name if model.whole_model else f"{model.name} (attention only)"
        ax_kv.plot(PLOT_CONTEXTS, kv, label=label)
        ax_flops.plot(PLOT_CONTEXTS, flops, label=label)
        curves.append((kv, flops))
    if len(models) > 1:
        base_kv, base_flops = curves[-1]
        for kv, flops in curves[:-1]:
            ax_kv.annotate(f"{100 * kv[-1] / base_kv[-1]:.1f}%", (PLOT_CONTEXTS[-1], kv[-1]),
                           xytext=(-4, 6), textcoords="offset points", ha="right")
            ax_flops.annotate(f"{100 * flops[-1] / base_flops[-1]:.1f}%", (PLOT_CONTEXTS[-1], flops[-1]),
                              xytext=(-4, 6), textcoords="offset points", ha="right")
    for ax, title, unit in ((ax_kv, f"KV cache, batch {batch}", "GiB"),
                            (ax_flops, f"decode FLOPs per token ({accounting})", "GFLOP")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1 << k for k in range(12, 21, 2)], ["4K", "16K", "64K", "256K", "1M"])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "DEFAULT_PRECISIONS", "FORMATS", "GPUS", "STORAGE_TYPES", "FFNSpec", "FlopTerm", "GQASpec", "KeyCount",
    "MLASpec", "ModelSpec", "StorageFormat", "attention_only", "decode_bytes_read", "decode_flops",
    "engine_memory", "flop_terms", "gpu_memory", "kv_cache_bytes", "kv_cache_bytes_by_type",
    "kv_cache_bytes_per_layer", "layer_state_bytes_by_type", "load_config", "load_model", "load_preset",
    "longest_context", "model_from_hf_config", "model_spec_from_model_config", "official_precisions",
    "parameter_counts", "parse_context", "parse_memory", "plan", "prefill_flops", "resolve_precisions",
    "weights_bytes", "weights_bytes_by_group",
]

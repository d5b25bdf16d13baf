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
# transformers' DeepseekV4Config writes the schedule as `layer_types` (one name per main layer)
# and `compress_rates` (the ratio of each compressed type); the names it uses:
HF_LAYER_TYPES = {"sliding_attention": "window", "compressed_sparse_attention": "csa",
                  "heavily_compressed_attention": "hca"}
HF_DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
# ... and RoPE as `rope_parameters` {"main": window layers, "compress": compressed layers}. Keys a
# sub-dict may hold; any other key is refused rather than dropped.
HF_ROPE_PARAMETER_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
                          "original_max_position_embeddings", "beta_fast", "beta_slow",
                          "attention_factor", "mscale", "mscale_all_dim", "truncate"}
# Top-level keys of transformers' config that change attention in a way this layer cannot follow:
# key -> the only value the layer computes.
HF_FIXED_KEYS = {"num_key_value_heads": 1, "attention_bias": False}


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
    def from_hf_config(cls, path_or_dict: Any, **overrides: Any) -> "AttentionConfig":
        """Read a DeepSeek-V4 config: DeepSeek's `config.json`, the one transformers writes
        (`layer_types`, `compress_rates`, `rope_parameters`, `partial_rotary_factor`), a
        `transformers.PretrainedConfig`, or a parsed dict; a path may name the file or its folder.
        quant defaults to official.

        A missing file, bad JSON, a missing key, a value of the wrong type or range, or anything this
        layer cannot compute (a layer type it does not know, YaRN on the window layers, an attention
        factor other than 1, a key of `rope_parameters` it does not read, two spellings of one value
        that disagree) raises a ValueError naming the file and the key; numbers are never read from
        strings and nothing is dropped silently."""
        _check_field_names(cls, overrides)
        hf, source = _read_hf_config(path_or_dict)
        top = _HFReader(hf, source)
        n_layers = top.get("num_hidden_layers", int, minimum=1)
        n_mtp = top.get("num_nextn_predict_layers", int, 0, minimum=0)
        for key, value in HF_FIXED_KEYS.items():
            kind = bool if isinstance(value, bool) else int
            if key in hf and top.get(key, kind) != value:
                raise ValueError(f"{source}: {key!r} must be {_shown(value)} for this layer "
                                 f"(got {_shown(hf[key])})")
        ratios, csa_ratio, ratio_key = _hf_schedule(top, n_layers, n_mtp)
        values = dict(compress_ratios=ratios, csa_ratio=csa_ratio, n_layers=n_layers, quant="official")
        keys = {"compress_ratios": ratio_key, "csa_ratio": ratio_key, "n_layers": "num_hidden_layers"}
        for key, (name, kind, default) in HF_KEYS.items():
            values[name] = top.get(key, kind, default)
            keys[name] = key
        values["rope_head_dim"], keys["rope_head_dim"] = _hf_rope_head_dim(top, values["head_dim"])
        for name, (value, key) in _hf_rope(top).items():
            values[name], keys[name] = value, key
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


def _read_hf_config(path_or_dict: Any) -> tuple[dict, str]:
    """(the parsed config, the name errors give it): a dict as it is, a transformers config through
    its `to_dict()`, else the file's JSON object."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config.json"
    if callable(getattr(path_or_dict, "to_dict", None)) and hasattr(path_or_dict, "model_type"):
        hf = path_or_dict.to_dict()  # a transformers.PretrainedConfig (transformers is not imported)
        if not isinstance(hf, dict):
            raise TypeError(f"{type(path_or_dict).__name__}.to_dict() returned {type(hf).__name__}, "
                            "not a dict")
        return hf, type(path_or_dict).__name__
    if not isinstance(path_or_dict, str | os.PathLike):
        raise TypeError(f"from_hf_config takes a path or a dict, got {type(path_or_dict).__name__} "
                        "(or a transformers config)")
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
    bool: ("true or false", lambda value: isinstance(value, bool)),
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


def _hf_schedule(top: _HFReader, n_layers: int, n_mtp: int) -> tuple[list, int, str]:
    """(compress_ratios, csa_ratio, the key they came from) from DeepSeek's `compress_ratios` (main
    layers then MTP blocks) or transformers' `layer_types` + `compress_rates` (main layers only);
    where a config has both, they must agree."""
    source = top.source
    rates = dict(HF_DEFAULT_COMPRESS_RATES)
    if top.hf.get("compress_rates") is not None:
        given = top.get("compress_rates", dict)
        for name, rate in given.items():
            if name not in rates:
                raise ValueError(f"{source}: 'compress_rates' has the layer type {name!r}; this layer "
                                 f"knows {sorted(rates)}")
            if not is_int(rate) or rate < 2:
                raise ValueError(f"{source}: 'compress_rates.{name}' must be an integer >= 2, got "
                                 f"{_shown(rate)}")
            rates[name] = rate
    for legacy, name in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if legacy in top.hf:  # older spellings that transformers folds into compress_rates
            rates[name] = top.get(legacy, int, minimum=2)
    csa_ratio = rates["compressed_sparse_attention"]
    if rates["heavily_compressed_attention"] == csa_ratio:
        raise ValueError(f"{source}: 'compress_rates' gives CSA and HCA layers the same rate {csa_ratio}; "
                         "the layer tells them apart by their rate")

    from_types = None
    if top.hf.get("layer_types") is not None:
        types = top.get("layer_types", list)
        if len(types) != n_layers:
            raise ValueError(f"{source}: 'layer_types' has {len(types)} entries, 'num_hidden_layers' is "
                             f"{n_layers}")
        from_types = []
        for i, name in enumerate(types):
            if name not in HF_LAYER_TYPES:
                raise ValueError(f"{source}: 'layer_types' entry {i} is {_shown(name)}; this layer "
                                 f"knows {sorted(HF_LAYER_TYPES)}")
            from_types.append(0 if name == "sliding_attention" else rates[name])
    if "compress_ratios" not in top.hf and from_types is not None:
        return from_types, csa_ratio, "layer_types"
    if "compress_ratios" not in top.hf:
        raise ValueError(f"{source} is missing the key 'compress_ratios' (or transformers' 'layer_types')")
    ratios = top.get("compress_ratios", list)
    if len(ratios) < n_layers:
        raise ValueError(f"{source}: 'compress_ratios' has {len(ratios)} entries, "
                         f"'num_hidden_layers' is {n_layers}")
    ratios = ratios[: n_layers + n_mtp]
    if from_types is not None and ratios[:n_layers] != from_types:
        raise ValueError(f"{source}: 'compress_ratios' {_shown(ratios[:n_layers])} and 'layer_types' with "
                         f"'compress_rates' {_shown(from_types)} disagree")
    return ratios, csa_ratio, "compress_ratios"


def _hf_rope_head_dim(top: _HFReader, head_dim: int) -> tuple[int, str]:
    """(rope dims, key): DeepSeek's `qk_rope_head_dim` or transformers' `partial_rotary_factor` x
    head_dim (also inside `rope_parameters`); every spelling given must give the same width."""
    found = []
    if "qk_rope_head_dim" in top.hf:
        found.append((top.get("qk_rope_head_dim", int), "qk_rope_head_dim"))
    readers = [top]
    rope = top.hf.get("rope_parameters")
    if isinstance(rope, dict):
        section = top.section("rope_parameters")
        readers += [section.section(name) for name in ("main", "compress")
                    if isinstance(rope.get(name), dict)]
    for reader in readers:
        if reader.hf.get("partial_rotary_factor") is None:
            continue
        factor = reader.get("partial_rotary_factor", float)
        width = head_dim * factor if is_int(head_dim) else 0
        key = reader.prefix + "partial_rotary_factor"
        if not (0 < factor <= 1) or abs(width - round(width)) > 1e-6:  # transformers writes rd / head_dim
            raise ValueError(f"{top.source}: {key!r} = {_shown(factor)} must be in (0, 1] and give a whole "
                             f"number of dims of head_dim={head_dim}")
        found.append((int(round(width)), key))
    if not found:
        raise ValueError(f"{top.source} is missing the key 'qk_rope_head_dim' (or transformers' "
                         "'partial_rotary_factor')")
    for width, key in found[1:]:
        if width != found[0][0]:
            raise ValueError(f"{top.source}: {found[0][1]!r} gives {found[0][0]} rotary dims, {key!r} "
                             f"gives {width}")
    return found[0]


def _hf_rope(top: _HFReader) -> dict[str, tuple[Any, str]]:
    """field -> (value, key) for the RoPE fields, from `rope_theta` / `compress_rope_theta` /
    `rope_scaling` (DeepSeek) and `rope_parameters` (transformers: {"main", "compress"} sub-dicts,
    or one flat dict that, as transformers reads it, describes the compressed layers). Where
    both are given they must agree."""
    readings = []
    if top.hf.get("rope_scaling") is not None:
        readings.append(_hf_yarn(top.section("rope_scaling")))
    rope = top.hf.get("rope_parameters")
    main = {}
    if rope is not None:
        section = top.section("rope_parameters")
        nested = [name for name in ("main", "compress") if name in rope]
        if nested:
            if len(nested) == 1 or not all(isinstance(rope[name], dict) for name in nested):
                raise ValueError(f"{top.source}: 'rope_parameters' must hold both 'main' and 'compress' "
                                 f"objects (got {_shown(rope)})")
            extra = sorted(set(rope) - {"main", "compress", "rope_type", "type"})
            if extra:
                raise ValueError(f"{top.source}: 'rope_parameters.{extra[0]}' is not read by this layer "
                                 "(next to 'main' and 'compress')")
            main = _hf_main_rope(section.section("main"))
            readings.append(_hf_yarn(section.section("compress"), transformers=True))
        else:
            readings.append(_hf_yarn(section, transformers=True, flat=True))
    if not readings:  # no scaling object at all: no YaRN
        readings.append(_hf_yarn(_HFReader({}, top.source, "rope_scaling.")))
    for other in readings[1:]:
        for name, (value, key) in other.items():
            first, first_key = readings[0][name]
            if name != "compress_rope_theta" and value != first:
                raise ValueError(f"{top.source}: {first_key!r} = {_shown(first)} and {key!r} = "
                                 f"{_shown(value)} disagree")
    values = dict(readings[-1])
    for name, key, default in (("rope_theta", "rope_theta", 10000.0),
                               ("compress_rope_theta", "compress_rope_theta", 160000.0)):
        given = [(top.get(key, float), key)] if key in top.hf else []
        given += [item for item in (main.get(name), values.get(name)) if item is not None]
        for value, where in given[1:]:
            if value != given[0][0]:
                raise ValueError(f"{top.source}: {given[0][1]!r} = {_shown(given[0][0])} and {where!r} = "
                                 f"{_shown(value)} disagree")
        values[name] = given[0] if given else (default, key)
    return values


def _hf_main_rope(reader: _HFReader) -> dict[str, tuple[Any, str]]:
    """`rope_parameters.main` (window layers): plain RoPE only, as in DeepSeek's code."""
    _check_rope_keys(reader)
    kind = _rope_type(reader)
    if kind != "default":
        raise ValueError(f"{reader.source}: {reader.prefix + 'rope_type'!r} is {_shown(kind)}; window "
                         "layers use plain RoPE (YaRN applies to the compressed layers only)")
    if "rope_theta" in reader.hf:
        return {"rope_theta": (reader.get("rope_theta", float), reader.prefix + "rope_theta")}
    return {}


def _hf_yarn(reader: _HFReader, transformers: bool = False, flat: bool = False) -> dict[str, tuple[Any, str]]:
    """The YaRN fields of the compressed layers from one scaling object (DeepSeek's `rope_scaling`,
    or transformers' `rope_parameters.compress` / flat `rope_parameters`)."""
    if transformers:
        _check_rope_keys(reader)
    kind = _rope_type(reader)
    if kind not in ("default", "yarn"):
        raise ValueError(f"{reader.source}: {reader.prefix + 'rope_type'!r} is {_shown(kind)}; this layer "
                         "computes plain RoPE or YaRN")
    if reader.hf.get("truncate", True) is not True:
        raise ValueError(f"{reader.source}: {reader.prefix + 'truncate'!r} must be true (DeepSeek's YaRN "
                         "rounds its correction range)")
    yarn = kind == "yarn" or (not transformers and "type" not in reader.hf and "rope_type" not in reader.hf)
    values = {}
    if yarn:
        for key, (name, kind_of, default) in HF_ROPE_SCALING_KEYS.items():
            values[name] = (reader.get(key, kind_of, default), reader.prefix + key)
        if kind == "yarn":
            factor = values["rope_factor"][0]
            attention = reader.hf.get("attention_factor")
            # DeepSeek's YaRN scales only the frequencies; transformers multiplies cos / sin by the
            # attention factor. Its V4 config sets it to 1 when it builds the sub-dicts itself (from
            # a flat dict or `rope_scaling`); given sub-dicts without it, it derives 0.1 ln(factor) + 1.
            if attention is None and factor > 1 and transformers and not flat:
                raise ValueError(f"{reader.source}: {reader.prefix + 'attention_factor'!r} is missing; "
                                 "transformers would then scale cos/sin by 0.1 ln(factor) + 1, which "
                                 "DeepSeek's YaRN does not (set it to 1.0)")
            if attention is not None and reader.get("attention_factor", float) != 1.0:
                raise ValueError(f"{reader.source}: {reader.prefix + 'attention_factor'!r} must be 1.0 "
                                 f"(DeepSeek's YaRN does not scale cos/sin), got {_shown(attention)}")
            if values["original_seq_len"][0] == 0:
                raise ValueError(f"{reader.source} is missing the key "
                                 f"{reader.prefix + 'original_max_position_embeddings'!r} (YaRN)")
    else:
        values = {"rope_factor": (1.0, reader.prefix + "factor"),
                  "original_seq_len": (0, reader.prefix + "original_max_position_embeddings"),
                  "beta_fast": (32.0, reader.prefix + "beta_fast"),
                  "beta_slow": (1.0, reader.prefix + "beta_slow")}
    if transformers and not flat and "rope_theta" in reader.hf:
        values["compress_rope_theta"] = (reader.get("rope_theta", float), reader.prefix + "rope_theta")
    return values


def _rope_type(reader: _HFReader) -> str:
    names = [key for key in ("rope_type", "type") if key in reader.hf]
    kinds = {reader.hf[key] for key in names}
    if len(kinds) > 1:
        raise ValueError(f"{reader.source}: {reader.prefix + 'rope_type'!r} and {reader.prefix + 'type'!r} "
                         "disagree")
    if not names:
        return "default"
    kind = reader.hf[names[0]]
    if not isinstance(kind, str):
        raise ValueError(f"{reader.source}: {reader.prefix + names[0]!r} must be a string, "
                         f"got {_shown(kind)}")
    return kind


def _check_rope_keys(reader: _HFReader) -> None:
    unknown = sorted(set(reader.hf) - HF_ROPE_PARAMETER_KEYS)
    if unknown:
        raise ValueError(f"{reader.source}: {reader.prefix + unknown[0]!r} is not read by this layer; it "
                         f"reads {sorted(HF_ROPE_PARAMETER_KEYS)}")
    for key in ("mscale", "mscale_all_dim"):
        if reader.hf.get(key) not in (None, 0, 1, 1.0) and reader.hf.get("attention_factor") is None:
            raise ValueError(f"{reader.source}: {reader.prefix + key!r} changes transformers' attention "
                             "factor, which DeepSeek's YaRN does not have")


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

    @classmethod
    def from_hf_config(cls, path_or_dict: Any, **overrides: Any) -> "ModelConfig":
        """The attention of `AttentionConfig.from_hf_config`, the vocabulary, and a dense SwiGLU as
        wide as the config's `intermediate_size` or, for DeepSeek-V4's MoE, its shared experts
        (`moe_intermediate_size` x `n_shared_experts`). Overrides may name fields of either config."""
        attention_fields = {f.name for f in fields(AttentionConfig)}
        _check_field_names(cls, {k: v for k, v in overrides.items() if k not in attention_fields})
        own = {k: overrides.pop(k) for k in list(overrides) if k not in attention_fields}
        attention = AttentionConfig.from_hf_config(path_or_dict, **overrides)
        hf, source = _read_hf_config(path_or_dict)
        top = _HFReader(hf, source)
        values = dict(attention=attention, vocab_size=top.get("vocab_size", int, minimum=1))
        if hf.get("intermediate_size") is not None:
            values["ffn_hidden"] = top.get("intermediate_size", int, minimum=1)
        else:
            values["ffn_hidden"] = top.get("moe_intermediate_size", int, minimum=1) * \
                top.get("n_shared_experts", int, 1, minimum=1)
        return cls(**{**values, **own})

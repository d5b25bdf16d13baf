"""Hugging Face transformers interop: checkpoints by either naming, the project's layer inside
transformers' DeepseekV4 models, and export back.

    from transformers import DeepseekV4ForCausalLM
    from hybrid_attention import hf

    model = DeepseekV4ForCausalLM.from_pretrained(folder)
    hf.apply_to(model, quant="none")        # every DeepseekV4Attention -> HybridAttention
    model.generate(input_ids, max_new_tokens=32, do_sample=False)

Three namings meet here: DeepSeek's official checkpoint (`layers.N.attn.wq_a.weight`, FP8 scales
as `wq_a.scale`), transformers' modules (`model.layers.N.self_attn.q_a_proj.weight`, FP8 scales as
`weight_scale_inv`) and what transformers' `save_pretrained` writes (the official names again, with
a `model.` prefix and the main kv_norm spelt `attn.norm.weight`). `official_name` maps each name to
the project's (= official) one; the tables below are checked against transformers itself in
tests/test_hf.py.

transformers is imported inside the functions that need it, so the package imports without it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .attention import HybridAttention
from .config import AttentionConfig
from .model import HybridTransformer
from .quant import dequantize_fp8_weight
from .rope import layer_rope_frequencies
from .state import LayerState

# transformers' DeepseekV4Attention parameter -> the official / project name (under `attn.`).
HF_ATTENTION_NAMES = {
    "q_a_proj.weight": "wq_a.weight",
    "q_a_norm.weight": "q_norm.weight",
    "q_b_proj.weight": "wq_b.weight",
    "kv_proj.weight": "wkv.weight",
    "kv_norm.weight": "kv_norm.weight",
    "o_a_proj.weight": "wo_a.weight",
    "o_b_proj.weight": "wo_b.weight",
    "sinks": "attn_sink",
    "compressor.position_bias": "compressor.ape",
    "compressor.kv_proj.weight": "compressor.wkv.weight",
    "compressor.gate_proj.weight": "compressor.wgate.weight",
    "compressor.kv_norm.weight": "compressor.norm.weight",
    "compressor.indexer.q_b_proj.weight": "indexer.wq_b.weight",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.weights_proj.weight",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_proj.weight": "indexer.compressor.wkv.weight",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.wgate.weight",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight",
}
# The rest of a decoder layer and of the model that HybridTransformer has a counterpart for
# (transformers' dense-MLP names for the SwiGLU; DeepSeek's MoE has no counterpart).
HF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
}
HF_MODEL_NAMES = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
                  "norm.weight": "norm.weight"}
# Suffixes of an FP8 weight's scale: transformers', the official checkpoint's, the project's tests'.
FP8_SCALE_SUFFIXES = (".weight_scale_inv", ".scale", ".weight.scale")

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def official_name(name: str) -> str:
    """The project's (official) name of a tensor named in any of the three namings; a name it does
    not know comes back with only the `model.` prefix removed."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name in HF_MODEL_NAMES:
        return HF_MODEL_NAMES[name]
    match = _LAYER.match(name)
    if match is None:
        return name
    layer, rest = match.groups()
    if rest.startswith("self_attn."):
        rest = rest[len("self_attn."):]
        return f"layers.{layer}.attn.{HF_ATTENTION_NAMES.get(rest, rest)}"
    if rest == "attn.norm.weight":  # transformers' save_pretrained spelling of the main kv_norm
        return f"layers.{layer}.attn.kv_norm.weight"
    return f"layers.{layer}.{HF_BLOCK_NAMES.get(rest, rest)}"


def transformers_name(name: str) -> str:
    """The name transformers' modules give the project's tensor `name` (the inverse of
    `official_name` for the tensors both have)."""
    attention = {v: k for k, v in HF_ATTENTION_NAMES.items()}
    block = {v: k for k, v in HF_BLOCK_NAMES.items()}
    model = {v: k for k, v in HF_MODEL_NAMES.items()}
    if name in model:  # the LM head sits beside the decoder (`lm_head`), the rest inside (`model.`)
        return model[name] if model[name] == "lm_head.weight" else f"model.{model[name]}"
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"{name!r} has no transformers name")
    layer, rest = match.groups()
    if rest.startswith("attn.") and rest[len("attn."):] in attention:
        return f"model.layers.{layer}.self_attn.{attention[rest[len('attn.'):]]}"
    if rest in block:
        return f"model.layers.{layer}.{block[rest]}"
    raise ValueError(f"{name!r} has no transformers name")


# Reading checkpoints -------------------------------------------------------------------------------


class _Checkpoint:
    """Tensor names of a dict, a .safetensors file, a folder or a sharded index, read lazily."""

    def __init__(self, source) -> None:
        self._get: dict[str, Callable[[], torch.Tensor]] = {}
        if isinstance(source, Mapping):
            for key, value in source.items():
                if not isinstance(key, str):
                    raise TypeError(f"state_dict keys must be tensor names (str), got {key!r}")
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
                self._get[key] = (lambda v=value: v)
            self.where = "state_dict"
            return
        if not isinstance(source, str | os.PathLike):
            raise TypeError(f"source must be a state dict, a .safetensors file, a folder or an index json, "
                            f"got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            index, single = path / "model.safetensors.index.json", path / "model.safetensors"
            path = index if index.exists() else single
        self.where = str(path)
        if path.name.endswith(".json"):
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: not a readable safetensors index with a 'weight_map' "
                                 f"({err})") from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path}: 'weight_map' must map tensor names to files")
            files = {}
            for name, file in weight_map.items():
                if not isinstance(file, str) or "/" in file or "\\" in file:
                    raise ValueError(f"{path}: tensor {name!r} maps to {file!r}, not a file beside the index")
                files.setdefault(file, []).append(name)
            for file, names in files.items():
                self._add_file(path.parent / file, set(names))
        else:
            self._add_file(path, None)

    def _add_file(self, path: Path, names: set[str] | None) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for unreadable files
            raise ValueError(f"{path}: cannot open the safetensors file ({err})") from None
        present = set(handle.keys())
        if names is not None and names - present:
            raise ValueError(f"{path}: the index names tensors the file does not hold: "
                             f"{sorted(names - present)[:5]}")
        for name in sorted(present if names is None else names):
            self._get[name] = (lambda n=name, h=handle: h.get_tensor(n))

    def names(self) -> list[str]:
        return list(self._get)

    def tensor(self, name: str) -> torch.Tensor:
        return self._get[name]()


def _scale_of(weight_name: str, names: set[str]) -> str | None:
    base = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
    for suffix in FP8_SCALE_SUFFIXES:
        if base + suffix in names:
            return base + suffix
    return None


def _prepare(params: dict[str, nn.Parameter], checkpoint: _Checkpoint, select: Callable[[str], str | None],
             what: str) -> dict[str, torch.Tensor]:
    """Every parameter's tensor from the checkpoint, checked and converted to the parameter's dtype.

    select(official name) -> the parameter it belongs to (a key of params), or None to ignore it.
    Missing, unexpected, duplicated, wrongly shaped or non-finite tensors, FP8 weights without a
    scale: a ValueError naming the tensor as the checkpoint spells it. Nothing is written."""
    by_param: dict[str, str] = {}
    scales = set()
    names = set(checkpoint.names())
    for original in sorted(names):
        target = select(official_name(original))
        if target is None:
            continue
        if target in by_param:
            raise ValueError(f"{what}: tensors {by_param[target]!r} and {original!r} both name {target!r}")
        by_param[target] = original
    unexpected = []
    for target, original in list(by_param.items()):
        if target in params:
            continue
        # the scale of another tensor's FP8 weight?
        for suffix in FP8_SCALE_SUFFIXES:
            base = original[: -len(suffix)] if original.endswith(suffix) else None
            if base is not None and (base + ".weight" in names or base in names):
                scales.add(original)
                break
        else:
            unexpected.append(original)
        del by_param[target]
    if unexpected:
        raise ValueError(f"{what}: unexpected tensors {unexpected}")
    missing = [name for name in params if name not in by_param]
    if missing:
        raise ValueError(f"{what}: missing tensors {missing}")
    loaded = {}
    for target, param in params.items():
        original = by_param[target]
        tensor = checkpoint.tensor(original)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {original} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(param.shape)}")
        scale_name = _scale_of(original, scales)
        if tensor.dtype == torch.float8_e4m3fn:
            if scale_name is None:
                raise ValueError(f"FP8 tensor {original} has no scale (one of "
                                 f"{[original.removesuffix('.weight') + s for s in FP8_SCALE_SUFFIXES]})")
            try:
                tensor = dequantize_fp8_weight(tensor, checkpoint.tensor(scale_name))
            except ValueError as err:
                raise ValueError(f"tensor {scale_name}: {err}") from None
        elif scale_name is not None:
            raise ValueError(f"tensor {scale_name} given for a {tensor.dtype} weight {original}; scales "
                             "belong to float8_e4m3fn weights")
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {original} has dtype {tensor.dtype}, expected a float")
        tensor = tensor.to(param.dtype)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {original} holds NaN or Inf values (in {param.dtype})")
        loaded[target] = tensor
    return loaded


def load_state_dict(module: HybridAttention | HybridTransformer, source,
                    attention_only: bool = False) -> None:
    """Load a layer or a whole HybridTransformer from `source` (a dict of tensors, a .safetensors
    file, a folder with model.safetensors or a sharded model.safetensors.index.json, or the index)
    named in any of the three namings; FP8 e4m3 weights with `weight_scale_inv` or `.scale` are
    dequantised.

    A layer takes the tensors of `layers.{layer_id}` when the checkpoint is a model's, else the
    layer-level names. A model takes every parameter, or with attention_only=True only those of
    its attention layers (a DeepSeek checkpoint's MoE and hyper-connections have no counterpart
    here and are then ignored). Every tensor is checked before any parameter is written."""
    if not isinstance(attention_only, bool):
        raise TypeError(f"attention_only must be True or False, got {attention_only!r}")
    checkpoint = _Checkpoint(source)
    if isinstance(module, HybridAttention):
        params = dict(module.named_parameters())
        prefix = f"layers.{module.layer_id}.attn."
        model_level = any(official_name(n).startswith("layers.") for n in checkpoint.names())
        if model_level:
            def select(name):
                return name[len(prefix):] if name.startswith(prefix) else None
        else:
            def select(name):
                return HF_ATTENTION_NAMES.get(name, "kv_norm.weight" if name == "norm.weight" else name)
        what = f"layer {module.layer_id} ({module.kind}) from {checkpoint.where}"
    elif isinstance(module, HybridTransformer):
        params = dict(module.named_parameters())
        if attention_only:
            params = {k: v for k, v in params.items() if ".attn." in k}

        def select(name):
            if attention_only and ".attn." not in name:
                return None
            return name
        what = f"model from {checkpoint.where}"
    else:
        raise TypeError(f"module must be a HybridAttention or a HybridTransformer, "
                        f"got {type(module).__name__}")
    loaded = _prepare(params, checkpoint, select, what)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(loaded[name])


# Export ----------------------------------------------------------------------------------------------


def to_transformers_state_dict(module: HybridAttention | HybridTransformer) -> dict[str, torch.Tensor]:
    """The module's tensors under transformers' module names (`model.layers.N.self_attn.q_a_proj
    .weight`, ...): for a layer, its attention; for a model, its attention layers, norms,
    embedding and head (its dense SwiGLU has no place in transformers' MoE and is left out)."""
    if isinstance(module, HybridAttention):
        own = {f"layers.{module.layer_id}.attn.{k}": v for k, v in module.state_dict().items()}
    elif isinstance(module, HybridTransformer):
        own = {k: v for k, v in module.state_dict().items() if ".ffn." not in k}
    else:
        raise TypeError(f"module must be a HybridAttention or a HybridTransformer, "
                        f"got {type(module).__name__}")
    return {transformers_name(k): v.detach().contiguous() for k, v in own.items()}


def saved_name(name: str) -> str:
    """The name transformers' `save_pretrained` gives the project's tensor `name` in a file (and
    `from_pretrained` reads back): the official name under `model.`, the main kv_norm as
    `attn.norm.weight`, the LM head as `head.weight`."""
    if name == "head.weight":
        return name
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    match = _LAYER.match(name)
    if match is not None and match.group(2) == "attn.kv_norm.weight":
        return f"model.layers.{match.group(1)}.attn.norm.weight"
    return f"model.{name}"


def save_for_transformers(module: HybridAttention | HybridTransformer, folder: str | os.PathLike,
                          config=None) -> Path:
    """Write the module's tensors (those of `to_transformers_state_dict`) as folder/model.safetensors
    under the names transformers' `save_pretrained` writes (`saved_name`), and config.json when a
    transformers config is given; `DeepseekV4ForCausalLM.from_pretrained` reads the file (tensors
    the project has no counterpart for are then initialised by transformers, with its warning)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {saved_name(official_name(k)): v.clone()  # clones: no shared storage in the file
               for k, v in to_transformers_state_dict(module).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        config.save_pretrained(folder)
    return folder


# Inside transformers ---------------------------------------------------------------------------------

ATTN_IMPLEMENTATION = "hybrid_attention"


class TransformersHybridAttention(HybridAttention):
    """HybridAttention with the call signature of transformers' DeepseekV4Attention.

    The streaming state lives in the transformers cache (a `StateCacheLayer` in place of the
    layer's own cache layer), so `model(...)`, `generate(...)` and a cache passed back in work as
    they do natively. Positions come from the state; `position_embeddings` are not used (the layer
    keeps its own RoPE tables). Left padding: each padded row runs on its own state with its pads
    left out, so the compressors see only real tokens (the outputs at pad positions are zeros)."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, position_ids=None,
                attention_mask=None, cache=None, **kwargs):
        x = hidden_states
        keep = _keep_mask(attention_mask, x)
        if cache is None:
            if keep is not None:
                return _padded_forward(self, x, keep, None), None
            _check_positions(position_ids, 0, x)
            return HybridAttention.forward(self, x), None
        layer = _state_layer(cache, self.layer_id)
        if layer.states is None:  # first call: one state, or one per row when rows are padded
            if keep is not None:
                _check_left_padding(keep)
                layer.states = [self.new_state(1, x.device) for _ in range(x.size(0))]
                layer.pads = (~keep).sum(-1).tolist()
            else:
                layer.states = self.new_state(x.size(0), x.device)
        elif keep is not None and not bool(keep.all()):
            raise ValueError("padding is supported on the first call of a sequence only (left padding "
                             "of the prompt); later tokens must all be real")
        if isinstance(layer.states, list):
            if len(layer.states) != x.size(0):
                raise ValueError(f"the cache holds {len(layer.states)} sequences, hidden_states has "
                                 f"batch {x.size(0)}")
            y = _padded_forward(self, x, keep if layer.pos == 0 else None, layer.states, layer.pads)
        else:
            _check_positions(position_ids, layer.pos, x)
            y = HybridAttention.forward(self, x, state=layer.states)
        layer.pos += x.size(1)
        return y, None


def _keep_mask(attention_mask, x: torch.Tensor) -> torch.Tensor | None:
    """The [b, s] bool mask of real tokens that `_padding_mask` hands the layers, or None."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        attention_mask = next(iter(attention_mask.values()))
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("a patched model takes a 2-D attention_mask (1 = token, 0 = padding); got "
                         f"{type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')} "
                         f"(is the model's attn_implementation {ATTN_IMPLEMENTATION!r}?)")
    keep = attention_mask.to(torch.bool)
    if keep.shape != x.shape[:2]:
        raise ValueError(f"attention_mask covers {tuple(keep.shape)} tokens, "
                         f"hidden_states {tuple(x.shape[:2])}")
    return None if bool(keep.all()) else keep


def _check_left_padding(keep: torch.Tensor) -> None:
    real = keep.sum(-1)
    expected = torch.arange(keep.size(1), device=keep.device) >= (keep.size(1) - real)[:, None]
    if not torch.equal(keep, expected):
        raise ValueError("only left padding is supported: each row of attention_mask must be zeros "
                         "followed by ones (pad on the left, tokenizer.padding_side = 'left')")
    if bool((real == 0).any()):
        raise ValueError("a row of attention_mask has no real token")


def _padded_forward(layer: HybridAttention, x: torch.Tensor, keep: torch.Tensor | None, states,
                    pads: list[int] | None = None) -> torch.Tensor:
    """Each row on its own (state): its real tokens only; zeros at its pad positions."""
    if states is None:
        _check_left_padding(keep)
    y = torch.zeros_like(x)
    for i in range(x.size(0)):
        first = int((~keep[i]).sum()) if keep is not None else 0
        state = None if states is None else states[i]
        y[i:i + 1, first:] = HybridAttention.forward(layer, x[i:i + 1, first:], state=state)
    return y


def _check_positions(position_ids, start: int, x: torch.Tensor) -> None:
    if position_ids is None:
        return
    expected = torch.arange(start, start + x.size(1), device=position_ids.device)
    if not bool((position_ids == expected).all()):
        raise ValueError(f"position_ids must be {start}..{start + x.size(1) - 1} (the positions the layer's "
                         "state holds); for padded batches pass attention_mask, not shifted positions")


def _state_layer(cache, layer_id: int):
    """The cache's layer `layer_id` as a StateCacheLayer: an empty transformers layer is replaced."""
    layer_class = _state_layer_class()
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_id:
            cache.layers.append(cache.layer_class_to_replicate())
    if not hasattr(cache, "layers") or len(cache.layers) <= layer_id:
        raise ValueError(f"the cache has no layer {layer_id}; pass a DynamicCache (or none)")
    layer = cache.layers[layer_id]
    if not isinstance(layer, layer_class):
        if layer.get_seq_length() > 0:
            raise ValueError(f"cache layer {layer_id} already holds tokens of transformers' own attention; "
                             "start a new cache after apply_to")
        layer = cache.layers[layer_id] = layer_class()
    return layer


_STATE_LAYER_CLASS = []


def _state_layer_class():
    """StateCacheLayer, defined on first use (it subclasses transformers' CacheLayerMixin)."""
    if _STATE_LAYER_CLASS:
        return _STATE_LAYER_CLASS[0]
    from transformers.cache_utils import CacheLayerMixin

    class StateCacheLayer(CacheLayerMixin):
        """One layer's streaming state (`LayerState`, or one per row of a left-padded batch) behind
        transformers' cache-layer interface. Masks are sized to the new tokens only: the layer
        needs just their padding."""

        is_sliding = False
        is_compileable = False
        is_croppable = False
        supports_early_init = False

        def __init__(self) -> None:
            super().__init__()
            self.states: LayerState | list[LayerState] | None = None
            self.pads: list[int] | None = None
            self.pos = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            raise ValueError("this cache layer holds a HybridAttention state; only that layer writes it")

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, self.pos

        def get_seq_length(self) -> int:
            return self.pos

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.states, self.pads, self.pos = None, None, 0

        def offload(self):
            return None

        def prefetch(self):
            return None

        def reorder_cache(self, beam_idx) -> None:
            raise ValueError("beam search is not supported by the patched model "
                             "(its states are not reordered)")

        def nbytes(self) -> int:
            states = self.states if isinstance(self.states, list) else [self.states]
            return sum(s.nbytes() for s in states if s is not None)

    _STATE_LAYER_CLASS.append(StateCacheLayer)
    return StateCacheLayer


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function of ATTN_IMPLEMENTATION: the new tokens' [b, s] padding (None without
    padding) instead of a [b, 1, s, kv] float mask, which the layer does not need."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, kv_offset:kv_offset + kv_length] if attention_mask.size(-1) > kv_length \
        else attention_mask
    if keep.size(-1) != q_length:  # a cache that is not a StateCacheLayer sized this mask
        keep = attention_mask[:, -q_length:]
    return None if bool(keep.all()) else keep.to(torch.bool)


def _refuse_attention(*args, **kwargs):
    raise ValueError(f"attn_implementation {ATTN_IMPLEMENTATION!r} belongs to models patched by "
                     "hybrid_attention.hf.apply_to; a DeepseekV4Attention that was not replaced called it")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _refuse_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


def apply_to(model: nn.Module, backend: str = "auto", quant: str = "none",
             query_block_size: int | None = None) -> nn.Module:
    """Replace every DeepseekV4Attention of a loaded DeepseekV4ForCausalLM / DeepseekV4Model with
    the project's HybridAttention, in place (liger-kernel style), moving its parameters (the same
    tensors, no copies). Returns the model.

    backend: the layer's backend ("auto", "torch", "triton"). quant: "none" computes what
    transformers computes (it has no FP8 / FP4 rounding and no Hadamard rotation); "official"
    rounds the KV rows and indexer keys as DeepSeek's kernels do (and rotates with Hadamard).
    The model's attn_implementation becomes "hybrid_attention", whose masks are the padding alone."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers DeepseekV4 model, got {type(model).__name__}")
    overrides = dict(quant=quant, hadamard=quant != "none")
    if query_block_size is not None:
        overrides["query_block_size"] = query_block_size
    cfg = AttentionConfig.from_hf_config(model.config, **overrides)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, DeepseekV4Attention)]
    if not found:
        raise ValueError("model has no DeepseekV4Attention to replace (already patched?)")
    for name, old in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], _replacement(old, cfg, backend))
    _register()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def _replacement(old: nn.Module, cfg: AttentionConfig, backend: str) -> TransformersHybridAttention:
    """A TransformersHybridAttention holding `old`'s parameters (moved, not copied)."""
    with torch.device("meta"):
        new = TransformersHybridAttention(cfg, old.layer_idx, backend=backend)
    new._freqs = layer_rope_frequencies(cfg, compressed=new.ratio > 0)  # a real tensor, not meta
    theirs = dict(old.named_parameters())
    ours = dict(new.named_parameters())
    mapped = {HF_ATTENTION_NAMES[k]: v for k, v in theirs.items()}
    if set(mapped) != set(ours):
        raise ValueError(f"layer {old.layer_idx} ({new.kind}): transformers' parameters "
                         f"{sorted(set(theirs))} do not match the layer's {sorted(ours)}")
    for name, param in mapped.items():
        if tuple(param.shape) != tuple(ours[name].shape):
            raise ValueError(f"layer {old.layer_idx}: {name} has shape {tuple(param.shape)}, the layer "
                             f"expects {tuple(ours[name].shape)}")
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        setattr(new.get_submodule(owner) if owner else new, leaf, param)
    new.train(old.training)
    return new

"""The trainer: `hybrid-attention train` and `hybrid_attention.train.train(TrainConfig(...))`.

A `HybridTransformer` on byte-level tokens (`data.py`), trained with DeepSeek's recipe as phases:

  dense    every parameter but the indexer's, on the task loss; CSA layers attend to every
           visible compressed entry (`dense_csa=True`), so no top-k decides anything yet
  indexer  only the indexers train, on their KL loss against the (frozen) dense attention
           (DeepSeek-V3.2's warm-up: about 1000 steps at 1e-3 there)
  sparse   everything: task loss + indexer_weight x indexer loss, CSA attends to its top-k

Each phase has its own warm-up + cosine learning rate. AdamW (weight decay on matrices only),
gradient clipping, gradient accumulation, bf16 autocast, one seed for everything. The data of
step t is a function of (seed, t) alone, so the "data position" of a checkpoint is its step.

Output folder: `config.json` (the ModelConfig), `model.safetensors` (the state dict),
`train_state.pt` (optimizer, step, RNG), `train.json` (these arguments), `metrics.jsonl` (one
line per logged step) and `loss.png`. `--resume` continues a folder; on a CPU the losses are bit
for bit those of a run that never stopped.

Under `torchrun --nproc-per-node N` it trains with torch.distributed (gloo on a CPU, NCCL on
CUDA) with DDP, or with FSDP2 (`--parallel fsdp2`: `fully_shard` per block and the root; the
checkpoint holds the full state, which any number of ranks can resume). Every rank builds the
same global micro-batch and takes its slice, and the task loss is normalised by the global count of target
tokens, so N processes follow one process with the same global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .config import FULL, AttentionConfig, ModelConfig
from .model import HybridTransformer

SCHEDULES = ("v4", "hybrid", "window", "full", "hca", "csa")
PHASES = ("dense", "indexer", "sparse")
_KIND_NAMES = ("window", "csa", "hca", "full")


# Configuration ---------------------------------------------------------------------------------


PARALLEL = ("ddp", "fsdp2")  # how torchrun ranks share the model


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as `train.json` in the output folder."""

    # Model: a preset name or a ModelConfig JSON file, a layer schedule, field overrides.
    model: str = "tiny"
    schedule: str | None = None  # see `schedule_ratios`; None keeps the model's own
    overrides: dict = field(default_factory=dict)  # AttentionConfig / ModelConfig fields

    # Data (data.py): the task, its sequence length and options.
    task: str = "passkey"
    seq_len: int = 256
    task_options: dict = field(default_factory=dict)
    # A length curriculum: [[steps, seq_len], ...] run first, in order, at those (shorter)
    # lengths; the rest of the run at seq_len. The steps count towards the phases' steps.
    curriculum: list = field(default_factory=list)

    # The recipe: steps per phase (0 skips a phase).
    dense_steps: int = 0
    indexer_steps: int = 0
    sparse_steps: int = 200

    # Optimisation.
    batch_size: int = 8  # global sequences per micro-step (all ranks together)
    grad_accum: int = 1
    lr: float = 3e-3
    indexer_lr: float = 1e-3  # the indexer warm-up phase's peak learning rate
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20  # per phase, capped at a tenth of the phase
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    indexer_weight: float = 1.0
    bf16: bool = False
    seed: int = 0

    # Output.
    out: str = "runs/train"
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp2" (fully_shard per block and the root)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = ("seq_len", "batch_size", "grad_accum", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("dense_steps", "indexer_steps", "sparse_steps", "warmup_steps", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if self.total_steps == 0:
            raise ValueError("TrainConfig: dense_steps + indexer_steps + sparse_steps must be at least 1")
        for name in ("lr", "indexer_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip", "indexer_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        self.curriculum = self._checked_curriculum(self.curriculum)
        if self.parallel not in PARALLEL:
            raise ValueError(f"TrainConfig.parallel must be one of {', '.join(PARALLEL)}, "
                             f"got {self.parallel!r}")

    def _checked_curriculum(self, curriculum) -> list:
        """[[steps, seq_len], ...] as lists of ints (a JSON round trip gives the same value)."""
        bad = ValueError(f"TrainConfig.curriculum must be a list of [steps, seq_len] pairs of positive "
                         f"integers, seq_len at most {self.seq_len}, got {curriculum!r}")
        if not isinstance(curriculum, (list, tuple)):
            raise bad
        out = []
        for item in curriculum:
            if not isinstance(item, (list, tuple)) or len(item) != 2 or any(
                    not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in item) \
                    or item[1] > self.seq_len:
                raise bad
            out.append([int(item[0]), int(item[1])])
        return out

    def seq_len_at(self, step: int) -> int:
        """The training length of `step`: the curriculum's, then seq_len."""
        for steps, length in self.curriculum:
            if step < steps:
                return length
            step -= steps
        return self.seq_len

    def tokens_before(self, step: int) -> int:
        """Training tokens of the steps before `step` (all ranks, all micro-steps)."""
        tokens, done = 0, 0
        for steps, length in self.curriculum:
            n = min(steps, step - done)
            if n <= 0:
                break
            tokens, done = tokens + n * length, done + n
        tokens += max(0, step - done) * self.seq_len
        return tokens * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.dense_steps + self.indexer_steps + self.sparse_steps

    def phases(self) -> list[tuple[str, int, int]]:
        """(name, first step, steps) of each phase that has steps, in recipe order."""
        out, first = [], 0
        for name in PHASES:
            steps = getattr(self, f"{name}_steps")
            if steps:
                out.append((name, first, steps))
                first += steps
        return out

    def phase_at(self, step: int) -> tuple[str, int, int]:
        for phase in self.phases():
            if phase[1] <= step < phase[1] + phase[2]:
                return phase
        raise ValueError(f"step {step} is past the run's {self.total_steps} steps")

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine down to min_lr_ratio x peak, restarted for each phase."""
        name, first, steps = self.phase_at(step)
        peak = self.indexer_lr if name == "indexer" else self.lr
        t = step - first
        warmup = min(self.warmup_steps, max(1, steps // 10))
        if t < warmup:
            return peak * (t + 1) / warmup
        progress = (t - warmup) / max(1, steps - warmup)
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field {', '.join(map(repr, unknown))}")
        return cls(**values)


# Model configs: schedules, JSON ----------------------------------------------------------------


def _hca_ratio(cfg: AttentionConfig) -> int:
    """The config's HCA ratio: its first ratio that is neither 0, 'full' nor the CSA ratio (128)."""
    for ratio in cfg.compress_ratios:
        if ratio not in (0, FULL, cfg.csa_ratio):
            return ratio
    return 128


def schedule_ratios(schedule: str, cfg: AttentionConfig) -> list:
    """compress_ratios for a schedule over the config's number of layers (n):

    v4      HCA first, then CSA / HCA alternating, the last layer kept as configured when it is a
            window or full layer (the V4 models end on one)
    hybrid  HCA / CSA alternating, no window or full layer: retrieval must go through them
    window, full, hca, csa   every layer that kind
    a list  comma-separated kinds or ratios, one per layer: "hca,csa,hca,window" or "128,4,128,0"
    """
    if not isinstance(schedule, str) or not schedule.strip():
        raise ValueError(f"schedule must be one of {SCHEDULES} or a comma-separated list, got {schedule!r}")
    n, csa, hca = cfg.n_total_layers, cfg.csa_ratio, _hca_ratio(cfg)
    by_kind = {"window": 0, "csa": csa, "hca": hca, "full": FULL}
    if schedule in by_kind:
        return [by_kind[schedule]] * n
    if schedule == "hybrid":
        return [hca if i % 2 == 0 else csa for i in range(n)]
    if schedule == "v4":
        last = cfg.compress_ratios[-1]
        body = [hca if i % 2 == 0 else csa for i in range(n)]
        return body[:-1] + [last] if last in (0, FULL) and n > 1 else body
    ratios = []
    for item in schedule.split(","):
        item = item.strip()
        if item in by_kind:
            ratios.append(by_kind[item])
        elif item.isdigit() and (int(item) == 0 or int(item) > 1):
            ratios.append(int(item))
        else:
            raise ValueError(f"schedule entry {item!r} must be one of {_KIND_NAMES} or a ratio (0 or > 1); "
                             f"schedules: {SCHEDULES} or a comma-separated list")
    return ratios


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


def model_config_from_dict(values: dict, source: str = "config.json") -> ModelConfig:
    if not isinstance(values, dict) or not isinstance(values.get("attention"), dict):
        raise ValueError(f"{source}: a ModelConfig JSON object needs an 'attention' object")
    attention = {k: v for k, v in values["attention"].items()}
    rest = {k: v for k, v in values.items() if k != "attention"}
    try:
        return ModelConfig(attention=AttentionConfig(**attention), **rest)
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset or JSON file, the schedule, the overrides; byte-level vocabulary."""
    from .data import VOCAB_SIZE

    path = Path(cfg.model)
    if cfg.model.endswith(".json") or path.is_file():
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"model config {cfg.model}: cannot read it ({err})") from None
        model_cfg = model_config_from_dict(values, cfg.model)
    else:
        model_cfg = ModelConfig.preset(cfg.model)
    attention_fields = {f.name for f in fields(AttentionConfig)}
    model_fields = {f.name for f in fields(ModelConfig)} - {"attention"}
    unknown = sorted(set(cfg.overrides) - attention_fields - model_fields)
    if unknown:
        raise ValueError(f"no config field {', '.join(map(repr, unknown))} to override")
    att = {k: v for k, v in cfg.overrides.items() if k in attention_fields}
    attention = model_cfg.attention.replace(**att) if att else model_cfg.attention
    if cfg.schedule is not None:
        ratios = schedule_ratios(cfg.schedule, attention)
        attention = attention.replace(compress_ratios=ratios, n_layers=len(ratios))
    if attention.max_seq_len < cfg.seq_len:
        attention = attention.replace(max_seq_len=cfg.seq_len)
    rest = {k: v for k, v in cfg.overrides.items() if k in model_fields}
    rest.setdefault("vocab_size", VOCAB_SIZE)
    return ModelConfig(attention=attention, vocab_size=rest.pop("vocab_size"),
                       ffn_hidden=rest.pop("ffn_hidden", model_cfg.ffn_hidden))


# Checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(folder: str | Path, model: HybridTransformer, extra: dict | None = None,
                    tensors: dict | None = None) -> None:
    """config.json + model.safetensors (+ train_state.pt with `extra`), each written atomically.
    tensors: the state dict to write (default: the model's own)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(folder / "config.json", json.dumps(model_config_to_dict(model.cfg), indent=2))
    tensors = model.state_dict() if tensors is None else tensors
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    if extra is not None:
        tmp = folder / "train_state.pt.tmp"
        torch.save(extra, tmp)
        os.replace(tmp, folder / "train_state.pt")


def training_arguments(folder: str | Path) -> dict:
    """The TrainConfig fields a training folder's train.json holds ({} without a readable one)."""
    try:
        return json.loads((Path(folder) / "train.json").read_text())
    except (OSError, ValueError):
        return {}


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu",
                    min_seq_len: int | None = None) -> HybridTransformer:
    """The HybridTransformer saved in a training folder (config.json + model.safetensors).

    min_seq_len: raise the model's length limit to at least this, e.g. to test length
    generalisation past what it was configured for; it changes no weight."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: not a checkpoint folder (no {name})")
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / 'config.json'}: cannot read it ({err})") from None
    model_cfg = model_config_from_dict(values, str(folder / "config.json"))
    if min_seq_len is not None and min_seq_len > model_cfg.attention.max_seq_len:
        try:
            model_cfg = dataclasses.replace(
                model_cfg, attention=model_cfg.attention.replace(max_seq_len=min_seq_len))
        except ValueError as err:
            raise ValueError(f"min_seq_len: {err}") from None
    model = HybridTransformer(model_cfg)
    tensors = load_file(str(folder / "model.safetensors"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder / 'model.safetensors'}: missing tensors {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{folder / 'model.safetensors'}: {name} has shape {tuple(t.shape)}, "
                             f"the config gives {tuple(expected[name].shape)}")
    model.load_state_dict(tensors)
    return model.to(device).eval()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Phases: what trains -----------------------------------------------------------------------------


def indexer_parameter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".attn.indexer." in f".{name}"}


def set_trainable(model: nn.Module, phase: str) -> None:
    """dense: all but the indexers; indexer: only the indexers; sparse: everything."""
    indexer = indexer_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(phase == "sparse" or (name in indexer) == (phase == "indexer"))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (a frozen one has no gradient and AdamW leaves it alone);
    weight decay on matrices only, not on norms, sinks or position biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


# The loop ----------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in torch.distributed (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torch.distributed from torchrun's environment (gloo on a CPU, NCCL on CUDA), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local >= gpus:  # NCCL wants a GPU per rank
            raise RuntimeError(f"local rank {local} has no GPU of its own ({gpus} visible): "
                               f"start at most {gpus} processes per node, or hide the "
                               "GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU with gloo; "
                               "benchmarks/cp_check.py shares one GPU between ranks")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, device)


def _wrap(model: nn.Module, cfg: TrainConfig, dist_: Dist, wrapped: nn.Module | None) -> nn.Module:
    """The module the loop calls in a new phase: the model itself or DDP around it."""
    if dist_.world == 1 or cfg.parallel == "fsdp2":  # FSDP2 shards the model itself, once
        return model
    if not any(p.requires_grad for p in model.parameters()):  # nothing trains in this phase
        return model
    from torch.nn.parallel import DistributedDataParallel

    # DDP registers the parameters that require a gradient, so each phase (the indexer frozen in
    # the dense phase, everything else in its warm-up) gets its own wrapper.
    # Every parameter a phase trains takes part in its loss, so DDP need not search for unused ones.
    return DistributedDataParallel(model)


def _micro_batch(task, cfg: TrainConfig, step: int, micro: int, dist_: Dist):
    """This rank's slice of the global micro-batch of (step, micro), and the global target count."""
    batch = task.batch(cfg.batch_size, step * cfg.grad_accum + micro)
    from .data import IGNORE

    count = int((batch.targets != IGNORE).sum())
    lo, hi = cfg.batch_size * dist_.rank // dist_.world, cfg.batch_size * (dist_.rank + 1) // dist_.world
    return batch.inputs[lo:hi].to(dist_.device), batch.targets[lo:hi].to(dist_.device), count


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Run (or continue) the training; returns {"losses": [...per step], "model": model, ...}.

    stop_after: stop (with a checkpoint) once this many steps are done, as an interrupted run
    would; `resume=True` then continues the same folder."""
    dist_ = init_distributed()
    finished = False
    try:
        result = _train(cfg, dist_, resume, progress, stop_after)
        finished = True
        return result
    finally:
        _close_distributed(dist_, wait=finished)


def _close_distributed(dist_: Dist, wait: bool) -> None:
    """Close the process group, after every rank is done when `wait`: a rank that exits while
    the others still talk to it aborts under gloo ("terminate called without an active exception").
    A rank that failed does not wait, so it exits with its error instead of hanging."""
    if dist_.world == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _train(cfg: TrainConfig, dist_: Dist, resume: bool, progress: bool, stop_after: int | None) -> dict:
    from .data import IGNORE, make_task

    out = Path(cfg.out)
    state = None
    if resume:
        saved = out / "train.json"
        if not saved.is_file() or not (out / "train_state.pt").is_file():
            raise ValueError(f"{out}: nothing to resume (no train.json / train_state.pt)")
        if TrainConfig.from_dict(json.loads(saved.read_text())).to_dict() != cfg.to_dict():
            raise ValueError(f"{out}: train.json holds different arguments; resume with the same ones")
        state = torch.load(out / "train_state.pt", weights_only=False)

    # One task per training length (the curriculum's, then seq_len), made before anything is written.
    tasks = {length: make_task(cfg.task, length, seed=cfg.seed, **cfg.task_options)
             for length in {cfg.seq_len, *(length for _, length in cfg.curriculum)}}
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_cfg = build_model_config(cfg)
    model = HybridTransformer(model_cfg).to(dist_.device)
    if state is not None:
        model.load_state_dict(load_checkpoint(out).state_dict())
    _shard(model, cfg, dist_)
    optimizer = make_optimizer(model, cfg)
    step, losses = 0, []
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"], cfg)
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    elif dist_.main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "train.json", json.dumps(cfg.to_dict(), indent=2))
        (out / "metrics.jsonl").write_text("")

    autocast = (torch.autocast(dist_.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext)
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    bar = _Progress(end, step, enabled=progress and dist_.main)
    wrapped, phase_name = None, None
    t_last, tokens_last = time.perf_counter(), cfg.tokens_before(step)
    while step < end:
        name, _, _ = cfg.phase_at(step)
        if name != phase_name:  # freeze what the phase does not train; a new wrapper for it
            set_trainable(model, name)
            wrapped, phase_name = _wrap(model, cfg, dist_, wrapped), name
        lr = cfg.lr_at(step)
        length = cfg.seq_len_at(step)
        task = tasks[length]
        for group in optimizer.param_groups:
            group["lr"] = lr
        task_total, index_total = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            inputs, targets, count = _micro_batch(task, cfg, step, micro, dist_)
            sync = micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
            with (nullcontext() if sync else wrapped.no_sync()), autocast():
                logits, aux = wrapped(inputs, return_aux=True, dense_csa=name != "sparse")
                # This rank's summed target losses / the global count, x world as DDP averages the
                # ranks' gradients: the mean over the global batch, whatever the split.
                task_loss = nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                    reduction="sum") * (dist_.world / max(count, 1) / cfg.grad_accum)
                index_loss = aux["indexer_loss"].float() / cfg.grad_accum
                loss = {"dense": task_loss, "indexer": index_loss}.get(
                    name, task_loss + cfg.indexer_weight * index_loss)
            if loss.requires_grad:  # an indexer warm-up of a model without CSA layers trains nothing
                loss.backward()
            task_total += float(task_loss.detach()) / dist_.world  # this rank's share of the mean
            index_total += float(index_loss.detach()) / dist_.world
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip else \
            torch.tensor(float("nan"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task_total, index_total = _sum_over_ranks((task_total, index_total), dist_)
        losses.append({"step": step, "phase": name, "loss": task_total, "indexer_loss": index_total,
                       "seq_len": length})
        step += 1
        now, tokens = time.perf_counter(), cfg.tokens_before(step)
        rate = (tokens - tokens_last) / max(now - t_last, 1e-9)
        bar.update(step, task_total, index_total, rate)
        if dist_.main and (step % cfg.log_every == 0 or step == end):
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record = dict(losses[-1], lr=lr, grad_norm=float(norm), tokens_per_s=rate, tokens=tokens)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            t_last, tokens_last = now, tokens
        if cfg.save_every and step % cfg.save_every == 0 and step < end:
            _save(out, model, optimizer, step, losses, dist_, cfg)
    bar.close()
    _save(out, model, optimizer, step, losses, dist_, cfg)
    if dist_.main:
        plot_losses(losses, out / "loss.png")
    return {"losses": losses, "model": model, "step": step, "out": out}


def _sum_over_ranks(values: tuple[float, ...], dist_: Dist) -> tuple[float, ...]:
    if dist_.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_.device)
    dist.all_reduce(t)
    return tuple(float(v) for v in t)


def _shard(model: nn.Module, cfg: TrainConfig, dist_: Dist) -> bool:
    """FSDP2 under torchrun with parallel="fsdp2": each block is its own unit (its parameters are
    gathered for its forward and backward, its gradients reduce-scattered after), the root holds the
    embedding, the final norm and the head. Frozen parameters of a phase simply get no gradient."""
    if dist_.world == 1 or cfg.parallel != "fsdp2":
        return False
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return True


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _optimizer_state(model: nn.Module, optimizer, cfg: TrainConfig) -> dict:
    """ddp: the optimizer's own state dict; fsdp2: the full (unsharded) one by parameter name, which
    any number of ranks (one included) can load."""
    if cfg.parallel != "fsdp2":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options())


def _load_optimizer_state(model: nn.Module, optimizer, saved: dict, cfg: TrainConfig) -> None:
    if cfg.parallel != "fsdp2":
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=_state_dict_options())


def _save(out: Path, model, optimizer, step: int, losses: list, dist_: Dist, cfg: TrainConfig) -> None:
    """The checkpoint, written by rank 0. DDP keeps every rank's copy equal; under FSDP2 every
    rank takes part in gathering the full state first."""
    tensors = None
    if cfg.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        tensors = get_model_state_dict(model, options=_state_dict_options())
    optimizer_state = _optimizer_state(model, optimizer, cfg)
    if not dist_.main:
        return
    extra = {"optimizer": optimizer_state, "step": step, "losses": losses,
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    save_checkpoint(out, model, extra, tensors=tensors)


def plot_losses(losses: list[dict], path: Path) -> bool:
    """The loss curves (task loss, indexer loss; phases shaded, the curriculum's length changes
    dashed) as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in losses]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in losses], label="task loss", lw=1)
    ax.plot(steps, [r["indexer_loss"] for r in losses], label="indexer loss", lw=1)
    colours = {"dense": "#dde8f7", "indexer": "#f7eadd", "sparse": "#e3f5e1"}
    first, shown = 0, 0
    for i in range(1, len(losses) + 1):
        if i == len(losses) or losses[i]["phase"] != losses[first]["phase"]:
            ax.axvspan(steps[first], steps[i - 1], color=colours[losses[first]["phase"]], alpha=0.6, lw=0)
            # Labels at two heights in turn, so that a short phase's does not cover the next one's.
            ax.text(steps[first], 0.98 - 0.06 * (shown % 2), losses[first]["phase"], va="top", fontsize=8,
                    transform=ax.get_xaxis_transform())  # x in steps, y in axes units
            first, shown = i, shown + 1
    for before, record in zip(losses, losses[1:], strict=False):
        if before.get("seq_len") != record.get("seq_len"):
            ax.axvline(record["step"], color="grey", ls="--", lw=0.8)
            ax.text(record["step"], 0.02, f" {record.get('seq_len')} tokens", fontsize=7, va="bottom",
                    color="grey", transform=ax.get_xaxis_transform())  # x in steps, y in axes units
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class _Progress:
    """One line on stderr: step, phase losses, tokens/s, ETA."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.first, self.enabled = total, done, enabled
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, index_loss: float, rate: float) -> None:
        if not self.enabled:
            return
        from .generate import format_duration

        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(step - self.first, 1)
        width = 24
        bar = "#" * (width * step // max(self.total, 1))
        sys.stderr.write(f"\rtrain [{bar:<{width}}] {step}/{self.total} loss {loss:.4f} idx {index_loss:.4f} "
                         f"{rate:,.0f} tok/s ETA {format_duration(per_step * (self.total - step))}  ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# Command line -------------------------------------------------------------------------------------


def _parse_set(items: list[str]) -> dict:
    from .cli import UsageError

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes FIELD=VALUE (a JSON value), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def curriculum(text: str) -> list:
    """argparse type of --curriculum: "300:128,100:512" -> [[300, 128], [100, 512]]."""
    out = []
    for item in text.split(","):
        steps, sep, length = item.strip().partition(":")
        if not (sep and steps.isdigit() and length.isdigit() and int(steps) > 0 and int(length) > 0):
            raise argparse.ArgumentTypeError(f"expected STEPS:LEN,... with positive integers, got {text!r}")
        out.append([int(steps), int(length)])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import non_negative_int, positive_float, positive_int, seed

    d = TrainConfig()
    dflt = " Default: %(default)s."
    p.add_argument("--model", default=d.model, help="A preset (tiny, small) or a ModelConfig JSON file "
                   "(the config.json a checkpoint holds)." + dflt)
    p.add_argument("--schedule", default=None, help="Layer kinds: v4, hybrid (HCA/CSA alternating, no window "
                   "or full layer), window, full, hca, csa, or a list like hca,csa,hca,window.")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="Override a config field (AttentionConfig or ModelConfig): --set window_size=32.")
    p.add_argument("--task", default=d.task, choices=("passkey", "mqar", "text"),
                   help="Data: passkey retrieval, multi-query associative recall, or text files." + dflt)
    p.add_argument("--digits", type=positive_int, default=5, help="Digits of the passkey." + dflt)
    p.add_argument("--data", default=None, help="For --task text: a folder of text files (without it, the "
                   "Python standard library's source).")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len, help="Training length." + dflt)
    p.add_argument("--curriculum", type=curriculum, default=[], metavar="STEPS:LEN,...",
                   help="Shorter lengths first: 300:128,100:512 trains 300 steps at 128 tokens, then "
                        "100 at 512, then the rest at --seq-len (the steps count towards the phases').")
    p.add_argument("--dense-steps", type=non_negative_int, default=d.dense_steps,
                   help="Steps of the dense phase (CSA attends to every entry, the indexer frozen)." + dflt)
    p.add_argument("--indexer-steps", type=non_negative_int, default=d.indexer_steps,
                   help="Steps of the indexer warm-up (only the indexers train, on their loss)." + dflt)
    p.add_argument("--sparse-steps", type=non_negative_int, default=d.sparse_steps,
                   help="Steps of sparse training (everything, task + indexer loss)." + dflt)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="Global sequences per micro-step." + dflt)
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="Micro-steps per optimizer step." + dflt)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Peak learning rate." + dflt)
    p.add_argument("--indexer-lr", type=positive_float, default=d.indexer_lr,
                   help="Peak learning rate of the indexer warm-up." + dflt)
    p.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps,
                   help="Linear warm-up steps of each phase (at most a tenth of it)." + dflt)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay of the matrices." + dflt)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="Gradient norm clip (0: none)." + dflt)
    p.add_argument("--indexer-weight", type=float, default=d.indexer_weight,
                   help="Weight of the indexer loss in sparse training." + dflt)
    p.add_argument("--bf16", action="store_true", help="Train under bf16 autocast (fp32 master weights).")
    p.add_argument("--seed", type=seed, default=d.seed, help="Seed of the weights and the data." + dflt)
    p.add_argument("--out", default=d.out, help="Output folder." + dflt)
    p.add_argument("--log-every", type=positive_int, default=d.log_every,
                   help="Steps between lines of metrics.jsonl." + dflt)
    p.add_argument("--save-every", type=non_negative_int, default=d.save_every,
                   help="Steps between checkpoints (0: at the end only)." + dflt)
    p.add_argument("--parallel", choices=PARALLEL, default=d.parallel,
                   help="Under torchrun: ddp (DistributedDataParallel, every rank holds the model) or "
                        "fsdp2 (fully_shard of each block and the root: parameters, gradients and "
                        "optimizer state sharded over the ranks)." + dflt)
    p.add_argument("--resume", action="store_true", help="Continue the run in --out.")
    p.add_argument("--no-progress", action="store_true", help="No progress line on stderr.")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    options = {"folder": args.data} if args.task == "text" and args.data else {}
    if args.task == "passkey" and args.digits != 5:
        options["digits"] = args.digits
    return TrainConfig(model=args.model, schedule=args.schedule, overrides=_parse_set(args.set),
                       task=args.task, seq_len=args.seq_len, task_options=options,
                       curriculum=args.curriculum,
                       dense_steps=args.dense_steps, indexer_steps=args.indexer_steps,
                       sparse_steps=args.sparse_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, indexer_lr=args.indexer_lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       indexer_weight=args.indexer_weight, bf16=args.bf16, seed=args.seed, out=args.out,
                       log_every=args.log_every, save_every=args.save_every, parallel=args.parallel)


def run(args: argparse.Namespace) -> int:
    from .cli import UsageError

    try:
        cfg = config_from_args(args)
        if args.resume:
            saved = Path(cfg.out) / "train.json"
            if saved.is_file():  # the folder's own arguments, so --resume needs only --out
                cfg = TrainConfig.from_dict(json.loads(saved.read_text()))
        build_model_config(cfg)
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except ValueError as err:
        raise UsageError(str(err)) from None
    last = result["losses"][-1]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result['step']} steps: loss {last['loss']:.4f}, indexer loss "
              f"{last['indexer_loss']:.4f}; checkpoint in {result['out']}")
    return 0

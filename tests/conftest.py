"""Shared fixtures and the one closeness helper every test uses."""

from __future__ import annotations

import pytest
import torch

from hybrid_attention import AttentionConfig, HybridAttention

# Tolerances per dtype: fp32 paths must agree to rounding, bf16 paths to bf16 noise.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}

KINDS = ("csa", "hca", "window", "full")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float | None = None) -> None:
    """Fail with max abs error and relative RMSE when `out` is not within `ratio` of `ref`.

    The error is measured relative to the reference's RMS, so the bound does not depend on scale."""
    ratio = TOLERANCE[ref.dtype] if ratio is None else ratio
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    ref64, out64 = ref.double(), out.double()
    diff = (ref64 - out64).abs()
    rms = ref64.square().mean().sqrt().clamp_min(1e-30)
    rel_rmse = diff.square().mean().sqrt() / rms
    max_rel = diff.max() / rms
    assert max_rel <= ratio, (f"{name}: max abs err {diff.max().item():.3e}, rel RMSE "
                              f"{rel_rmse.item():.3e}, max err / RMS {max_rel.item():.3e} > {ratio}")


def table_rows(out: str) -> dict[tuple[int, str], list[str]]:
    """A benchmark's printed table rows keyed by (length, kind); kind "dense SDPA" is two words."""
    table = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            kind = "dense SDPA" if cells[1] == "dense" else cells[1]
            table[(int(cells[0]), kind)] = cells
    return table


@pytest.fixture
def tiny_cfg() -> AttentionConfig:
    return AttentionConfig.preset("tiny")


def layer_of_kind(cfg: AttentionConfig, kind: str, seed: int = 0, dtype=None) -> HybridAttention:
    """A tiny layer of `kind` with random (not zero) values in every parameter."""
    layer_id = next(i for i in range(cfg.n_total_layers) if cfg.layer_kind(i) == kind)
    torch.manual_seed(seed)
    layer = HybridAttention(cfg, layer_id, dtype=dtype)
    with torch.no_grad():
        layer.attn_sink.normal_()
        for name, p in layer.named_parameters():
            if name.endswith("ape"):
                p.normal_()
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return layer


# The tests use tiny shapes, where one thread is fastest and immune to a busy neighbour.
torch.set_num_threads(1)

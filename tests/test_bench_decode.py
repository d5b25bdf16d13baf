"""benchmarks/bench_decode.py: a smoke run prints a row per kind, and its random fill leaves a state of
the same shapes as a real prefill."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402
from conftest import table_rows  # noqa: E402

from hybrid_attention import HybridAttention  # noqa: E402
from hybrid_attention.demo import KINDS, demo_config  # noqa: E402


@pytest.mark.parametrize("extra", [
    ["--quick", "--contexts", "1024", "--kinds", *KINDS],
    ["--quick", "--contexts", "1024", "--sequential", "--threads", "1"],
    ["--preset", "tiny", "--contexts", "261", "--fill", "prefill", "--dense-kv", "shared"],
])
def test_smoke_run_prints_a_row_per_kind(capsys, extra):
    assert bench_decode.main([*extra, "--repeats", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = table_rows(out)
    context = int(extra[extra.index("--contexts") + 1])
    kinds = KINDS if "--kinds" in extra else bench_decode.DEFAULT_KINDS
    assert set(table) == {(context, k) for k in ("dense SDPA", *kinds)}
    for kind in kinds:
        assert float(table[(context, kind)][2]) > 0  # decode ms
    assert f"# {context}: window " in out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context", [1, 261, 512])
def test_random_fill_has_the_shapes_of_a_prefill(kind, context):
    cfg = demo_config("tiny")
    layer = HybridAttention(cfg, KINDS.index(kind)).eval()
    with torch.no_grad():
        real = bench_decode.prefill_state(layer, context, cfg.dim)
    fake = bench_decode.random_state(layer, context)
    assert fake.pos == real.pos == context
    assert fake.nbytes_by_type() == real.nbytes_by_type()
    for name in ("compressor", "index_compressor"):
        a, b = getattr(real, name), getattr(fake, name)
        if a is not None:  # the same slots filled, the same left empty
            assert torch.equal(torch.isinf(a.score), torch.isinf(b.score)), name

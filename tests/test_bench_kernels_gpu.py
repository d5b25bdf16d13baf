"""benchmarks/bench_kernels_gpu.py keeps running: its `--cpu-smoke` mode drives every op and both
layer kinds through prefill and decode at toy shapes on the CPU, so the script is ready for a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_kernels_gpu  # noqa: E402


def test_cpu_smoke_run_times_every_op_of_both_kinds(capsys):
    assert bench_kernels_gpu.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:3]) for line in out.splitlines()
            if line.split()[:1] in (["prefill"], ["decode"])}
    for phase in ("prefill", "decode"):
        for op in ("projections", "compress", "indexer_topk", "sparse_attn", "layer"):
            assert (phase, "csa", op) in rows, (phase, op)
        assert (phase, "hca", "layer") in rows
    assert "# CSA prefill at" in out and "target >= 5x at 128K" in out

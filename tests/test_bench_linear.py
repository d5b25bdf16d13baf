"""benchmarks/bench_linear.py: one timed row per projection and row count, with a ratio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_linear  # noqa: E402


def test_quick_run_prints_every_projection_at_every_row_count(capsys):
    assert bench_linear.main(["--rows", "3", "1", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:]]
    projections = bench_linear.layer_shapes()
    assert len(rows) == 2 * len(projections)
    assert [int(r[0]) for r in rows] == [3] * len(projections) + [1] * len(projections)
    for r in rows:
        base, ours, ratio = float(r[-4]), float(r[-3]), float(r[-2])  # ms rounded to 3 places
        assert base > 0 and ours > 0 and ratio == pytest.approx(ours / base, rel=0.05, abs=0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_linear.main(["--rows", "0"])

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
        base, ours, ratio = float(r[-4]), float(r[-3]), float(r[-2])
        assert base >= 0 and ours >= 0 and ratio > 0
        assert ratio_is_consistent(base, ours, ratio), r


def ratio_is_consistent(base: float, ours: float, ratio: float) -> bool:
    """Whether the printed ratio (of the unrounded times, to 2 places) can be that of times which
    print as `base` and `ours` (3 places): checked against the range the rounding leaves, so the
    answer does not depend on how fast the calls ran."""
    half_ms, half_ratio = 0.0005, 0.005
    lowest = max(ours - half_ms, 0.0) / (base + half_ms)
    highest = (ours + half_ms) / (base - half_ms) if base > half_ms else float("inf")
    return lowest - half_ratio <= ratio <= highest + half_ratio


@pytest.mark.parametrize("base, ours, ratio, consistent", [
    (0.013, 0.013, 1.05, True),  # the run that failed the old check: 0.0134 / 0.0128 = 1.05
    (0.013, 0.013, 0.93, True),
    (0.013, 0.013, 1.20, False),
    (0.000, 0.002, 7.00, True),  # a base under half a microsecond: any ratio above the lowest
    (1.000, 0.500, 0.50, True),
    (1.000, 0.500, 0.60, False),
])
def test_ratio_consistency_allows_exactly_the_rounding(base, ours, ratio, consistent):
    assert ratio_is_consistent(base, ours, ratio) == consistent


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_linear.main(["--rows", "0"])

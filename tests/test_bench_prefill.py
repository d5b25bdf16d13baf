"""benchmarks/bench_prefill.py: a smoke run prints one row per (length, kind) with the ratio to dense."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_prefill  # noqa: E402
from conftest import table_rows  # noqa: E402


def test_smoke_run_prints_every_point(capsys):
    assert bench_prefill.main(["--preset", "tiny", "--lengths", "64", "200", "--repeats", "2",
                               "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = table_rows(out)
    kinds = ("dense SDPA", "window", "csa", "hca", "full")
    assert set(table) == {(n, k) for n in (64, 200) for k in kinds}
    for (n, kind), cells in table.items():
        ratio = cells[4] if kind == "dense SDPA" else cells[3]
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, (n, kind, cells)
    assert "median of 2 interleaved rounds" in out


def test_plot_is_written(tmp_path, capsys):
    png = tmp_path / "prefill.png"
    assert bench_prefill.main(["--preset", "tiny", "--lengths", "64", "128", "--kinds", "csa",
                               "--no-progress", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"plot written to {png}" in capsys.readouterr().out

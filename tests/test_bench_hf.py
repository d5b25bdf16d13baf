"""benchmarks/bench_hf.py: a smoke run prints native and apply_to rows for prefill and decode."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_hf  # noqa: E402


def test_smoke_run_prints_native_and_patched_rows(capsys):
    assert bench_hf.main(["--size", "tiny", "--lengths", "40", "72", "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# device: ") and "transformers" in out.splitlines()[0]
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    seen = {(int(r[0]), r[1], r[2]) for r in rows}
    assert seen == {(n, "prefill", m) for n in (40, 72) for m in ("native", "apply_to")} | \
        {(72, "decode", m) for m in ("native", "apply_to")}
    for row in rows:
        if row[2] == "apply_to":
            assert row[6].endswith("x") and float(row[6][:-1]) > 0 and row[7].startswith("faster"), row

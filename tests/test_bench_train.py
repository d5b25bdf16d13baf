"""benchmarks/bench_train.py: the smoke run prints a row per candidate and length."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402


def load():
    return bench_train


def test_quick_run_prints_every_kind_at_every_length(capsys):
    bench = load()
    # --allocator system: the retain setting is process-wide and would stay for the later tests
    args = ["--quick", "--lengths", "64", "96", "--kinds", "csa", "window", "--allocator", "system"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# bench_train:") and "threads" in out[0] and "tiny" in out[0]
    assert out[0].endswith("allocator: glibc defaults")
    rows = [line.split() for line in out[2:]]
    assert [(r[0], r[1]) for r in rows if r[1] != "dense"] == [
        ("64", "csa"), ("64", "window"), ("96", "csa"), ("96", "window")]
    dense = [r for r in rows if r[1] == "dense"]
    assert len(dense) == 2 and all(r[4] == "1.000" for r in dense)  # the baseline's own ratio
    if bench.PeakMemory().method != "none":  # the memory worker's peaks, where /proc can be read
        assert all(int(r[5]) > 0 and r[6] == "1.000" for r in dense)
        assert all(int(r[4]) > 0 and float(r[5]) > 0 for r in rows if r[1] != "dense")


def test_bad_lengths_are_refused(capsys):
    bench = load()
    try:
        bench.main(["--lengths", "0"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("--lengths 0 was accepted")
    assert "must be positive" in capsys.readouterr().err

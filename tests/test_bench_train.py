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
    if bench.PeakMemory().method != "none":  # the memory worker filled the column (MB, rounded)
        assert all(r[5].isdigit() for r in dense)
        assert all(r[4].isdigit() for r in rows if r[1] != "dense")


def test_the_memory_worker_counts_what_a_step_holds():
    """The dense step at 2048 tokens (tiny preset: 4 heads x 80) must hold its output and the
    gradients of q, k and v at once: 4 x 2.6 MB. The worker measures in a process of its own."""
    bench = load()
    if bench.PeakMemory().method == "none":
        return  # no /proc: nothing to read (the table shows "-")
    peaks = bench.measure_memory(["--quick", "--lengths", "2048", "--kinds", "window"])
    held = 4 * 4 * 2048 * 80 * 4  # out, dq, dk, dv: [1, 4, 2048, 80] fp32 each
    assert peaks[2048]["dense SDPA"] >= held
    assert peaks[2048]["window"] > 0


def test_bad_lengths_are_refused(capsys):
    bench = load()
    try:
        bench.main(["--lengths", "0"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("--lengths 0 was accepted")
    assert "must be positive" in capsys.readouterr().err

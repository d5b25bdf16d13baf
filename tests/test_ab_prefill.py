"""benchmarks/ab_prefill.py: both sides run from their own tree and a ratio is printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ab_prefill  # noqa: E402


def worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout


def test_smoke_run_against_head(capsys):
    before = worktrees()
    assert ab_prefill.main(["--base", "HEAD", "--kind", "hca", "--length", "64", "--rounds", "2",
                            "--calls", "1"]) == 0
    out = capsys.readouterr().out
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 4 and sum(f"base {head}:" in line for line in rounds) == 2
    assert all(float(t) > 0 for line in rounds for t in line.split(":")[1].split())
    ratio = out.strip().splitlines()[-1]
    assert ratio.startswith("working tree / base (medians): ") and float(ratio.split()[-1][:-1]) > 0
    # the temporary worktree is gone again
    assert worktrees() == before


def test_training_steps_against_head(capsys):
    assert ab_prefill.main(["--base", "HEAD", "--kind", "csa", "--length", "64", "--rounds", "2",
                            "--calls", "1", "--train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# csa training step (forward + backward) of 64 tokens")
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 4 and all(float(t) > 0 for line in rounds for t in line.split(":")[1].split())


def test_unknown_base_is_a_clear_error():
    with pytest.raises(SystemExit, match="is not a commit"):
        ab_prefill.main(["--base", "no-such-commit-xyz", "--length", "64"])

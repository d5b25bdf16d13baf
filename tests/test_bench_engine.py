"""benchmarks/bench_engine.py keeps running: the hybrid model with and without the decoded copies,
the full-attention model left out, cache bytes equal to the planner's."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def test_ab_decoded_without_the_full_model():
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--quant", "official",
                          "--lengths", "300", "--no-full", "--ab-decoded", "--steps", "1", "--warmup", "1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("# engine decode | ") and "no copy: hybrid with cache.KEEP_DECODED off" in out[0]
    assert out[1].split()[:5] == ["context", "hybrid", "ms", "no", "copy"]
    row = out[2].split()
    assert row[0] == "300" and row[5] == "-" and row[-1] == "True"  # no full model; bytes = planner
    assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")

"""benchmarks/ab_indexer.py and ab_bf16.py keep running: small smoke runs print their tables,
and the indexer A/B finds its three routes' outputs identical."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_bf16  # noqa: E402
import ab_indexer  # noqa: E402

from hybrid_attention.ops.indexer_topk import cpu  # noqa: E402


def test_indexer_ab_prints_its_three_routes_and_restores_the_defaults(capsys):
    assert ab_indexer.main(["--length", "512", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "CSA layer prefill" in out and "indexer_topk op" in out
    assert all(f"{route} s" in out for route in ("fp32", "int8", "int8+fused"))
    assert "bit-identical in every round" in out
    assert cpu.USE_INT8 == cpu.int8_gemm_is_fast() and cpu.FUSE_EPILOGUE


def test_bf16_ab_prints_a_row_per_kind(capsys):
    assert ab_bf16.main(["--length", "300", "--rounds", "1", "--kinds", "window", "hca"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ab_bf16.py") and "threads" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["window", "hca"]
    assert all(float(r[4]) < 0.05 for r in rows)  # bf16 rounding, not a different layer


def test_bad_arguments_are_refused():
    import pytest

    with pytest.raises(SystemExit):
        ab_bf16.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        ab_indexer.main(["--length", "4"])

"""benchmarks/gpu_session.sh: the --cpu-smoke session runs every part and writes every section of the
report; a kernel that disagrees with its reference makes the exit status non-zero; a row that fails
or overruns its part's budget is reported and the session goes on."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import subprocess
import sys
import time
from pathlib import Path

import pytest
import triton  # noqa: F401  (a dev dependency: `make test` installs it; the kernel checks must run)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session  # noqa: E402

OPS = ("sparse_attention", "indexer_topk", "compress", "joint_attention")


def report_tables(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """Each section's tables (by its heading without "## "), each a list of rows keyed by the header.
    Repeated header names (two "% peak" columns) are numbered: "% peak", "% peak 2"."""
    tables, heading, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
            tables[heading] = []
        elif line.startswith("| ") and heading is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # "\|" is in a cell
            if header is None:
                header = []
                for name in cells:
                    header.append(name if name not in header else f"{name} {header.count(name) + 1}")
                tables[heading].append([])
            else:
                tables[heading][-1].append(dict(zip(header, cells, strict=True)))
        elif line.startswith("|---"):
            continue
        else:
            header = None
    return tables


def section(text: str, prefix: str) -> list[list[dict[str, str]]]:
    found = [t for heading, t in report_tables(text).items() if heading.startswith(prefix)]
    assert found, f"no section {prefix!r} in the report"
    return found[0]


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def test_cpu_smoke_session_writes_every_section(tmp_path):
    out = tmp_path / "session.md"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the session sets it itself for --cpu-smoke
    script = ROOT / "benchmarks" / "gpu_session.sh"
    done = subprocess.run(["bash", str(script), "--cpu-smoke", "--out", "session.md"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-4000:]
    text = out.read_text()
    assert text.startswith("# GPU session") and "- torch " in text and "measured peaks:" in text
    assert "# GPU session" in done.stdout  # printed too (stderr is merged into the tee'd output)
    assert (tmp_path / "session.log").read_text() == done.stdout
    summary, tensors, picks = section(text, "1. Kernel checks")
    assert {row["op"]: row["result"] for row in summary if row["op"] in OPS} == dict.fromkeys(OPS, "pass")
    assert {row["op"] for row in tensors + picks} == set(OPS)
    assert all(row["result"] == "pass" for row in tensors + picks)
    assert {row["tensor"] for row in tensors} == {"out", "dq", "dkv", "dsink", "entries", "dscore", "dape",
                                                  "teacher", "dcompressed"}

    (layers,) = section(text, "2. Prefill and decode")
    timed = {(r["phase"], r["kind"], int(r["tokens"]), r["op"]) for r in layers if is_number(r["time ms"])}
    for length in gpu_session.SMOKE_SIZES.layer_lengths:
        for phase in ("prefill", "decode"):
            assert (phase, "dense", length, "SDPA") in timed
            for kind in ("csa", "hca"):
                for op in gpu_session.LAYER_OPS[kind]:
                    assert (phase, kind, length, op) in timed, (phase, kind, length, op)

    (million,) = section(text, "3. One CSA layer at 1M")
    timed = {(r["phase"], r["op"]) for r in million
             if is_number(r["time ms"]) and int(r["tokens"]) == gpu_session.SMOKE_SIZES.million}
    assert {("prefill", "layer"), ("decode", "layer"), ("decode", "indexer_topk"), ("decode", "sparse_attn"),
            ("decode", "cache read (indexer_topk + sparse_attn)")} <= timed

    (train,) = section(text, "4. Training step")
    timed = {(int(r["tokens"]), r["step"]) for r in train if is_number(r["time s"])}
    for length in gpu_session.SMOKE_SIZES.train_lengths:
        for step in ("dense SDPA", "csa", "hca", "window"):
            assert (length, step) in timed, (length, step)

    (context,) = section(text, "5. Context-parallel prefill over 2 processes")
    assert [int(r["rank"]) for r in context] == [0, 1]
    assert all(r["bytes = formula"] == "yes" and float(r["logits max err / RMS"]) < 1e-4 for r in context)
    assert float(context[1]["states max err / RMS"]) < 1e-4
    assert "Backend gloo; within the tolerance" in text

    assert "- kernel checks: 10 of 10 passed" in text


def only_compress(monkeypatch):
    """Run the compressor's checks alone (they take a second under the interpreter), and let the
    session take the other ops for ops without a Triton backend (else it reports them unchecked)."""
    every = gpu_session.kernel_checks
    monkeypatch.setattr(gpu_session, "kernel_checks",
                        lambda sh, sizes: [c for c in every(sh, sizes) if c[0] == "compress"])
    monkeypatch.setattr(gpu_session, "has_triton_backend", lambda op: op == "compress")


def test_an_op_with_a_triton_backend_and_no_check_fails_the_session(tmp_path, monkeypatch):
    every = gpu_session.kernel_checks
    monkeypatch.setattr(gpu_session, "kernel_checks",
                        lambda sh, sizes: [c for c in every(sh, sizes) if c[0] == "compress"])
    monkeypatch.setattr(gpu_session, "has_triton_backend", lambda op: op in ("compress", "indexer_loss"))
    out = tmp_path / "report.md"
    assert gpu_session.main(["--cpu-smoke", "--parts", "kernels", "--out", str(out)]) == 1
    summary = {row["op"]: row for row in section(out.read_text(), "1. Kernel checks")[0]}
    assert summary["indexer_loss"]["result"] == "FAIL" and "not checked" in summary["indexer_loss"]["cases"]
    assert summary["compress"]["result"] == "pass" and summary["sparse_attention"]["result"] == "-"


def test_a_kernel_that_disagrees_with_its_reference_fails_the_session(tmp_path, monkeypatch, capsys):
    only_compress(monkeypatch)
    real = gpu_session.compress

    def perturbed_reference(*args, backend="auto", **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out * 1.01 if backend == "torch" else out  # a 1% error the kernel "does not have"

    monkeypatch.setattr(gpu_session, "compress", perturbed_reference)
    out = tmp_path / "report.md"
    assert gpu_session.main(["--cpu-smoke", "--parts", "kernels", "--out", str(out)]) == 1
    text = out.read_text()
    summary, tensors = section(text, "1. Kernel checks")
    assert {row["op"]: row["result"] for row in summary}["compress"] == "FAIL"
    assert "- kernel checks: 0 of 2 passed" in text and "compress, CSA: overlap" in text
    entries = [row for row in tensors if row["tensor"] == "entries"]
    assert len(entries) == 2 and all(row["result"] == "FAIL" for row in entries)
    assert capsys.readouterr().out.startswith("# GPU session")


def test_the_same_checks_pass_unperturbed(tmp_path, monkeypatch):
    only_compress(monkeypatch)
    out = tmp_path / "report.md"
    assert gpu_session.main(["--cpu-smoke", "--parts", "kernels", "--out", str(out)]) == 0
    assert "- kernel checks: 2 of 2 passed" in out.read_text()


def test_a_failing_row_is_reported_and_the_session_goes_on(tmp_path, monkeypatch):
    def broken_prefill(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (pretend)\nsecond line, not shown")

    monkeypatch.setattr(gpu_session, "prefill", broken_prefill)
    out = tmp_path / "report.md"
    assert gpu_session.main(["--cpu-smoke", "--parts", "million", "--out", str(out)]) == 0  # no check failed
    (million,) = section(out.read_text(), "3. One CSA layer at 1M")
    rows = {(r["phase"], r["op"]): r for r in million}
    assert rows[("prefill", "layer")]["note"] == "warm-up failed: RuntimeError: CUDA out of memory (pretend)"
    assert is_number(rows[("decode", "layer")]["time ms"])  # the part went on


def test_a_row_past_the_budget_is_stopped_and_the_rest_skipped():
    session = gpu_session.Session(gpu_session.parse_args(["--cpu-smoke"]), gpu_session.SMOKE_SIZES,
                                  gpu_session.TOY, gpu_session.torch.device("cpu"), None)
    with gpu_session.PartClock(0.3) as clock:
        quick, reason = gpu_session.attempt(session, clock, "quick", lambda: 42)
        assert (quick, reason) == (42, None)
        slow, reason = gpu_session.attempt(session, clock, "slow", lambda: time.sleep(5))
        assert slow is None and reason == "stopped: the part's 0.3 s budget ran out"
        _, reason = gpu_session.attempt(session, clock, "next", lambda: 1)
        assert reason.startswith("skipped: the part's")
    assert clock.elapsed() < 2


@pytest.mark.parametrize("bad, message", [
    (["--budget", "kernels"], "expected PART=SECONDS"),
    (["--budget", "warp=3"], "expected PART=SECONDS"),
    (["--budget", "train=-1"], "positive number of seconds"),
    (["--train-lengths", "0"], "--train-lengths must be positive"),
    (["--out", "/no/such/folder/report.md"], "does not exist"),
])
def test_bad_arguments_are_usage_errors(bad, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_session.parse_args(["--cpu-smoke", *bad])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err

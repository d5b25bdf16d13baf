"""The demo's table: every layer kind is there and its figures agree with the layer shapes."""

from __future__ import annotations

import time

import pytest
import torch

from hybrid_attention import AttentionConfig, cli
from hybrid_attention.demo import DEFAULT_LENGTHS, KINDS, PeakMemory, demo_config

SEQ_LEN, FULL_LEN, STEPS = 200, 96, 4
MB = 1 << 20
def parse_table(out: str) -> dict[tuple[str, int], dict[str, str]]:
    """Rows of the printed table keyed by (kind, tokens); cells keyed by the header."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        rows[(cells["kind"], int(cells["tokens"]))] = cells
    return rows


def run_demo(capsys, *extra: str) -> tuple[str, dict]:
    argv = ["demo", "--preset", "tiny", "--seq-len", str(SEQ_LEN), "--full-seq-len", str(FULL_LEN),
            "--decode-steps", str(STEPS), "--no-progress", *extra]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    return out, parse_table(out)


def mean_over_decode(seq_len: int, count) -> float:
    """Mean of count(t) over the decode positions t = seq_len .. seq_len + STEPS - 1."""
    return sum(count(t) for t in range(seq_len, seq_len + STEPS)) / STEPS


@pytest.fixture(scope="module")
def cfg() -> AttentionConfig:
    return demo_config("tiny")


def test_demo_config_has_one_layer_per_kind(cfg):
    assert [cfg.layer_kind(i) for i in range(len(KINDS))] == list(KINDS)


def test_table_lists_every_kind_and_figures_match_the_shapes(capsys, cfg):
    out, rows = run_demo(capsys)
    h, d, win = cfg.n_heads, cfg.head_dim, cfg.window_size
    hca_ratio = cfg.compress_ratios[KINDS.index("hca")]
    dense_name = f"dense SDPA ({h} KV heads)"
    expected = {(k, SEQ_LEN) for k in ("window", "csa", "hca")} | {("full", FULL_LEN)}
    expected |= {(dense_name, SEQ_LEN), (dense_name, FULL_LEN)}
    assert set(rows) == expected
    assert "'full' runs at 96 tokens" in out

    def number(kind, tokens, column):
        return float(rows[(kind, tokens)][column])

    # Keys per decode query, counted by the layer's aux against the index sets of SPEC 4.
    keys = {kind: number(kind, SEQ_LEN, "keys/query") for kind in ("window", "csa", "hca")}
    assert keys["window"] == win
    assert keys["csa"] == win + cfg.index_topk  # SEQ_LEN / ratio entries > top-k
    assert keys["hca"] == pytest.approx(mean_over_decode(SEQ_LEN, lambda t: win + (t + 1) // hca_ratio),
                                        abs=0.05)
    causal = mean_over_decode(FULL_LEN, lambda t: t + 1)
    assert number("full", FULL_LEN, "keys/query") == pytest.approx(causal, abs=0.05)
    assert number(dense_name, FULL_LEN, "keys/query") == pytest.approx(causal, abs=0.05)

    # State bytes per token: the ring is fixed, compressed layers add entries, full keeps all rows.
    per_token = {kind: number(kind, SEQ_LEN, "state B/token") for kind in ("window", "csa", "hca")}
    per_token["full"] = number("full", FULL_LEN, "state B/token")
    assert per_token["window"] == pytest.approx(win * d * 4 / (SEQ_LEN + STEPS), abs=0.05)
    assert per_token["full"] == d * 4
    assert per_token["window"] < per_token["hca"] < per_token["csa"] < per_token["full"]
    assert number(dense_name, SEQ_LEN, "state B/token") == 2 * h * d * 4

    for (kind, tokens), cells in rows.items():
        assert float(cells["prefill s"]) > 0 and float(cells["decode ms/tok"]) > 0, kind
        dense_s = number(dense_name, tokens, "prefill s")
        ratio = float(cells["vs dense"].rstrip("x"))
        # Times are printed to 4 significant digits, the ratio to 2 decimals.
        assert ratio == pytest.approx(float(cells["prefill s"]) / dense_s, rel=2e-3, abs=0.006), kind
        for column in ("prefill peak MB", "decode peak MB"):
            assert cells[column] == "-" or float(cells[column]) >= 0, (kind, column)


def test_shared_dense_cache_is_one_row_per_token(capsys, cfg):
    _, rows = run_demo(capsys, "--dense-kv", "shared")
    dense = rows[("dense SDPA (shared KV)", FULL_LEN)]
    full = rows[("full", FULL_LEN)]
    assert float(dense["state B/token"]) == cfg.head_dim * 4 == float(full["state B/token"])


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "argument --seq-len: must be a positive whole number of tokens"),
    (["--decode-steps", "-1"], "argument --decode-steps: must be an integer >= 0"),
    (["--seq-len", "5000"], "passes the 'tiny' preset's max_seq_len=4096"),
    (["--seq-len", "4K", "--decode-steps", "1"], "= 4097 passes"),
], ids=["zero-length", "negative-steps", "past-max-seq-len", "4K-plus-one-step"])
def test_bad_arguments_are_reported_before_any_work(capsys, argv, message):
    assert cli.main(["demo", "--preset", "tiny", "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_tiny_runs_with_its_default_lengths(capsys):
    """The preset's own defaults fit its max_seq_len=4096 (the small preset's 32768 would not)."""
    assert cli.main(["demo", "--preset", "tiny", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = parse_table(out)
    seq_len, full_len = DEFAULT_LENGTHS["tiny"]
    assert {("csa", seq_len), ("full", full_len)} <= set(rows)
    assert f"prefill {seq_len} tokens ('full': {full_len}), then 64 decode steps" in out


def test_lengths_take_a_k_suffix(capsys):
    _, rows = run_demo(capsys, "--seq-len", "1K", "--full-seq-len", "0")
    assert {("window", 1024), ("full", 1024)} <= set(rows)


@pytest.mark.parametrize("method", ["auto", "sampled"])
def test_peak_memory_sees_a_transient_allocation(method):
    with PeakMemory() as idle:
        pass
    assert idle.peak is not None and idle.peak < 16 * MB
    mem = PeakMemory()
    if method == "sampled":
        mem.method = "sampled"
    with mem:
        block = torch.ones(24 * MB // 4)  # 24 MB, every page written
        time.sleep(0.02)  # long enough for the sampler thread to see it
        del block
    assert 20 * MB <= mem.peak < 64 * MB

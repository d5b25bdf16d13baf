"""The command line's contract: a user error ends with `hybrid-attention COMMAND: error: ...` on
stderr and exit status 2, never a traceback; a bug keeps its traceback; every --help works and
shows the defaults; lengths take K / M suffixes; `generate` refuses what does not fit before it
allocates anything, and its progress line follows the prefill and the decode."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hybrid_attention import HybridTransformer, ModelConfig, cli, generate, planner

GiB = 1 << 30
# A generate run that takes about a second: no baseline, a short prompt, a 10 MiB cache.
TINY_RUN = ["generate", "--preset", "tiny", "--prompt-len", "48", "--new-tokens", "3",
            "--prefill-chunk", "16", "--cache-gib", "0.01", "--no-baseline"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(result: tuple[int, str, str], command: str, message: str) -> None:
    code, out, err = result
    assert code == 2, err
    assert f"hybrid-attention {command}: error:" in err
    assert message in err
    assert "Traceback" not in err
    assert out == ""  # refused before the command printed anything


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Files to pass as --checkpoint: a good one of the tiny preset and broken ones."""
    folder = tmp_path_factory.mktemp("checkpoints")
    weights = HybridTransformer(ModelConfig.preset("tiny")).state_dict()
    files = {name: folder / f"{name}.safetensors" for name in ("good", "truncated", "text", "wrong-shape",
                                                                "missing-tensors")}
    save_file(weights, files["good"])
    data = files["good"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("these are not the weights you are looking for\n")
    save_file({**weights, "embed.weight": torch.zeros(10, 64)}, files["wrong-shape"])
    save_file({k: v for k, v in weights.items() if not k.startswith("layers.1.")} | {"extra": torch.ones(1)},
              files["missing-tensors"])
    return files


# Help -------------------------------------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_is_whole_sentences(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    assert " ".join(cli.DESCRIPTION.split()) in text and cli.DESCRIPTION.endswith(".")
    for name, (_, help_text) in cli.SUBCOMMANDS.items():
        assert f"{name} {' '.join(help_text.split())}" in text
        assert help_text[0].isupper() and help_text.endswith(".")
    assert "2 on a usage error" in text


@pytest.mark.parametrize("command, shown", [
    ("demo", ["Default: 64.", "Default: 32768 for small, 2048 for tiny.", "Default: small."]),
    ("generate", ["Default: 65536.", "Default: 2048.", "Default: 4.0.", "Default: small.", "--force"]),
    ("plan", ["Default: 1M.", "Default: 1.", "Default: bf16-equivalent."]),
])
def test_each_command_help_shows_its_defaults(capsys, command, shown):
    code, out, err = run(capsys, command, "--help")
    assert code == 0 and err == ""
    text = " ".join(out.split())
    for snippet in shown:
        assert snippet in text, snippet


def test_every_default_is_in_the_help():
    """Each option with a default states it, as a sentence: 'Default: <value>.'"""
    for name, parser in subparsers(cli.build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
                continue
            assert action.help[0].isupper() and action.help.rstrip().endswith("."), (name, action.dest)
            if action.default not in (None, False, []):
                expanded = action.help % {"default": action.default}
                assert f"Default: {action.default}." in expanded, (name, action.dest)


# Lengths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, tokens", [("65536", 65536), ("128K", 131072), ("1M", 1 << 20),
                                          ("1m", 1 << 20), ("4k", 4096)])
def test_lengths_take_k_and_m(text, tokens):
    assert cli.token_count(text) == tokens
    args = cli.build_parser().parse_args(["generate", "--prompt-len", text])
    assert args.prompt_len == tokens
    assert cli.build_parser().parse_args(["plan", "--preset", "tiny", "--context", text]).context == tokens
    assert cli.build_parser().parse_args(["demo", "--seq-len", text]).seq_len == tokens


@pytest.mark.parametrize("text", ["0", "-1", "1.5x", "1.0001K", "", "many"])
def test_lengths_refuse_what_is_not_a_token_count(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive whole number of tokens"):
        cli.token_count(text)


# User errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "argument --seq-len: must be a positive whole number of tokens"),
    (["--seq-len", "lots"], "argument --seq-len:"),
    (["--full-seq-len", "-4"], "argument --full-seq-len:"),
    (["--decode-steps", "-1"], "argument --decode-steps: must be an integer >= 0, got '-1'"),
    (["--batch", "0"], "argument --batch: must be an integer >= 1"),
    (["--threads", "two"], "argument --threads: must be an integer >= 0"),
    (["--seed", "-3"], "argument --seed:"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--preset", "tiny", "--seq-len", "4K", "--decode-steps", "1"], "max_seq_len=4096"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_demo_user_errors(capsys, argv, message):
    assert_usage_error(run(capsys, "demo", "--no-progress", *argv), "demo", message)


@pytest.mark.parametrize("argv, message", [
    (["--prompt-len", "0"], "argument --prompt-len: must be a positive whole number of tokens"),
    (["--prompt-len", "1.5x"], "argument --prompt-len:"),
    (["--new-tokens", "0"], "argument --new-tokens: must be an integer >= 1"),
    (["--batch", "-2"], "argument --batch:"),
    (["--prefill-chunk", "0"], "argument --prefill-chunk:"),
    (["--cache-gib", "0"], "argument --cache-gib: must be a positive number"),
    (["--cache-gib", "nan"], "argument --cache-gib:"),
    (["--cache-gib", "inf"], "argument --cache-gib:"),
    (["--seed", "-1"], "argument --seed:"),
    (["--seed", str(1 << 63)], "argument --seed: must be an integer in [0, 2**63)"),
    (["--preset", "v9"], "argument --preset: invalid choice: 'v9'"),
    (["--quant", "fp2"], "argument --quant: invalid choice"),
    (["--checkpoint", "/nonexistent/weights.safetensors"], "--checkpoint /nonexistent/weights.safetensors: "
                                                           "no such file"),
    (["--cache-gib", "0.00001", "--prompt-len", "4K"], "hold at least"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_generate_user_errors(capsys, argv, message):
    result = run(capsys, "generate", "--preset", "tiny", "--no-progress", *argv)
    assert_usage_error(result, "generate", message)


@pytest.mark.parametrize("name, message", [
    ("truncated", "is not a safetensors file"),
    ("text", "is not a safetensors file"),
    ("wrong-shape", "1 tensor of the wrong shape (embed.weight is [10, 64], the model's is [256, 64])"),
    ("missing-tensors", "missing 17 of the model's 69 tensors (layers.1.attn.attn_sink"),
    ("folder", "not a file"),
])
def test_generate_refuses_a_bad_checkpoint_by_name(capsys, checkpoints, name, message):
    path = checkpoints["good"].parent if name == "folder" else checkpoints[name]
    result = run(capsys, *TINY_RUN, "--checkpoint", str(path))
    assert_usage_error(result, "generate", message)
    assert f"--checkpoint {path}" in result[2]
    if name == "missing-tensors":
        assert "1 tensor not in the model (extra)" in result[2]


def test_generate_loads_a_good_checkpoint(capsys, checkpoints):
    code, out, err = run(capsys, *TINY_RUN, "--no-progress", "--checkpoint", str(checkpoints["good"]))
    assert code == 0, err
    assert "cache of one sequence, hybrid" in out


def test_generate_cache_budget_too_small_for_the_pools(capsys):
    """The planner's count fits, the engine's pages do not: still a usage error naming --cache-gib."""
    result = run(capsys, "generate", "--preset", "tiny", "--prompt-len", "4", "--new-tokens", "1",
                 "--cache-gib", "0.0001", "--no-progress", "--no-baseline")
    code, _, err = result
    assert code == 2 and "hybrid-attention generate: error:" in err and "--cache-gib 0.0001" in err
    assert "Traceback" not in err


def test_v4_flash_is_refused_with_the_planners_estimate(capsys, monkeypatch):
    monkeypatch.setattr(generate, "available_memory", lambda: 16 * GiB)
    result = run(capsys, "generate", "--preset", "v4-flash")
    assert_usage_error(result, "generate", "preset 'v4-flash' needs about")
    flash = ModelConfig.preset("v4-flash")
    weights = planner.engine_memory(flash, 1, 1, 1, 1, 0)["weights"]
    err = " ".join(result[2].split())
    assert f"weights {planner.human_bytes(weights)} in fp32" in err and "56.3 GiB" in err
    assert "this machine has 16 GiB available" in err and "--force" in err


def test_force_skips_the_memory_check(capsys, monkeypatch):
    monkeypatch.setattr(generate, "available_memory", lambda: 1 << 20)  # 1 MiB: nothing fits
    assert_usage_error(run(capsys, *TINY_RUN, "--no-progress"), "generate", "needs about")
    code, out, err = run(capsys, *TINY_RUN, "--no-progress", "--force")
    assert code == 0, err
    assert "of 1 MiB available (over, --force)" in out


def test_unknown_available_memory_runs_unchecked(capsys, monkeypatch):
    monkeypatch.setattr(generate, "available_memory", lambda: None)
    code, out, _ = run(capsys, *TINY_RUN, "--no-progress")
    assert code == 0 and "available memory unknown, not checked" in out


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   24260948 kB\n")
    assert generate.available_memory(meminfo) == 24260948 * 1024
    meminfo.write_text("MemTotal:       32000000 kB\n")  # kernels before 3.14 have no MemAvailable
    assert generate.available_memory(meminfo) is None
    assert generate.available_memory(tmp_path / "missing") is None


@pytest.mark.parametrize("argv, message", [
    (["--preset", "v9"], "argument --preset: invalid choice: 'v9'"),
    (["--preset", "tiny", "--context", "0"], "argument --context: must be a positive whole number"),
    (["--preset", "tiny", "--batch", "0"], "argument --batch: must be an integer >= 1"),
    (["--preset", "tiny", "--memory=-3GB"], "argument --memory: memory must be"),
    (["--preset", "tiny", "--gpu", "H900"], "argument --gpu: unknown GPU 'H900'"),
    (["--preset", "tiny", "--precision", "all=fp6"], "--precision: unknown storage format 'fp6'"),
    (["--preset", "tiny", "--baseline", "/nonexistent/config.json"],
     "--baseline: '/nonexistent/config.json' is neither"),
    (["--config", "/nonexistent/config.json"], "--config: no config file at '/nonexistent/config.json'"),
    (["--preset", "tiny", "--config", "x.json"], "not allowed with argument"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_plan_user_errors(capsys, argv, message):
    assert_usage_error(run(capsys, "plan", *argv), "plan", message)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a readable JSON file"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"hidden_size": 4096}', "missing the key 'num_hidden_layers'"),
    ('{"hidden_size": "4096", "num_hidden_layers": 2}', "'hidden_size' must be an integer >= 1"),
])
def test_plan_refuses_a_bad_config_file_by_name(capsys, tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    result = run(capsys, "plan", "--config", str(path))
    assert_usage_error(result, "plan", message)
    assert str(path) in result[2]


def test_plan_plot_into_a_missing_folder_is_refused(capsys, tmp_path):
    target = tmp_path / "figures" / "plan.png"
    result = run(capsys, "plan", "--preset", "tiny", "--plot", str(target))
    assert_usage_error(result, "plan", f"the folder {str(target.parent)!r} does not exist (create it first)")
    assert not target.parent.exists()  # nothing was created
    plot = lambda path: run(capsys, "plan", "--preset", "tiny", "--plot", str(path))
    assert_usage_error(plot(tmp_path), "plan", "is a folder")
    assert_usage_error(plot(tmp_path / "plan.docx"), "plan", "cannot write a 'docx' image")


def test_plan_plot_name_the_file_system_refuses(capsys, tmp_path):
    target = tmp_path / ("p" * 300 + ".png")
    result = run(capsys, "plan", "--preset", "tiny", "--plot", str(target))
    assert_usage_error(result, "plan", f"--plot: cannot write {str(target)!r}: File name too long")


def test_plan_plot_write_failure_is_a_usage_error(capsys, tmp_path):
    target = tmp_path / "plan.svg"
    target.symlink_to("/dev/full")  # every write fails: no space left on device
    result = run(capsys, "plan", "--preset", "tiny", "--context", "4K", "--plot", str(target))
    assert_usage_error(result, "plan", f"--plot: cannot write {str(target)!r}: No space left on device")


# What is not a user error -----------------------------------------------------------------------


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError from inside a command is a bug: main() lets it through, uncaught."""
    def broken(args):
        raise ValueError("a shape mismatch deep in the math")

    monkeypatch.setattr("hybrid_attention.demo.run", broken)
    with pytest.raises(ValueError, match="deep in the math"):
        cli.main(["demo"])


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("hybrid_attention.planner.run", interrupted)
    code, _, err = run(capsys, "plan", "--preset", "tiny")
    assert code == 130 and "hybrid-attention plan: interrupted" in err and "Traceback" not in err


# Progress ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_covers_prefill_then_decode():
    stream, clock = io.StringIO(), Clock()
    progress = generate.Progress("hybrid", 8192, 4, stream=stream, clock=clock)
    clock.now = 2.0
    progress.prefill(0, 2048, 8192)
    clock.now = 4.0
    progress.prefill(0, 4096, 8192)
    clock.now = 8.0
    progress.prefill(0, 8192, 8192)
    progress.token(0, 7)
    clock.now = 9.0
    progress.token(0, 8)
    progress.close()
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0].startswith("hybrid: prefill [........................] 0/8,192 tokens, - tok/s")
    assert frames[1].startswith("hybrid: prefill [######..................] 2,048/8,192 tokens, "
                                "1,024.0 tok/s, ETA 0:06")
    assert frames[3].startswith("hybrid: prefill [########################] 8,192/8,192 tokens")
    assert frames[5].startswith("hybrid: decode [############............] 2/4 tokens, 1.0 tok/s, ETA 0:02")
    # One line redrawn: each frame covers the one before it, the last ends the line.
    assert all(len(b.rstrip("\n")) >= len(a.rstrip()) for a, b in zip(frames, frames[1:], strict=False))
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_generate_draws_the_prefill_progress(capsys):
    code, out, err = run(capsys, *TINY_RUN)
    assert code == 0
    frames = err.split("\r")
    assert any("hybrid: prefill [#" in f and "16/48 tokens" in f for f in frames)
    assert any("48/48 tokens" in f for f in frames)
    assert any("hybrid: decode [" in f and "3/3 tokens" in f for f in frames)
    assert "# memory: about" in out and "Traceback" not in err


# In a real terminal -----------------------------------------------------------------------------


def test_no_traceback_reaches_the_terminal(checkpoints, tmp_path):
    """`python -m hybrid_attention.cli` and the installed script: only the error line and status 2."""
    script = Path(sys.executable).with_name("hybrid-attention")
    commands = [
        [sys.executable, "-m", "hybrid_attention.cli", *TINY_RUN, "--checkpoint", str(checkpoints["text"])],
        [str(script) if script.exists() else sys.executable, *([] if script.exists() else
                                                               ["-m", "hybrid_attention.cli"]),
         "plan", "--preset", "tiny", "--plot", str(tmp_path / "missing" / "plan.png")],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "error:" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""

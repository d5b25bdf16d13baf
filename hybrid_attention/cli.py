"""The `hybrid-attention` command line: `demo`, `generate`, `plan`, `train` and `eval`.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) ->
int`. User errors end the command with `hybrid-attention COMMAND: error: ...` on stderr and exit
status 2, argparse's convention: argparse reports bad arguments itself (the `type=` functions
below check every number), and `run()` raises `UsageError` for what it can only check later (a
file that cannot be read, arguments that do not fit together, a run too large for the machine).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("DeepSeek-V4 hybrid attention from the command line: time each layer kind against "
               "dense attention (demo), serve prompts through the engine (generate), or count KV cache, "
               "FLOPs and memory of a model (plan).")
EXIT_STATUS = ("Exit status: 0 on success, 2 on a usage error (a bad argument, a file that cannot be used, "
               "a run that does not fit this machine), 130 when interrupted, 1 on an internal error (with "
               "its traceback).")

SUBCOMMANDS = {
    "demo": ("hybrid_attention.demo",
             "Time one layer of each kind (window, CSA, HCA, full) against dense SDPA on the CPU."),
    "generate": ("hybrid_attention.generate",
                 "Serve random prompts through the engine, beside the same model with every layer full."),
    "plan": ("hybrid_attention.planner",
             "Count the KV cache, FLOPs and memory of a hybrid, MLA or GQA model."),
    "eval": ("hybrid_attention.eval",
             "Evaluate a trained checkpoint: passkey accuracy by length and depth, indexer recall, "
             "perplexity."),
    "train": ("hybrid_attention.train",
              "Train a HybridTransformer on byte-level tasks (passkey, MQAR, text), DeepSeek's recipe."),
}


class UsageError(ValueError):
    """A mistake of the user's, not of the code: reported as `error: ...` with exit status 2."""


# Argument types: argparse calls them and reports an ArgumentTypeError as a usage error. ----------


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _integer(text, 0)
    if value >= 1 << 63:  # torch.manual_seed takes 64 bits; the engine keeps seeds below 2**63
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def token_count(text: str) -> int:
    """A positive number of tokens: 65536, 128K or 1M (K = 1024, M = 1024 * 1024)."""
    from .planner import parse_context

    try:
        return parse_context(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a positive whole number of tokens like 65536, 128K or 1M (1K = 1024), got {text!r}"
        ) from None


def token_count_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else token_count(text)


# The parser and main ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-attention", description=DESCRIPTION,
                                     epilog="Run 'hybrid-attention COMMAND --help' for the options of a "
                                            "command. " + EXIT_STATUS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_STATUS)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a usage error, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument, already reported by argparse (2)
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2
    prog = f"hybrid-attention {args.command}"
    try:
        return args._run(args) or 0
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # The modules import UsageError from hybrid_attention.cli, so run that module's main rather than
    # this __main__ copy, whose UsageError would be a different class.
    from hybrid_attention.cli import main as package_main

    sys.exit(package_main())

"""`hybrid-attention` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("hybrid_attention.demo", "run the 'small' stack (one layer per kind) beside dense SDPA"),
    "generate": ("hybrid_attention.generate", "serve random prompts through the engine, beside a dense model"),
    "plan": ("hybrid_attention.planner", "KV-cache, FLOPs and memory calculator (hybrid, MLA, GQA)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-attention", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except ValueError as err:
        print(f"hybrid-attention {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Ask a trained checkpoint for pass keys, with prompts built from the published format alone.

    python benchmarks/ask_passkey.py runs/quick/hybrid                  # 1x and 2x its training length
    python benchmarks/ask_passkey.py runs/quick/hybrid --lengths 1024 --keys 20 --json

This script knows nothing of `hybrid_attention.data`: it writes each prompt from the format of
Mohtashami and Jaggi (2023) as the trainer issue states it - the filler "The grass is green. The
sky is blue. The sun is yellow. Here we go. There and back again." repeated, the key sentence
"The pass key is 71432. Remember it. 71432 is the pass key." between two of its sentences, and the
question " What is the pass key? The pass key is" at the end - one UTF-8 byte per token. The
checkpoint is loaded with `hybrid_attention.load_checkpoint` and answers through
`Engine.generate` (greedy, one token more than the key); an answer is right when it is a space
and the key. Prints one line per prompt and the accuracy by length.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
QUESTION = " What is the pass key? The pass key is"


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def format_prompt(key: str, length: int, depth: float) -> str:
    """`length` characters: filler sentences, the key sentence after about `depth` of the room
    the filler has (at a sentence boundary), filler cut to fit, the question."""
    needle = key_sentence(key)
    room = length - len(needle) - len(QUESTION)
    if room < 0:
        raise ValueError(f"a {len(key)}-digit key needs prompts of at least "
                         f"{len(needle) + len(QUESTION)} characters, got {length}")
    before, i = "", 0
    while len(before) + len(FILLER[i % 5]) + 1 <= depth * room:  # whole sentences, each + " "
        before += FILLER[i % 5] + " "
        i += 1
    after = ""
    while len(after) < room - len(before):
        after += " " + FILLER[i % 5]
        i += 1
    text = before + needle + after[:room - len(before)] + QUESTION
    assert len(text) == length
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="A training folder (config.json, model.safetensors, train.json).")
    p.add_argument("--lengths", default=None,
                   help="Comma-separated prompt lengths (default: 1x and 2x the training seq_len).")
    p.add_argument("--keys", type=int, default=10,
                   help="Prompts per length, depths spread evenly (default: 10).")
    p.add_argument("--digits", type=int, default=None, help="Key digits (default: the training run's).")
    p.add_argument("--seed", type=int, default=2026, help="Seed of the keys (default: 2026).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of lines.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = Path(args.checkpoint)
    train_args = {}
    if (folder / "train.json").is_file():
        train_args = json.loads((folder / "train.json").read_text())
    digits = args.digits or train_args.get("task_options", {}).get("digits", 5)
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    elif "seq_len" in train_args:
        lengths = [train_args["seq_len"], 2 * train_args["seq_len"]]
    else:
        print("ask_passkey.py: error: no train.json in the checkpoint; give --lengths", file=sys.stderr)
        return 2
    if args.keys < 1 or digits < 1 or any(n < 1 for n in lengths):
        print("ask_passkey.py: error: --keys, --digits and --lengths must be positive", file=sys.stderr)
        return 2

    from hybrid_attention import load_checkpoint
    from hybrid_attention.engine import Engine

    try:
        model = load_checkpoint(folder, min_seq_len=max(lengths) + digits + 1).eval()
    except ValueError as err:
        print(f"ask_passkey.py: error: {err}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    asked = []
    for length in lengths:
        for j in range(args.keys):
            key = "".join(rng.choice("0123456789") for _ in range(digits))
            depth = j / max(1, args.keys - 1)
            try:
                prompt = format_prompt(key, length, depth)
            except ValueError as err:
                print(f"ask_passkey.py: error: {err}", file=sys.stderr)
                return 2
            asked.append({"length": length, "depth": round(depth, 3), "key": key, "prompt": prompt})
    engine = Engine(model, max_batch=4, max_seq_len=max(lengths) + digits + 1)
    results = engine.generate([list(a["prompt"].encode()) for a in asked], max_new_tokens=digits + 1)
    for a, r in zip(asked, results, strict=True):
        a["answer"] = bytes(r.tokens).decode(errors="replace")
        a["right"] = a["answer"] == " " + a["key"]
        del a["prompt"]
    accuracy = {n: sum(a["right"] for a in asked if a["length"] == n) / args.keys for n in lengths}
    if args.json:
        print(json.dumps({"checkpoint": str(folder), "accuracy": accuracy, "prompts": asked}))
        return 0
    for a in asked:
        print(f"{a['length']:>7} depth {a['depth']:.2f}  key {a['key']}  answer {a['answer']!r:<10} "
              f"{'right' if a['right'] else 'wrong'}")
    print("accuracy: " + ", ".join(f"{n}: {v:.2f}" for n, v in accuracy.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training and evaluation data: passkey retrieval, multi-query associative recall, real text.

Tokens are bytes: `VOCAB_SIZE = 256` and a token id is one byte of the text's UTF-8 encoding. There
are no special tokens (no BOS, EOS or padding id); the synthetic tasks pad with ordinary bytes.

A `Batch` holds `inputs` and `targets`, both LongTensors [b, s]: `targets` is the next token, or
`IGNORE` (-100, the default `ignore_index` of `F.cross_entropy`) where no loss is taken.

Every batch is a pure function of the task's arguments, its seed and the step index, so a resumed run
sees exactly the batches it would have seen: the data position is the step.

Tasks (all with `name` and `batch(batch_size, step)`; `make_task` builds one by name):
- `PasskeyTask`: find a 5-digit key hidden in repeated filler (Mohtashami and Jaggi 2023, "Landmark
  Attention"); `passkey_prompt` and `needle_grid` build the evaluation prompts.
- `MQARTask`: multi-query associative recall (Arora et al. 2023, Zoology).
- `TextCorpus`: random windows of the text files under a folder (by default the Python standard
  library's sources), split into train and validation parts by file.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import is_finite_number, is_int

VOCAB_SIZE = 256
IGNORE = -100

TASKS = ("passkey", "mqar", "text")


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of `text` as token ids."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """The text of a sequence of token ids (a list or a 1-D tensor); invalid UTF-8 becomes U+FFFD."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    try:
        raw = bytes(ids)
    except (ValueError, TypeError):
        bad = next(i for i in ids if not (is_int(i) and 0 <= i < VOCAB_SIZE))
        raise ValueError(f"token id {bad!r} is not a byte: ids must be ints in [0, {VOCAB_SIZE})") from None
    return raw.decode("utf-8", errors="replace")


@dataclass
class Batch:
    """One training batch; `targets[i, j]` is the token after `inputs[i, j]`, or IGNORE."""

    inputs: torch.Tensor  # [b, s] int64
    targets: torch.Tensor  # [b, s] int64

    def to(self, device) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device))


def _check_int(name: str, value, minimum: int) -> None:
    # ValueError for the wrong type too: the values come from a command line or a config file.
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_fraction(name: str, value) -> None:
    if not (is_finite_number(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _seed(*parts) -> int:
    """A 63-bit seed from the task name, its seed and the position (step, index, ...).

    Hashing, rather than `seed * K + step`, keeps (seed, step) pairs from colliding."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _to_batch(samples: bytes, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of seq_len + 1 bytes -> (inputs, targets) [b, s], the targets shifted by one."""
    rows = torch.frombuffer(bytearray(samples), dtype=torch.uint8).view(batch_size, -1).long()  # [b, s+1]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
QUESTION = " What is the pass key? The pass key is"
_KEY_PREFIX = "The pass key is "

# The filler is this cycle repeated: every sentence followed by one space.
_FILLER_CYCLE = " ".join(FILLER_SENTENCES).encode() + b" "
# Offsets of the sentence starts within one cycle.
_SENTENCE_STARTS = [0]
for _sentence in FILLER_SENTENCES[:-1]:
    _SENTENCE_STARTS.append(_SENTENCE_STARTS[-1] + len(_sentence) + 1)
_LONGEST_SENTENCE = max(len(s) + 1 for s in FILLER_SENTENCES)


def key_sentence(key: str) -> str:
    return f"{_KEY_PREFIX}{key}. Remember it. {key} is the pass key."


def answer_ids(key: str) -> list[int]:
    """The answer tokens: a space, then the key's digits."""
    _check_key(key)
    return encode(" " + key)


def min_passkey_length(digits: int) -> int:
    """The shortest prompt that holds the key sentence of a `digits`-digit key and the question."""
    return len(key_sentence("0" * digits)) + len(QUESTION)


def _check_key(key) -> None:
    if not (isinstance(key, str) and key and key.isascii() and key.isdigit()):
        raise ValueError(f"key must be a non-empty string of the digits 0-9, got {key!r}")


def _filler(start: int, length: int) -> bytes:
    """`length` bytes of the endless filler stream, from offset `start`."""
    offset = start % len(_FILLER_CYCLE)
    repeats = (offset + length) // len(_FILLER_CYCLE) + 1
    return (_FILLER_CYCLE * repeats)[offset:offset + length]


def _nearest_boundary(target: float, limit: int) -> int:
    """The sentence start in the filler stream nearest to `target`, among those <= `limit`."""
    period = len(_FILLER_CYCLE)
    cycle = int(target) // period
    # The sentence starts of the cycle that holds `target`, and the start of the next cycle.
    starts = [cycle * period + start for start in _SENTENCE_STARTS] + [(cycle + 1) * period]
    i = bisect.bisect_right(starts, target) - 1
    below, above = starts[i], starts[i + 1]
    if above <= limit and above - target < target - below:
        return above
    return below


def _passkey_bytes(length: int, depth: float, key: str) -> tuple[bytes, int, float]:
    """(prompt, bytes of filler before the key sentence, realised depth); arguments already checked.

    Layout: filler[:before] + key sentence + (" " + filler[before:])[:after] + question, where the
    filler before is cut at the sentence start nearest to depth * (before + after) and the filler
    after is cut wherever the prompt reaches `length`."""
    needle = key_sentence(key).encode()
    filler = length - len(needle) - len(QUESTION)
    before = _nearest_boundary(depth * filler, filler)
    after = (b" " + _filler(before, filler - before))[:filler - before]
    prompt = _filler(0, before) + needle + after + QUESTION.encode()
    realised = before / filler if filler else 0.0
    return prompt, before, realised


@dataclass
class PasskeyPrompt:
    """A passkey prompt and its answer; `needle` is the [start, end) span of the key's first digits."""

    prompt: list[int]
    answer: list[int]
    needle: tuple[int, int]
    depth: float  # realised: the fraction of the filler that comes before the key sentence
    key: str

    @property
    def key_spans(self) -> list[tuple[int, int]]:
        """The [start, end) spans of both times the key sentence states the key ("The pass key is
        71432. Remember it. 71432 is the pass key."): a model may read either."""
        sentence = key_sentence(self.key)
        origin = self.needle[0] - sentence.index(self.key)  # where the sentence starts
        return [(origin + i, origin + i + len(self.key))
                for i in (sentence.index(self.key), sentence.rindex(self.key))]


def passkey_prompt(length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens with the key sentence at about `depth` of the filler.

    The key sentence starts at the sentence boundary nearest to the asked depth; the filler after it
    is cut (mid-sentence if need be) so that the question ends the prompt at `length` tokens. With no
    room for filler the realised depth is 0."""
    _check_key(key)
    _check_int("length", length, 1)
    _check_fraction("depth", depth)
    minimum = min_passkey_length(len(key))
    if length < minimum:
        raise ValueError(f"length {length} is too short for a {len(key)}-digit key: the key sentence and "
                         f"the question need at least {minimum} tokens")
    prompt, before, realised = _passkey_bytes(length, float(depth), key)
    start = before + len(_KEY_PREFIX)
    return PasskeyPrompt(list(prompt), answer_ids(key), (start, start + len(key)), realised, key)


def _check_depth_range(depth) -> tuple[float, float]:
    if not (isinstance(depth, tuple | list) and len(depth) == 2):
        raise ValueError(f"depth must be a (low, high) pair in [0, 1], got {depth!r}")
    low, high = depth
    _check_fraction("depth[0]", low)
    _check_fraction("depth[1]", high)
    if low > high:
        raise ValueError(f"depth must have low <= high, got {depth!r}")
    return float(low), float(high)


class PasskeyTask:
    """Passkey retrieval at a fixed length: prompt + answer is seq_len + 1 tokens, loss on the answer.

    Each sample draws its key (`digits` uniform digits, leading zeros allowed) and its depth (uniform
    in `depth`) from a generator seeded by (seed, step, index in the batch), so a batch of b is the
    first b samples of any larger batch of the same step."""

    name = "passkey"

    def __init__(self, seq_len: int, digits: int = 5, seed: int = 0, depth: tuple[float, float] = (0.0, 1.0)):
        _check_int("digits", digits, 1)
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        self.depth = _check_depth_range(depth)
        answer_len = 1 + digits
        minimum = min_passkey_length(digits) + answer_len - 1
        if seq_len < minimum:
            raise ValueError(f"seq_len {seq_len} is too short for a {digits}-digit passkey: the prompt and "
                             f"the answer need seq_len >= {minimum}")
        self.seq_len, self.digits, self.seed = seq_len, digits, seed
        self.prompt_len = seq_len + 1 - answer_len

    def _draw(self, step: int, index: int) -> tuple[str, float]:
        rng = random.Random(_seed(self.name, self.seed, step, index))
        key = f"{rng.randrange(10 ** self.digits):0{self.digits}d}"
        return key, rng.uniform(*self.depth)

    def sample(self, step: int, index: int) -> PasskeyPrompt:
        """Sample `index` of the batch at `step`, as a prompt and its answer."""
        _check_int("step", step, 0)
        _check_int("index", index, 0)
        key, depth = self._draw(step, index)
        return passkey_prompt(self.prompt_len, depth, key)

    def batch(self, batch_size: int, step: int) -> Batch:
        _check_int("batch_size", batch_size, 1)
        _check_int("step", step, 0)
        samples = []
        for index in range(batch_size):
            key, depth = self._draw(step, index)
            prompt, _, _ = _passkey_bytes(self.prompt_len, depth, key)
            samples.append(prompt + b" " + key.encode())
        inputs, targets = _to_batch(b"".join(samples), batch_size)  # [b, s]
        # Targets at positions prompt_len - 1 .. seq_len - 1 are the answer's tokens.
        targets[:, :self.prompt_len - 1] = IGNORE
        return Batch(inputs, targets)


@dataclass
class NeedleCase:
    """One cell (and repeat) of a needle-in-a-haystack grid."""

    length: int  # prompt tokens
    depth: float  # asked; prompt.depth is the realised one
    repeat: int
    key: str
    prompt: PasskeyPrompt


def needle_grid(lengths: list[int], depths: list[float], seed: int = 0, per_cell: int = 1,
                digits: int = 5) -> list[NeedleCase]:
    """Passkey prompts for every (length, depth, repeat), lengths outermost.

    Each case's key is drawn from (seed, length, depth, repeat), so adding lengths or depths to a grid
    leaves the keys of the other cells as they were."""
    _check_int("seed", seed, 0)
    _check_int("per_cell", per_cell, 1)
    _check_int("digits", digits, 1)
    if not lengths or not depths:
        raise ValueError(f"lengths and depths must be non-empty, got {lengths!r} and {depths!r}")
    minimum = min_passkey_length(digits)
    for length in lengths:
        if not is_int(length) or length < minimum:
            raise ValueError(f"lengths must be ints >= {minimum} (the key sentence and the question of a "
                             f"{digits}-digit key), got {length!r}")
    for depth in depths:
        _check_fraction("depths", depth)
    cases = []
    for length in lengths:
        for depth in depths:
            for repeat in range(per_cell):
                rng = random.Random(_seed("needle", seed, length, float(depth), repeat))
                key = f"{rng.randrange(10 ** digits):0{digits}d}"
                prompt = passkey_prompt(length, depth, key)
                cases.append(NeedleCase(length, float(depth), repeat, key, prompt))
    return cases


# MQAR vocabulary: keys and values from disjoint byte ranges, 0 between the queries (Zoology pads
# with 0 too). Keys are the non-ASCII bytes so that up to 128 distinct keys fit in the byte vocabulary.
MQAR_KEYS = range(128, 256)
MQAR_VALUES = range(1, 128)
MQAR_PAD = 0


class MQARTask:
    """Multi-query associative recall (Zoology): key-value pairs, then each key queried once.

    Layout of a sample of seq_len + 1 tokens: `k1 v1 k2 v2 ... kn vn`, then the rest is split into
    two-token slots of which n, drawn uniformly, hold a query `k v` (every key once, in random order)
    and the others `0 0`. The loss is on the query values only: the target at a query key is its value.
    Keys are distinct (drawn without replacement from MQAR_KEYS); values are drawn with replacement
    from MQAR_VALUES. Zoology draws the query gaps from a power law; here they are uniform.
    """

    name = "mqar"

    def __init__(self, seq_len: int, n_pairs: int = 8, seed: int = 0):
        _check_int("n_pairs", n_pairs, 1)
        if n_pairs > len(MQAR_KEYS):
            raise ValueError(f"n_pairs must be <= {len(MQAR_KEYS)} (the number of distinct keys), "
                             f"got {n_pairs}")
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        # The pairs take 2n tokens and the queries at least n slots of 2 in the remaining seq_len + 1 - 2n.
        if seq_len < 4 * n_pairs - 1:
            raise ValueError(f"seq_len {seq_len} is too short for {n_pairs} pairs: MQAR needs seq_len >= "
                             f"4 * n_pairs - 1 = {4 * n_pairs - 1}")
        self.seq_len, self.n_pairs, self.seed = seq_len, n_pairs, seed
        self.n_slots = (seq_len + 1 - 2 * n_pairs) // 2

    def batch(self, batch_size: int, step: int) -> Batch:
        _check_int("batch_size", batch_size, 1)
        _check_int("step", step, 0)
        b, n = batch_size, self.n_pairs
        g = _generator(self.name, self.seed, step)
        keys = torch.rand(b, len(MQAR_KEYS), generator=g).argsort(dim=1)[:, :n] + MQAR_KEYS.start  # [b, n]
        values = torch.randint(MQAR_VALUES.start, MQAR_VALUES.stop, (b, n), generator=g)  # [b, n]
        slots = torch.rand(b, self.n_slots, generator=g).argsort(dim=1)[:, :n]  # [b, n]
        query = 2 * n + 2 * slots  # [b, n] position of each query key in the sample
        sample = torch.full((b, self.seq_len + 1), MQAR_PAD, dtype=torch.long)
        sample[:, 0:2 * n:2] = keys
        sample[:, 1:2 * n:2] = values
        sample.scatter_(1, query, keys)
        sample.scatter_(1, query + 1, values)
        targets = torch.full((b, self.seq_len), IGNORE, dtype=torch.long)
        targets.scatter_(1, query, values)
        return Batch(sample[:, :-1].contiguous(), targets)


TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# The default corpus (the stdlib's .py files) is read up to this many bytes, a few tenths of a second.
DEFAULT_MAX_BYTES = 20_000_000
# Folders never read: installed packages differ between machines, caches and VCS data are not text.
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def _text_files(root: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under `root` ending in a suffix, sorted."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_FOLDERS]
        for name in names:
            if name.endswith(suffixes):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _path_hash(relative: str) -> bytes:
    return hashlib.blake2b(relative.encode(), digest_size=8).digest()


class TextCorpus:
    """Random windows of seq_len + 1 bytes from the text files under `folder`; loss on every token.

    The files (sorted relative paths; `folder=None`: the `.py` files of the Python standard library)
    are read as UTF-8 with errors replaced, at most `max_bytes` in all (None: no cap; the file that
    crosses the cap is cut). Validation files: in the order of a hash of their relative path, each
    file that still fits within val_fraction of the bytes (at least one file when val_fraction > 0),
    so the split depends on the paths only, not on the seed. Each part is its files joined by "\\n".
    """

    name = "text"

    def __init__(self, folder: str | Path | None = None, *, seq_len: int, seed: int = 0,
                 val_fraction: float = 0.05, suffixes: tuple[str, ...] | None = None,
                 max_bytes: int | None = DEFAULT_MAX_BYTES):
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        if not (is_finite_number(val_fraction) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if max_bytes is not None:
            _check_int("max_bytes", max_bytes, 1)
        if suffixes is None:
            suffixes = (".py",) if folder is None else TEXT_SUFFIXES
        suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise ValueError(f"suffixes must be non-empty strings such as '.txt', got {suffixes!r}")
        root = Path(sysconfig.get_paths()["stdlib"] if folder is None else folder)
        if not root.is_dir():
            raise ValueError(f"folder {str(root)!r} is not a directory")
        self.folder, self.seq_len, self.seed, self.val_fraction = root, seq_len, seed, val_fraction

        texts = self._read(root, _text_files(root, suffixes), max_bytes)
        if not texts:
            raise ValueError(f"folder {str(root)!r} has no non-empty files ending in {'/'.join(suffixes)}")
        total = sum(len(t) for t in texts.values())
        if total < seq_len + 1:
            raise ValueError(f"folder {str(root)!r} holds {total} bytes of {'/'.join(suffixes)} text, fewer "
                             f"than seq_len + 1 = {seq_len + 1}")
        val = self._pick_validation(texts, val_fraction * total) if val_fraction > 0 else set()
        self.train_files = [p for p in texts if p not in val]
        self.val_files = [p for p in texts if p in val]
        self.train_tokens = self._join(texts, self.train_files)  # [n_train] uint8
        self.val_tokens = self._join(texts, self.val_files)  # [n_val] uint8
        if len(self.train_tokens) < seq_len + 1:
            raise ValueError(f"the training part of folder {str(root)!r} has {len(self.train_tokens)} bytes, "
                             f"fewer than seq_len + 1 = {seq_len + 1}; lower val_fraction or add files")
        if val_fraction > 0 and len(self.val_tokens) < seq_len + 1:
            raise ValueError(f"the validation part of folder {str(root)!r} has {len(self.val_tokens)} bytes "
                             f"({len(self.val_files)} files), fewer than seq_len + 1 = {seq_len + 1}; raise "
                             f"val_fraction, add files, or pass val_fraction=0 for no validation")

    @staticmethod
    def _read(root: Path, paths: list[str], max_bytes: int | None) -> dict[str, bytes]:
        texts, budget = {}, math.inf if max_bytes is None else max_bytes
        for relative in paths:
            if budget <= 0:
                break
            # Decode and re-encode so that invalid UTF-8 becomes U+FFFD, as decode() shows it.
            data = (root / relative).read_bytes().decode("utf-8", errors="replace").encode("utf-8")
            data = data[:budget] if budget < len(data) else data
            if data:
                texts[relative] = data
                budget -= len(data)
        return texts

    @staticmethod
    def _pick_validation(texts: dict[str, bytes], target: float) -> set[str]:
        chosen, size = set(), 0
        for relative in sorted(texts, key=_path_hash):
            if size + len(texts[relative]) <= target:
                chosen.add(relative)
                size += len(texts[relative])
        if not chosen and len(texts) > 1:
            chosen.add(min(texts, key=lambda p: (len(texts[p]), _path_hash(p))))
        if len(chosen) == len(texts):  # keep at least one file for training
            chosen.discard(max(chosen, key=_path_hash))
        return chosen

    @staticmethod
    def _join(texts: dict[str, bytes], paths: list[str]) -> torch.Tensor:
        joined = b"\n".join(texts[p] for p in paths)
        if not joined:  # frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(joined), dtype=torch.uint8)

    def _tokens(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split == "val" and len(self.val_tokens) == 0:
            raise ValueError("this corpus has no validation part (val_fraction=0)")
        return self.train_tokens if split == "train" else self.val_tokens

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # [b, s+1]
        rows = tokens[idx].long()  # [b, s+1]
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())

    def batch(self, batch_size: int, step: int, split: str = "train") -> Batch:
        """Windows at uniform random starts, drawn from (seed, step, split)."""
        _check_int("batch_size", batch_size, 1)
        _check_int("step", step, 0)
        tokens = self._tokens(split)
        g = _generator(self.name, self.seed, step, split)
        starts = torch.randint(0, len(tokens) - self.seq_len, (batch_size,), generator=g)  # [b]
        return self._windows(tokens, starts)

    def val_batches(self, batch_size: int, n: int) -> list[Batch]:
        """n batches of windows spread evenly over the validation part, the same for every seed."""
        _check_int("batch_size", batch_size, 1)
        _check_int("n", n, 1)
        tokens = self._tokens("val")
        last = len(tokens) - self.seq_len - 1
        starts = torch.linspace(0, last, batch_size * n, dtype=torch.float64).round().long()  # [n*b]
        return [self._windows(tokens, chunk) for chunk in starts.view(n, batch_size)]


def make_task(name: str, seq_len: int, seed: int = 0, **options):
    """The task called `name` (one of TASKS); `options` go to its constructor."""
    match name:
        case "passkey":
            return PasskeyTask(seq_len, seed=seed, **options)
        case "mqar":
            return MQARTask(seq_len, seed=seed, **options)
        case "text":
            return TextCorpus(seq_len=seq_len, seed=seed, **options)
    raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")

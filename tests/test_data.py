"""The data module: exact prompt formats and lengths, loss masks, determinism per (seed, step), errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_attention.data import (
    DEFAULT_MAX_BYTES,
    FILLER_SENTENCES,
    IGNORE,
    MQAR_KEYS,
    MQAR_PAD,
    MQAR_VALUES,
    QUESTION,
    TASKS,
    VOCAB_SIZE,
    Batch,
    MQARTask,
    PasskeyTask,
    TextCorpus,
    answer_ids,
    decode,
    encode,
    key_sentence,
    make_task,
    min_passkey_length,
    needle_grid,
    passkey_prompt,
)

LONGEST_SENTENCE = max(len(s) + 1 for s in FILLER_SENTENCES)
KEY_PREFIX = "The pass key is "


def assert_same(a: Batch, b: Batch) -> None:
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def assert_shifted(batch: Batch) -> None:
    """Every target that is not IGNORE is the next input token."""
    keep = batch.targets[:, :-1] != IGNORE
    assert torch.equal(batch.inputs[:, 1:][keep], batch.targets[:, :-1][keep])


def test_encode_decode_bytes():
    text = "héllo, wörld: ∑ 🙂"
    ids = encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(ids) == text
    assert decode(torch.tensor(ids)) == text
    assert decode([0xFF, ord("a")]) == "\ufffda"


@pytest.mark.parametrize("bad", [256, -1, 3.0, "a"])
def test_decode_rejects_non_bytes(bad):
    with pytest.raises(ValueError, match=f"token id {bad!r}"):
        decode([65, bad])


def test_passkey_prompt_format():
    p = passkey_prompt(400, 0.5, "71432")
    text = decode(p.prompt)
    assert len(p.prompt) == 400
    assert ". The pass key is 71432. Remember it. 71432 is the pass key. " in text
    assert text.endswith(" What is the pass key? The pass key is")
    assert decode(p.answer) == " 71432" and p.answer == answer_ids("71432")
    assert decode(p.prompt[p.needle[0]:p.needle[1]]) == "71432"
    assert text.startswith("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                           "There and back again. The grass is green.")
    assert (decode(p.prompt + p.answer)).endswith("The pass key is 71432")
    assert p.key == "71432"


def test_passkey_prompt_at_the_ends():
    start = decode(passkey_prompt(300, 0.0, "123").prompt)
    assert start.startswith(key_sentence("123") + " The grass is green.")
    assert passkey_prompt(300, 0.0, "123").depth == 0.0
    end = passkey_prompt(300, 1.0, "123")
    text = decode(end.prompt)
    after = text[text.index(key_sentence("123")) + len(key_sentence("123")):-len(QUESTION)]
    assert len(after) < LONGEST_SENTENCE
    assert end.depth > 0.85
    # No room for filler: the key sentence and the question, nothing else.
    shortest = passkey_prompt(min_passkey_length(5), 0.7, "00000")
    assert decode(shortest.prompt) == key_sentence("00000") + QUESTION and shortest.depth == 0.0


@settings(max_examples=60, deadline=None)
@given(key=st.text(alphabet="0123456789", min_size=1, max_size=12), extra=st.integers(0, 3000),
       depth=st.floats(0.0, 1.0))
def test_passkey_prompt_properties(key, extra, depth):
    length = min_passkey_length(len(key)) + extra
    p = passkey_prompt(length, depth, key)
    text = decode(p.prompt)
    assert len(p.prompt) == length and text.endswith(QUESTION)
    assert decode(p.prompt[p.needle[0]:p.needle[1]]) == key
    assert text.find(key) == p.needle[0]
    before = p.needle[0] - len(KEY_PREFIX)
    assert text[before:].startswith(key_sentence(key))
    # The filler before the key ends with a whole sentence.
    assert before == 0 or text[:before].endswith(". ")
    filler = length - min_passkey_length(len(key))
    assert abs(before - depth * filler) <= LONGEST_SENTENCE
    assert p.depth == (before / filler if filler else 0.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"length": 95, "depth": 0.5, "key": "71432"}, "at least 96"),
    ({"length": 0, "depth": 0.5, "key": "71432"}, "length"),
    ({"length": 200, "depth": -0.1, "key": "71432"}, "depth"),
    ({"length": 200, "depth": 1.5, "key": "71432"}, "depth"),
    ({"length": 200, "depth": math.nan, "key": "71432"}, "depth"),
    ({"length": 200, "depth": 0.5, "key": "12a4"}, "key"),
    ({"length": 200, "depth": 0.5, "key": ""}, "key"),
    ({"length": 200, "depth": 0.5, "key": 71432}, "key"),
    ({"length": 200, "depth": 0.5, "key": "\u0661\u0662"}, "key"),  # Arabic-Indic digits
])
def test_passkey_prompt_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_prompt(**kwargs)


def test_passkey_task_batch():
    task = PasskeyTask(300, digits=5, seed=3)
    batch = task.batch(4, step=7)
    assert batch.inputs.shape == batch.targets.shape == (4, 300)
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    assert_shifted(batch)
    assert (batch.targets[:, :-6] == IGNORE).all() and (batch.targets[:, -6:] != IGNORE).all()
    for i in range(4):
        sample = task.sample(7, i)
        assert len(sample.prompt) + len(sample.answer) == 301
        assert batch.inputs[i].tolist() == (sample.prompt + sample.answer)[:-1]
        assert decode(batch.targets[i, -6:]) == " " + sample.key
        assert len(sample.key) == 5 and sample.key.isdigit()


def test_passkey_task_determinism():
    task = PasskeyTask(200, seed=1)
    assert_same(task.batch(4, 5), PasskeyTask(200, seed=1).batch(4, 5))
    assert_same(task.batch(2, 5), Batch(task.batch(4, 5).inputs[:2], task.batch(4, 5).targets[:2]))
    assert not torch.equal(task.batch(4, 5).inputs, task.batch(4, 6).inputs)
    assert not torch.equal(task.batch(4, 5).inputs, PasskeyTask(200, seed=2).batch(4, 5).inputs)


def test_passkey_task_depth_range():
    task = PasskeyTask(1000, digits=3, depth=(0.5, 0.5))
    for i in range(4):
        sample = task.sample(0, i)
        assert abs(sample.depth - 0.5) * (len(sample.prompt) - min_passkey_length(3)) <= LONGEST_SENTENCE
    depths = [PasskeyTask(1000, depth=(0.0, 0.25)).sample(0, i).depth for i in range(8)]
    assert all(d < 0.25 + 0.05 for d in depths)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 100}, "seq_len >= 101"),
    ({"seq_len": 200, "digits": 0}, "digits"),
    ({"seq_len": 200, "seed": -1}, "seed"),
    ({"seq_len": 200, "depth": (0.6, 0.4)}, "low <= high"),
    ({"seq_len": 200, "depth": (0.0, 1.2)}, r"depth\[1\]"),
    ({"seq_len": 200, "depth": 0.5}, "pair"),
])
def test_passkey_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PasskeyTask(**kwargs)


@pytest.mark.parametrize("batch_size, step, match", [(0, 0, "batch_size"), (2, -1, "step"), (2, 1.0, "step"),
                                                     (True, 0, "batch_size")])
def test_batch_argument_errors(batch_size, step, match):
    for task in (PasskeyTask(200), MQARTask(64)):
        with pytest.raises(ValueError, match=match):
            task.batch(batch_size, step)


@settings(max_examples=30, deadline=None)
@given(n_pairs=st.integers(1, 16), extra=st.integers(0, 200), step=st.integers(0, 10 ** 6))
def test_mqar_values_match_queried_keys(n_pairs, extra, step):
    task = MQARTask(4 * n_pairs - 1 + extra, n_pairs=n_pairs, seed=5)
    batch = task.batch(3, step)
    assert batch.inputs.shape == batch.targets.shape == (3, task.seq_len)
    assert_shifted(batch)
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        context = inputs[:2 * n_pairs]
        pairs = dict(zip(context[0::2], context[1::2], strict=True))
        assert len(pairs) == n_pairs  # distinct keys
        assert all(k in MQAR_KEYS for k in pairs) and all(v in MQAR_VALUES for v in pairs.values())
        queries = [j for j, t in enumerate(targets) if t != IGNORE]
        assert all(j >= 2 * n_pairs for j in queries)
        assert sorted(inputs[j] for j in queries) == sorted(pairs)  # each key queried once
        assert all(targets[j] == pairs[inputs[j]] for j in queries)
        rest = set(range(2 * n_pairs, task.seq_len)) - set(queries) - {j + 1 for j in queries}
        assert all(inputs[j] == MQAR_PAD for j in rest)


def test_mqar_determinism():
    task = MQARTask(256, n_pairs=16, seed=2)
    assert_same(task.batch(4, 9), MQARTask(256, n_pairs=16, seed=2).batch(4, 9))
    assert not torch.equal(task.batch(4, 9).inputs, task.batch(4, 10).inputs)
    assert not torch.equal(task.batch(4, 9).inputs, MQARTask(256, n_pairs=16, seed=3).batch(4, 9).inputs)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 30, "n_pairs": 8}, "seq_len >= 4 \\* n_pairs - 1 = 31"),
    ({"seq_len": 64, "n_pairs": 0}, "n_pairs"),
    ({"seq_len": 1024, "n_pairs": 129}, "n_pairs must be <= 128"),
    ({"seq_len": 0}, "seq_len"),
])
def test_mqar_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARTask(**kwargs)


def test_needle_grid():
    cases = needle_grid([128, 256], [0.0, 0.5, 1.0], seed=4, per_cell=2)
    assert [(c.length, c.depth, c.repeat) for c in cases] == [
        (n, d, r) for n in (128, 256) for d in (0.0, 0.5, 1.0) for r in range(2)]
    for case in cases:
        assert len(case.prompt.prompt) == case.length and case.prompt.key == case.key
        assert decode(case.prompt.answer) == " " + case.key and len(case.key) == 5
    keys = [c.key for c in cases]
    assert keys == [c.key for c in needle_grid([128, 256], [0.0, 0.5, 1.0], seed=4, per_cell=2)]
    assert keys != [c.key for c in needle_grid([128, 256], [0.0, 0.5, 1.0], seed=5, per_cell=2)]
    # A cell's key does not depend on the rest of the grid.
    assert [c.key for c in needle_grid([256], [0.5], seed=4, per_cell=2)] == keys[8:10]


@pytest.mark.parametrize("args, match", [
    (([], [0.5]), "non-empty"),
    (([128], []), "non-empty"),
    (([50], [0.5]), "lengths must be ints >= 96"),
    (([128], [1.5]), "depths"),
])
def test_needle_grid_errors(args, match):
    with pytest.raises(ValueError, match=match):
        needle_grid(*args)


def write_corpus(root, n_files=20, lines=67):
    """Files whose every line names the file, so a window shows which files it came from."""
    for i in range(n_files):
        folder = root / ("sub" if i % 3 else "")
        folder.mkdir(exist_ok=True)
        (folder / f"f{i:02d}.txt").write_text(f"<f{i:02d}>\n" * lines)  # 6 bytes a line
    (root / "skipped.bin").write_bytes(b"<bin>" * 100)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.txt").write_text("<pycache>" * 100)


def file_markers(batch: Batch) -> set[str]:
    text = "".join(decode(row) for row in batch.inputs)
    return {text[i:i + 5] for i in range(len(text) - 4) if text[i] == "<" and text[i + 4] == ">"}


def test_text_corpus_split_and_windows(tmp_path):
    write_corpus(tmp_path)
    corpus = TextCorpus(tmp_path, seq_len=32, seed=1, val_fraction=0.2)
    names = {f"f{i:02d}.txt" if i % 3 == 0 else f"sub/f{i:02d}.txt" for i in range(20)}
    assert set(corpus.train_files) | set(corpus.val_files) == names
    assert not set(corpus.train_files) & set(corpus.val_files) and corpus.val_files
    assert corpus.train_files == sorted(corpus.train_files)
    assert len(corpus.val_files) == 4  # 20 files of 402 bytes, 20% of the bytes
    assert len(corpus.train_tokens) == 16 * 402 + 15  # joined by "\n"
    marker = lambda path: "<" + path.split("/")[-1][:3] + ">"
    train_markers = {marker(p) for p in corpus.train_files}
    val_markers = {marker(p) for p in corpus.val_files}

    batch = corpus.batch(8, step=3)
    assert batch.inputs.shape == batch.targets.shape == (8, 32)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1]) and (batch.targets != IGNORE).all()
    assert file_markers(corpus.batch(64, 0)) <= train_markers
    assert file_markers(corpus.batch(64, 0, split="val")) <= val_markers
    val = corpus.val_batches(4, 3)
    assert len(val) == 3 and all(b.inputs.shape == (4, 32) for b in val)
    assert file_markers(Batch(torch.cat([b.inputs for b in val]), torch.cat([b.targets for b in val]))) == (
        val_markers)  # evenly spread windows see every validation file

    same = TextCorpus(tmp_path, seq_len=32, seed=1, val_fraction=0.2)
    assert_same(batch, same.batch(8, step=3))
    assert_same(corpus.batch(8, 3, "val"), same.batch(8, 3, "val"))
    assert not torch.equal(batch.inputs, corpus.batch(8, step=4).inputs)
    assert not torch.equal(corpus.batch(8, 3, "val").inputs, corpus.batch(8, 3, "train").inputs)
    other_seed = TextCorpus(tmp_path, seq_len=32, seed=2, val_fraction=0.2)
    assert other_seed.val_files == corpus.val_files  # the split depends on the paths only
    assert not torch.equal(batch.inputs, other_seed.batch(8, step=3).inputs)
    for a, b in zip(val, other_seed.val_batches(4, 3), strict=True):
        assert_same(a, b)


def test_text_corpus_reading(tmp_path):
    (tmp_path / "a.md").write_text("# title\n" * 10)
    (tmp_path / "b.txt").write_bytes(b"bad \xff byte " * 10)
    (tmp_path / "c.py").write_text("x = 1\n" * 10)
    (tmp_path / "empty.txt").write_text("")
    corpus = TextCorpus(tmp_path, seq_len=16, val_fraction=0.0)
    assert corpus.train_files == ["a.md", "b.txt", "c.py"] and corpus.val_files == []
    text = decode(corpus.train_tokens)
    assert text == "# title\n" * 10 + "\n" + "bad \ufffd byte " * 10 + "\n" + "x = 1\n" * 10
    assert TextCorpus(tmp_path, seq_len=16, val_fraction=0.0, suffixes=(".py",)).train_files == ["c.py"]
    capped = TextCorpus(tmp_path, seq_len=16, val_fraction=0.0, max_bytes=100)
    assert capped.train_files == ["a.md", "b.txt"] and len(capped.train_tokens) == 100 + 1
    with pytest.raises(ValueError, match="no validation part"):
        corpus.batch(2, 0, split="val")
    with pytest.raises(ValueError, match="split must be"):
        corpus.batch(2, 0, split="test")


def test_text_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        TextCorpus(tmp_path / "missing", seq_len=16)
    with pytest.raises(ValueError, match=f"folder '{tmp_path}' has no non-empty files"):
        TextCorpus(tmp_path, seq_len=16)
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(ValueError, match=f"folder '{tmp_path}' holds 5 bytes"):
        TextCorpus(tmp_path, seq_len=16, val_fraction=0.0)
    (tmp_path / "b.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match="validation part"):
        TextCorpus(tmp_path, seq_len=16, val_fraction=0.05)
    for kwargs, match in [({"val_fraction": 1.0}, "val_fraction"), ({"seq_len": 0}, "seq_len"),
                          ({"max_bytes": 0}, "max_bytes"), ({"suffixes": ("",)}, "suffixes")]:
        with pytest.raises(ValueError, match=match):
            TextCorpus(tmp_path, **{"seq_len": 16, "val_fraction": 0.0, **kwargs})


def test_text_corpus_stdlib_default():
    corpus = make_task("text", 128, seed=0)
    assert corpus.name == "text" and corpus.train_files and corpus.val_files
    assert all(p.endswith(".py") and "site-packages" not in p for p in corpus.train_files + corpus.val_files)
    separators = len(corpus.train_files) - 1 + len(corpus.val_files) - 1  # the "\n" between files
    assert len(corpus.train_tokens) + len(corpus.val_tokens) - separators <= DEFAULT_MAX_BYTES
    assert 0.03 < len(corpus.val_tokens) / (len(corpus.train_tokens) + len(corpus.val_tokens)) < 0.07
    assert corpus.batch(2, 0).inputs.shape == (2, 128)
    assert corpus.val_batches(2, 1)[0].inputs.shape == (2, 128)


def test_make_task():
    assert TASKS == ("passkey", "mqar", "text")
    passkey = make_task("passkey", 200, seed=3, digits=4)
    assert isinstance(passkey, PasskeyTask) and passkey.name == "passkey" and passkey.digits == 4
    assert_same(passkey.batch(2, 1), PasskeyTask(200, digits=4, seed=3).batch(2, 1))
    mqar = make_task("mqar", 128, n_pairs=4)
    assert isinstance(mqar, MQARTask) and mqar.name == "mqar" and mqar.n_pairs == 4
    with pytest.raises(ValueError, match="passkey, mqar, text"):
        make_task("copy", 128)


def test_batch_to():
    batch = MQARTask(64).batch(2, 0).to("cpu")
    assert batch.inputs.device.type == "cpu" and batch.targets.shape == (2, 64)

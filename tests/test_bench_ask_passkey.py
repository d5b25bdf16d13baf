"""benchmarks/ask_passkey.py: prompts in the published format, a checkpoint answering through the
Engine, and clear errors. (That a trained model answers them: tests/test_train.py's passkey test
asks its checkpoint the same way; the --quick model's answers are in benchmarks/RESULTS.md.)"""

import json
import sys
from pathlib import Path

import pytest

from hybrid_attention.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ask_passkey  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("length", [96, 97, 257, 1024])
def test_prompts_follow_the_format(length, depth):
    question = " What is the pass key? The pass key is"
    needle = "The pass key is 71432. Remember it. 71432 is the pass key."
    text = ask_passkey.format_prompt("71432", length, depth)
    assert len(text) == length and text.endswith(question) and text.count(needle) == 1
    before, after = text[:-len(question)].split(needle)
    # The filler around the key sentence is the cycle of five sentences, cut only at the end.
    assert before == "" or before.endswith(". ")
    assert after == "" or after.startswith(" ")
    assert ((FILLER + " ") * 60).startswith(before + after[1:])
    # The key sentence starts at the last sentence boundary within depth of the filler's room.
    room = length - len(needle) - len(question)
    assert len(before) <= depth * room < len(before) + len("There and back again. ") or len(after) == 0


def test_a_prompt_too_short_for_the_key_is_refused():
    assert len(ask_passkey.format_prompt("71432", 96, 0.5)) == 96  # the key sentence and the question
    with pytest.raises(ValueError, match="at least 96 characters"):
        ask_passkey.format_prompt("71432", 95, 0.5)


def test_a_checkpoint_answers_through_the_engine(tmp_path, capsys):
    cfg = TrainConfig(model="tiny", schedule="hybrid", seq_len=96, sparse_steps=2, batch_size=2,
                      task_options={"digits": 2}, out=str(tmp_path / "run"), log_every=1)
    train(cfg, progress=False)
    assert ask_passkey.main([str(tmp_path / "run"), "--keys", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["accuracy"]) == {"96", "192"}  # 1x and 2x the training length, from train.json
    assert len(result["prompts"]) == 6
    for asked in result["prompts"]:
        assert len(asked["key"]) == 2 and len(asked["answer"]) == 3  # a space and the key's digits
        assert asked["right"] == (asked["answer"] == " " + asked["key"])
    assert ask_passkey.main([str(tmp_path / "run"), "--lengths", "96", "--keys", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("accuracy: 96: ")


def test_errors_are_messages(tmp_path, capsys):
    assert ask_passkey.main([str(tmp_path)]) == 2  # no train.json: no default lengths
    assert "give --lengths" in capsys.readouterr().err
    assert ask_passkey.main([str(tmp_path), "--lengths", "200"]) == 2  # not a checkpoint folder
    assert "not a checkpoint folder" in capsys.readouterr().err

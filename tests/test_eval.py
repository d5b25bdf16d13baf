"""`evaluate` and `hybrid-attention eval`: the bookkeeping against an oracle, the needle entries
against the compressor, teacher-forced exact match against greedy decoding, and the command line.

A trained model's accuracy through both `evaluate` and `Engine.generate` is tested where the model
is trained (tests/test_train.py, the passkey learning test)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hybrid_attention.cli import main
from hybrid_attention.compressor import Compressor
from hybrid_attention.config import AttentionConfig, ModelConfig
from hybrid_attention.data import VOCAB_SIZE, answer_ids, needle_grid
from hybrid_attention.engine import Engine
from hybrid_attention.eval import _needle_entries, evaluate, format_table, plot_needle_grid
from hybrid_attention.model import HybridTransformer
from hybrid_attention.rope import rope_frequencies
from hybrid_attention.train import TrainConfig, train


def _model(schedule=(128, 4), seed=0, **changes) -> HybridTransformer:
    torch.manual_seed(seed)
    attention = AttentionConfig.preset("tiny", compress_ratios=list(schedule), **changes)
    return HybridTransformer(ModelConfig.preset("tiny", attention=attention, vocab_size=VOCAB_SIZE)).eval()


class Oracle(HybridTransformer):
    """Reads the key out of the prompt and predicts the answer; wrong on purpose for keys below
    `wrong_below`. Its one CSA layer "picks" the needle's first entry at even positions only."""

    def __init__(self, wrong_below: int = 0, ratios=(128, 4)):
        attention = AttentionConfig.preset("tiny", compress_ratios=list(ratios))
        super().__init__(ModelConfig.preset("tiny", attention=attention, vocab_size=VOCAB_SIZE))
        self.wrong_below = wrong_below

    def forward(self, tokens, states=None, return_aux=False, dense_csa=False):
        b, s = tokens.shape
        logits = torch.zeros(b, s, VOCAB_SIZE)
        picks = torch.full((b, s, 2), -1, dtype=torch.long)
        for i, row in enumerate(tokens.tolist()):
            text = bytes(row).decode()
            key = re.search(r"The pass key is (\d+)\. Remember", text).group(1)
            start = text.index(key)
            answer = answer_ids(key if int(key) >= self.wrong_below else "9" * len(key))
            end = text.rindex("The pass key is") + len("The pass key is")  # the question's end
            for j, token in enumerate(answer):
                if end - 1 + j < s:
                    logits[i, end - 1 + j, token] = 1.0
            picks[i, ::2, 0] = start // 4  # the entry holding the key's first digit
        aux = {"indexer_loss": torch.zeros(()), "picks": {1: picks}}
        return (logits, aux) if return_aux else logits


def test_accuracy_and_recall_bookkeeping_against_an_oracle():
    lengths, depths = [120, 200], [0.0, 0.5, 1.0]
    result = evaluate(Oracle(), lengths, depths, per_cell=3, digits=2, batch_size=4, details=True)
    assert result["accuracy"] == {120: 1.0, 200: 1.0}
    assert all(v == 1.0 for by in result["by_depth"].values() for v in by.values())
    assert result["digit_accuracy"] == {120: 1.0, 200: 1.0}
    # 2 digits predicted at positions n and n + 1: one even, one odd -> exactly half picked it.
    assert result["indexer_recall"] == 0.5
    assert [c["right"] for c in result["cases"]] == [True] * 18

    # Keys below 50 answered "99": exactly those cases are wrong, counted in their own cells.
    result = evaluate(Oracle(wrong_below=50), lengths, depths, per_cell=3, digits=2, details=True)
    cases = needle_grid(lengths, depths, seed=0, per_cell=3, digits=2)
    expected = [int(c.key) >= 50 for c in cases]
    assert [c["right"] for c in result["cases"]] == expected
    for n in lengths:
        for d in depths:
            cell = [e for c, e in zip(cases, expected, strict=True) if c.length == n and c.depth == d]
            assert result["by_depth"][n][d] == sum(cell) / 3
        assert result["accuracy"][n] == pytest.approx(sum(e for c, e in zip(cases, expected, strict=True)
                                                          if c.length == n) / 9)
    assert "indexer recall: 0.500" in format_table(result)


class TwoLayerOracle(Oracle):
    """Two CSA layers: layer 1 picks the entry of the key's second statement ("... 71432 is the
    pass key."), at every position; layer 3 picks entry 0 of the filler only."""

    def __init__(self):
        super().__init__(ratios=(128, 4, 128, 4))

    def forward(self, tokens, states=None, return_aux=False, dense_csa=False):
        logits, aux = super().forward(tokens, return_aux=True)
        b, s = tokens.shape
        second = torch.full((b, s, 2), -1, dtype=torch.long)
        for i, row in enumerate(tokens.tolist()):
            text = bytes(row).decode()
            key = re.search(r"The pass key is (\d+)\. Remember", text).group(1)
            second[i, :, 0] = text.index(f"{key} is the pass key") // 4 + 1  # pools its first digit
        filler = torch.zeros((b, s, 2), dtype=torch.long)
        aux["picks"] = {1: second, 3: filler}
        return (logits, aux) if return_aux else logits


def test_recall_counts_either_statement_of_the_key_and_reports_the_retrieving_layer():
    cases = needle_grid([200], [0.0, 0.5, 1.0], seed=0, per_cell=2, digits=2)
    for c in cases:  # the spans are the key's two statements
        text = bytes(c.prompt.prompt).decode()
        assert [text[a:b] for a, b in c.prompt.key_spans] == [c.key, c.key]
        assert c.prompt.key_spans[0] == c.prompt.needle
    result = evaluate(TwoLayerOracle(), [200], [0.0, 0.5, 1.0], per_cell=2, digits=2)
    assert result["indexer_recall_by_layer"] == {1: 1.0, 3: 0.0}
    assert result["indexer_recall"] == 1.0 and result["indexer_recall_by_length"] == {200: 1.0}
    table = format_table(result)
    assert "indexer recall: 1.000 (the best CSA layer; layer 1: 1.000, layer 3: 0.000)" in table


@pytest.mark.parametrize("token", [0, 5, 13, 30, 31])
def test_needle_entries_are_the_entries_that_pool_the_token(token):
    # Perturb one token: the entries whose value changes are the ones that pool it.
    torch.manual_seed(0)
    comp = Compressor(16, 68, 4, True, 4, norm_eps=1e-6, rotate=False)
    freqs = rope_frequencies(4, 160000.0)
    x = torch.randn(1, 32, 16)
    y = x.clone()
    y[0, token] += 1.0
    with torch.no_grad():
        a, _ = comp(x, 0, comp.new_state(1), freqs, "none")
        b, _ = comp(y, 0, comp.new_state(1), freqs, "none")
    changed = ((a - b).abs().amax(-1)[0] > 0).nonzero().flatten()
    expected = _needle_entries((token, token + 1), 4)
    assert changed.tolist() == [e for e in expected.tolist() if e < a.size(1)]


def test_teacher_forced_argmax_is_the_greedy_decode():
    # The principle evaluate relies on: greedy tokens g from the Engine are the teacher-forced
    # argmax of prompt + g[:-1] at the answer positions, for every prompt.
    model = _model()
    cases = needle_grid([120, 150], [0.0, 0.7], seed=3, digits=3)
    engine = Engine(model, cache_bytes=8 << 20, max_batch=4)
    greedy = engine.generate([c.prompt.prompt for c in cases], max_new_tokens=4)
    for case, result in zip(cases, greedy, strict=True):
        g, n = list(result.tokens), case.length
        with torch.no_grad():
            logits = model(torch.tensor([case.prompt.prompt + g[:-1]]))
        assert logits[0, n - 1:].argmax(-1).tolist() == g


def test_recall_is_one_when_top_k_covers_every_entry():
    # index_topk above the number of entries: the CSA layer picks every entry, the needle's among them.
    result = evaluate(_model(index_topk=64), [120], [0.0, 1.0], per_cell=2, digits=2)
    assert result["indexer_recall"] == 1.0
    assert evaluate(_model(schedule=(128, 0)), [120], [0.5], per_cell=1, digits=2)["indexer_recall"] is None


def test_evaluate_refuses_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate(model, [5000], digits=2)
    with pytest.raises(ValueError, match="depths"):
        evaluate(model, [120], [1.5], digits=2)
    with pytest.raises(ValueError, match="lengths"):
        evaluate(model, [10], digits=2)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, [120], batch_size=0, digits=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = TrainConfig(model="tiny", schedule="hca,csa", seq_len=100, sparse_steps=2, batch_size=2,
                      task_options={"digits": 2}, out=str(out), log_every=1)
    train(cfg, progress=False)
    return out


def test_cli_eval_json_table_and_heatmap(checkpoint, capsys, tmp_path):
    plot = tmp_path / "grid.png"
    args = ["eval", str(checkpoint), "--lengths", "100,300", "--depths", "0,1", "--per-cell", "2",
            "--text-batches", "1", "--plot", str(plot), "--no-progress"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["accuracy"]) == {"100", "300"} and set(result["by_depth"]["300"]) == {"0.0", "1.0"}
    assert 0.0 <= result["indexer_recall"] <= 1.0 and result["digits"] == 2  # from train.json
    assert result["perplexity"] > 1.0
    assert plot.stat().st_size > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| depth | 100 | 300 |" in out and "indexer recall:" in out and "perplexity" in out


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "a,b"], "--lengths must be comma-separated numbers"),
    (["--lengths", "20"], "needs at least"),
    (["--depths", "0,2"], "depths"),
    (["--plot", "/nonexistent/x.png"], "does not exist"),
    (["--text-batches", "-1"], "--text-batches"),
])
def test_cli_eval_user_errors(checkpoint, capsys, argv, message):
    assert main(["eval", str(checkpoint), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "hybrid-attention eval: error:" in err and message in err and "Traceback" not in err


def test_cli_eval_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--no-progress"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_generate_passkey_from_a_checkpoint(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--task", "passkey", "--prompt-len", "150",
                 "--key", "42", "--cache-gib", "0.01", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the pass key is 42" in out and re.search(r"answer: '.*' \((right|wrong)\)", out)
    assert main(["generate", "--checkpoint", str(checkpoint / "model.safetensors"), "--task", "passkey",
                 "--no-progress"]) == 2
    assert "takes a training folder" in capsys.readouterr().err


def test_plot_needle_grid_writes_a_png(tmp_path):
    result = evaluate(_model(), [120], [0.0, 1.0], per_cell=1, digits=2)
    assert plot_needle_grid(result, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"

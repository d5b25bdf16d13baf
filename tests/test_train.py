"""The trainer: resume bit for bit, phases train what they should, 2 gloo processes = 1 process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hybrid_attention import load_checkpoint
from hybrid_attention.cli import main
from hybrid_attention.config import AttentionConfig
from hybrid_attention.train import TrainConfig, indexer_parameter_names, schedule_ratios, train


def _cfg(tmp_path, name="run", **changes):
    values = dict(model="tiny", schedule="hybrid", seq_len=128, sparse_steps=6, batch_size=4,
                  out=str(tmp_path / name), log_every=1, warmup_steps=2)
    return TrainConfig(**{**values, **changes})


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_resume_is_bit_exact(tmp_path):
    phases = dict(dense_steps=2, indexer_steps=2, sparse_steps=3, grad_accum=2)
    whole = train(_cfg(tmp_path, "whole", **phases), progress=False)
    cfg = _cfg(tmp_path, "parts", **phases)
    first = train(cfg, progress=False, stop_after=3)  # stops inside the indexer phase
    assert first["step"] == 3
    rest = train(cfg, resume=True, progress=False)
    assert [r["loss"] for r in rest["losses"]] == [r["loss"] for r in whole["losses"]]
    assert [r["indexer_loss"] for r in rest["losses"]] == [r["indexer_loss"] for r in whole["losses"]]
    a, b = _params(whole["model"]), _params(rest["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint folder holds the model that load_checkpoint returns.
    loaded = load_checkpoint(tmp_path / "parts")
    assert all(torch.equal(p, b[k]) for k, p in _params(loaded).items())
    assert json.loads((tmp_path / "parts" / "train.json").read_text())["seq_len"] == 128
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(7))


def test_curriculum_lengths_and_resume_across_its_boundary(tmp_path):
    """Steps 0-2 at 100 tokens, 3 at 112, the rest at 128; stopped inside the curriculum and resumed,
    the same losses bit for bit; the metrics say which length each step trained at."""
    plan = dict(curriculum=[[3, 100], [1, 112]], sparse_steps=6, task_options={"digits": 2})
    cfg = _cfg(tmp_path, "whole", **plan)
    assert [cfg.seq_len_at(t) for t in range(6)] == [100, 100, 100, 112, 128, 128]
    assert cfg.tokens_before(5) == (3 * 100 + 112 + 128) * 4
    whole = train(cfg, progress=False)
    parts = _cfg(tmp_path, "parts", **plan)
    train(parts, progress=False, stop_after=2)
    rest = train(parts, resume=True, progress=False)
    assert [r["loss"] for r in rest["losses"]] == [r["loss"] for r in whole["losses"]]
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in lines] == [100, 100, 100, 112, 128, 128]
    assert lines[-1]["tokens"] == cfg.tokens_before(6)
    # A JSON round trip gives the same arguments, so resume accepts its own train.json.
    saved = json.loads((tmp_path / "parts" / "train.json").read_text())
    assert TrainConfig.from_dict(saved).to_dict() == parts.to_dict()


@pytest.mark.parametrize("curriculum", [[[0, 64]], [[3, 256]], [[3]], [3, 64], "3:64", [[2, True]]])
def test_curriculum_is_checked(tmp_path, curriculum):
    with pytest.raises(ValueError, match="curriculum"):
        _cfg(tmp_path, curriculum=curriculum)


def test_resume_refuses_other_arguments(tmp_path):
    train(_cfg(tmp_path, sparse_steps=2), progress=False)
    with pytest.raises(ValueError, match="different arguments"):
        train(_cfg(tmp_path, sparse_steps=2, lr=1e-4), resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_cfg(tmp_path, "empty"), resume=True, progress=False)


def test_phases_freeze_what_they_do_not_train(tmp_path):
    cfg = _cfg(tmp_path, dense_steps=3, indexer_steps=0, sparse_steps=0)
    start = _params(train(_cfg(tmp_path, "start"), progress=False, stop_after=0)["model"])  # same seed
    dense = _params(train(cfg, progress=False)["model"])
    indexer = indexer_parameter_names(load_checkpoint(tmp_path / "run"))
    assert indexer, "the hybrid schedule has CSA layers"
    assert all(torch.equal(start[k], dense[k]) for k in indexer)
    assert any(not torch.equal(start[k], dense[k]) for k in dense if k not in indexer)

    warm = _cfg(tmp_path, "warm", dense_steps=0, indexer_steps=3, sparse_steps=0)
    after = _params(train(warm, progress=False)["model"])
    assert all(torch.equal(start[k], after[k]) for k in after if k not in indexer)
    assert all(not torch.equal(start[k], after[k]) for k in indexer)


def test_indexer_loss_falls_in_its_warm_up(tmp_path):
    cfg = _cfg(tmp_path, dense_steps=0, indexer_steps=30, sparse_steps=0, indexer_lr=3e-3, log_every=10)
    losses = [r["indexer_loss"] for r in train(cfg, progress=False)["losses"]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_an_indexer_phase_without_csa_layers_trains_nothing(tmp_path):
    # A window-only model has no indexer: its warm-up steps run (and log) but change no weight.
    cfg = _cfg(tmp_path, schedule="window", dense_steps=1, indexer_steps=2, sparse_steps=1)
    train(cfg, progress=False, stop_after=1)
    after_dense = _params(load_checkpoint(tmp_path / "run"))
    run = train(cfg, resume=True, progress=False, stop_after=3)
    assert [r["phase"] for r in run["losses"]] == ["dense", "indexer", "indexer"]
    after_warm_up = _params(load_checkpoint(tmp_path / "run"))
    assert all(torch.equal(after_dense[k], after_warm_up[k]) for k in after_dense)


def test_schedules():
    cfg = AttentionConfig.preset("small")  # [128, 4, 128, 4, 0]
    assert schedule_ratios("v4", cfg) == [128, 4, 128, 4, 0]
    assert schedule_ratios("hybrid", cfg) == [128, 4, 128, 4, 128]
    assert schedule_ratios("window", cfg) == [0] * 5
    assert schedule_ratios("full", cfg) == ["full"] * 5
    assert schedule_ratios("hca,csa,full", cfg) == [128, 4, "full"]
    with pytest.raises(ValueError, match="schedule entry 'dense'"):
        schedule_ratios("hca,dense", cfg)


def test_cli_train_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--schedule", "hca,csa", "--seq-len", "100", "--digits", "2",
            "--sparse-steps", "2", "--batch-size", "2",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "loss.png").stat().st_size > 0
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--set", "window_size=-3", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "window_size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # a bad config writes nothing
    assert main(["train", "--curriculum", "10-64", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "STEPS:LEN" in capsys.readouterr().err
    assert main(["train", "--curriculum", "1:200", "--seq-len", "100", "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2
    assert "curriculum" in capsys.readouterr().err
    assert main(["train", "--curriculum", "1:50", "--seq-len", "128", "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2  # too short for the passkey
    assert "seq_len 50 is too short" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_gloo_processes_follow_one(tmp_path, parallel):
    common = ["train", "--schedule", "hca,csa", "--seq-len", "128", "--dense-steps", "1",
              "--indexer-steps", "1", "--sparse-steps", "2", "--batch-size", "4", "--log-every", "1",
              "--no-progress", "--parallel", parallel]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "hybrid_attention.cli"] + common + ["--out", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[:4000]

    def losses(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one, two = losses("one"), losses("two")
    assert [r["phase"] for r in one] == [r["phase"] for r in two] == ["dense", "indexer", "sparse", "sparse"]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["indexer_loss"] == pytest.approx(b["indexer_loss"], rel=1e-5, abs=1e-7)
    p1, p2 = _params(load_checkpoint(tmp_path / "one")), _params(load_checkpoint(tmp_path / "two"))
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5, msg=k)
    if parallel == "fsdp2":  # the optimizer state was gathered whole: keyed by parameter name, full shapes
        saved = torch.load(tmp_path / "two" / "train_state.pt", weights_only=False)["optimizer"]["state"]
        for name, exp_avg in ((k, v["exp_avg"]) for k, v in saved.items()):
            assert exp_avg.shape == p2[name].shape, name
        assert set(saved) == set(p1)


def _exact_match(model, seq_len, digits, seed=123, n=48):
    from hybrid_attention.data import IGNORE, PasskeyTask

    batch = PasskeyTask(seq_len, digits=digits, seed=seed).batch(n, 0)
    with torch.no_grad():
        predicted = model.eval()(batch.inputs).argmax(-1)
    answer = batch.targets != IGNORE
    return float(((predicted == batch.targets) | ~answer).all(1).float().mean())


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _format_only_prompt(key: str, sentences_before: int, length: int) -> list[int]:
    """A passkey prompt built from the published format alone (not from hybrid_attention.data):
    filler sentences, the key sentence, filler (cut to fit), the question; `length` bytes."""
    sentences = [s if s.endswith(".") else s + "." for s in FILLER.split(". ")]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = " What is the pass key? The pass key is"
    head = "".join(sentences[i % 5] + " " for i in range(sentences_before)) + needle
    tail = "".join(" " + sentences[i % 5] for i in range(sentences_before, sentences_before + 20))
    text = head + tail[:length - len(head) - len(question)] + question
    assert len(text) == length and text.startswith(head)
    return list(text.encode())


def test_hybrid_learns_passkey_past_its_window_where_window_cannot(tmp_path):
    # 128-token prompts, window 8: the key is 20-110 tokens before the question. Fixed seeds;
    # measured 1.0 (hybrid) and 0.0 (window) exact matches on fresh keys; the bounds keep a wide margin.
    from hybrid_attention.engine import Engine
    from hybrid_attention.eval import evaluate

    accuracy, grid = {}, {}
    for schedule in ("hybrid", "window"):
        cfg = _cfg(tmp_path, schedule, schedule=schedule, sparse_steps=220, batch_size=16, lr=3e-3,
                   warmup_steps=20, weight_decay=0.0, task_options={"digits": 2}, log_every=50)
        accuracy[schedule] = _exact_match(train(cfg, progress=False)["model"], 128, 2)
        # The saved checkpoint on a fresh needle grid (keys the training never drew), 126-token prompts.
        grid[schedule] = evaluate(load_checkpoint(tmp_path / schedule), [126], [0.0, 0.25, 0.5, 0.75, 1.0],
                                  per_cell=4, seed=7, digits=2, details=True)
    assert accuracy["hybrid"] >= 0.6, accuracy
    assert accuracy["window"] <= 0.2, accuracy
    assert grid["hybrid"]["accuracy"][126] >= 0.6, grid["hybrid"]
    assert grid["window"]["accuracy"][126] <= 0.2, grid["window"]

    # The checkpoint answers prompts built from the format alone, through the Engine (greedy).
    model = load_checkpoint(tmp_path / "hybrid")
    keys = [f"{k:02d}" for k in (7, 19, 31, 42, 58, 63, 77, 84, 90, 96)]
    prompts = [_format_only_prompt(key, i % 2, 126) for i, key in enumerate(keys)]
    results = Engine(model, cache_bytes=8 << 20, max_batch=4).generate(prompts, max_new_tokens=3)
    answers = [bytes(r.tokens).decode() for r in results]
    right = sum(a == " " + k for a, k in zip(answers, keys, strict=True))
    assert right >= 6, list(zip(keys, answers, strict=True))

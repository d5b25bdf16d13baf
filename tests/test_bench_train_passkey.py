"""benchmarks/train_passkey.py keeps running: a tiny two-schedule run prints its table and leaves a
checkpoint folder per schedule (config.json, model.safetensors, train.json, needle.png)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_passkey  # noqa: E402


def test_two_schedules_with_every_phase(tmp_path, capsys):
    args = ["--schedules", "hybrid,window", "--seq-len", "100", "--digits", "2", "--steps", "2",
            "--hca-ratio", "16", "--dense-steps", "1", "--indexer-steps", "1", "--batch-size", "2",
            "--eval-lengths", "100,120", "--per-cell", "1", "--depths", "0,1", "--out", str(tmp_path),
            "--json"]
    assert train_passkey.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# train_passkey.py") and "1 dense + 1 indexer + 2 sparse steps" in lines[1]
    assert any(line.startswith("| hybrid |") for line in lines)
    assert any(line.startswith("| window | ") and line.split("|")[4].strip() == "-" for line in lines)
    results = json.loads(lines[-1])
    assert set(results) == {"hybrid", "window"} and set(results["hybrid"]["accuracy"]) == {"100", "120"}
    for name in ("hybrid", "window"):
        folder = tmp_path / name
        for file in ("config.json", "model.safetensors", "train.json", "needle.png"):
            assert (folder / file).is_file(), (name, file)
        assert json.loads((folder / "train.json").read_text())["seq_len"] == 100
    ratios = json.loads((tmp_path / "hybrid" / "config.json").read_text())["attention"]["compress_ratios"]
    assert ratios == [16, 4, 16, 4]  # HCA / CSA alternating, HCA at the ratio asked for


def test_an_unknown_schedule_is_refused(capsys):
    assert train_passkey.main(["--schedules", "hybrid,dense"]) == 2
    assert "unknown schedule" in capsys.readouterr().err


def test_quick_sets_defaults_that_explicit_flags_override():
    quick = train_passkey.parse_args(["--quick"])
    assert (quick.seq_len, quick.digits, quick.steps, quick.batch_size) == (1024, 2, 900, 4)
    assert quick.curriculum == [[400, 128], [200, 512]] and quick.schedules == "hybrid,window"
    mine = train_passkey.parse_args(["--quick", "--steps", "550", "--curriculum", "200:128",
                                     "--schedules", "full"])
    assert (mine.steps, mine.curriculum, mine.schedules) == (550, [[200, 128]], "full")
    full = train_passkey.parse_args([])
    assert (full.seq_len, full.digits, full.batch_size, full.hca_ratio) == (4096, 5, 4, 128)
    assert (full.dense_steps, full.indexer_steps, full.steps) == (550, 50, 550)
    assert full.curriculum[-1] == [400, 2048] and full.eval_multiples[-1] == 16
    assert train_passkey.parse_args(["--dense-steps", "0"]).dense_steps == 0  # an explicit 0 wins

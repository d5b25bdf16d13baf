"""`hybrid-attention generate`'s report: the JSON object (keys, types, token ids, determinism), the
attention time by layer kind, the cache bytes against the planner's count, the resident memory in
the progress line, and the same report from `--task passkey`. Small runs of the tiny preset; no
test depends on how fast anything is."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from hybrid_attention import cli, generate, planner
from hybrid_attention.config import AttentionConfig, ModelConfig
from hybrid_attention.model import HybridTransformer

# As tests/test_cli.py's TINY_RUN: about a second, no baseline, a 48-token prompt, 3 new tokens.
PROMPT_LEN, NEW_TOKENS = 48, 3
TINY_RUN = ["generate", "--preset", "tiny", "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS),
            "--prefill-chunk", "16", "--cache-gib", "0.01", "--no-progress"]
CACHE_TOLERANCE = 1e-3  # the bound on the cache bytes against the planner's count

TOP_KEYS = {"task": str, "preset": str, "quant": str, "prompt_len": int, "new_tokens": int, "batch": int,
            "prefill_chunk": int, "cache_gib": float, "seed": int, "threads": int, "memory_estimate": str,
            "models": list}
MODEL_KEYS = {"name": str, "time_to_first_token_s": float, "decode_tokens_per_s": float, "total_s": float,
              "peak_rss_bytes": int, "attention_s_by_kind": dict, "other_s": float, "cache_tokens": int,
              "cache_bytes": int, "cache_bytes_by_type": dict, "planner_cache_bytes": int,
              "planner_cache_bytes_by_type": dict, "cache_relative_difference": dict, "tokens": list}


def run_json(capsys, *argv: str) -> tuple[dict, str]:
    """(the JSON object on stdout, stderr); stdout must hold that object and nothing else."""
    assert cli.main([*TINY_RUN, *argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and captured.out.endswith("\n")
    return json.loads(captured.out, parse_constant=_no_constants), captured.err


def _no_constants(name: str):
    raise AssertionError(f"{name} is not JSON")


def kinds_of(preset: str, quant: str = "none") -> dict[str, int]:
    att = AttentionConfig.preset(preset, quant=quant)
    kinds = [att.layer_kind(i) for i in range(ModelConfig.preset(preset).n_layers)]
    return {kind: kinds.count(kind) for kind in set(kinds)}


def planner_cache(quant: str, context: int, dense: bool = False) -> dict[str, int]:
    """The planner's count for the tiny model (fp32 rows, or its FP8 / FP4 formats), no zero types."""
    att = AttentionConfig.preset("tiny", quant=quant)
    if dense:
        att = att.replace(compress_ratios=["full"] * att.n_total_layers)
    spec = planner.model_spec_from_model_config(ModelConfig.preset("tiny", attention=att))
    precisions = planner.official_precisions(4) if quant == "official" else {"all": "fp32"}  # fp32 model
    counts = planner.kv_cache_bytes_by_type(spec, context, 1, precisions)
    return {key: n for key, n in counts.items() if n}


def assert_types(obj: dict, keys: dict[str, type]) -> None:
    for key, kind in keys.items():
        assert key in obj, key
        value = obj[key]
        if kind is float:  # a JSON number; decode_tokens_per_s may be null
            assert value is None or (isinstance(value, int | float) and not isinstance(value, bool)), key
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), (key, value)


# The JSON object --------------------------------------------------------------------------------


def test_json_holds_the_report_and_nothing_else_is_on_stdout(capsys):
    out, err = run_json(capsys, "--no-baseline")
    assert_types(out, TOP_KEYS)
    assert out["task"] == "random" and out["prompt_len"] == PROMPT_LEN and out["new_tokens"] == NEW_TOKENS
    assert "# hybrid-attention generate:" in err and "# memory: about" in err  # the header, on stderr
    [model] = out["models"]
    assert_types(model, MODEL_KEYS)
    assert model["name"] == "hybrid"
    assert model["peak_rss_bytes"] > 0 and model["time_to_first_token_s"] >= 0
    assert model["total_s"] >= model["time_to_first_token_s"]
    assert model["cache_tokens"] == PROMPT_LEN + NEW_TOKENS - 1  # the last token is never fed back


def test_token_ids_are_ints_in_the_vocabulary_one_list_per_prompt(capsys):
    out, _ = run_json(capsys, "--no-baseline", "--batch", "2")
    [model] = out["models"]
    vocab = ModelConfig.preset("tiny").vocab_size
    assert len(model["tokens"]) == 2
    for tokens in model["tokens"]:
        assert len(tokens) == NEW_TOKENS
        assert all(type(t) is int and 0 <= t < vocab for t in tokens)


def test_the_same_seed_gives_the_same_tokens(capsys):
    first, _ = run_json(capsys, "--no-baseline", "--seed", "7")
    second, _ = run_json(capsys, "--no-baseline", "--seed", "7")
    assert first["models"][0]["tokens"] == second["models"][0]["tokens"]


def test_one_new_token_has_no_decode_rate(capsys):
    out, _ = run_json(capsys, "--no-baseline", "--new-tokens", "1")
    assert out["models"][0]["decode_tokens_per_s"] is None  # null, not NaN


def test_the_baseline_is_a_second_entry(capsys):
    out, _ = run_json(capsys)
    hybrid, dense = out["models"]
    assert (hybrid["name"], dense["name"]) == ("hybrid", "dense (all layers full)")
    assert set(dense["attention_s_by_kind"]) == {"full"}
    assert dense["attention_s_by_kind"]["full"]["layers"] == ModelConfig.preset("tiny").n_layers
    assert dense["cache_bytes_by_type"] == planner_cache("none", PROMPT_LEN + NEW_TOKENS - 1, dense=True)
    ratios = out["hybrid_over_dense"]
    assert ratios["cache_bytes"] == pytest.approx(hybrid["cache_bytes"] / dense["cache_bytes"])


# Time by layer kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["none", "official"])
def test_time_by_kind_covers_the_presets_kinds(capsys, quant):
    out, _ = run_json(capsys, "--no-baseline", "--quant", quant)
    [model] = out["models"]
    by_kind = model["attention_s_by_kind"]
    assert {kind: entry["layers"] for kind, entry in by_kind.items()} == kinds_of("tiny", quant)
    for kind, entry in by_kind.items():
        assert entry["prefill_s"] >= 0 and entry["decode_s"] >= 0, kind
        assert entry["total_s"] == pytest.approx(entry["prefill_s"] + entry["decode_s"])
    attention = sum(entry["total_s"] for entry in by_kind.values())
    assert model["other_s"] == pytest.approx(model["total_s"] - attention)


class Tick:
    """A clock that advances one second a call: each timed layer call adds exactly 1 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_layer_timer_times_every_layer_call_by_phase_and_removes_its_hooks():
    torch.manual_seed(0)
    model = HybridTransformer(ModelConfig.preset("tiny")).eval()
    timer = generate.LayerTimer(model, clock=Tick())
    states = model.new_states(1)
    with torch.no_grad(), timer.attached():
        model(torch.randint(0, 256, (1, 20)), states)  # one call per layer
        timer.phase = "decode"
        for _ in range(2):
            model(torch.randint(0, 256, (1, 1)), states)
    layers = kinds_of("tiny")
    assert timer.layers == layers
    assert timer.seconds == {kind: {"prefill": 1.0 * n, "decode": 2.0 * n} for kind, n in layers.items()}
    assert all(not block.attn._forward_hooks and not block.attn._forward_pre_hooks for block in model.layers)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 1)), states)  # outside the block: not timed
    assert timer.seconds["csa"] == {"prefill": 1.0, "decode": 2.0}


# Cache against the planner ---------------------------------------------------------------------


def test_cache_bytes_equal_the_planners_count(capsys):
    out, _ = run_json(capsys, "--no-baseline")
    [model] = out["models"]
    planned = planner_cache("none", model["cache_tokens"])
    assert model["planner_cache_bytes_by_type"] == planned
    assert set(model["cache_bytes_by_type"]) == set(planned)
    for key, n in planned.items():
        assert abs(model["cache_bytes_by_type"][key] - n) <= CACHE_TOLERANCE * n, key
        assert abs(model["cache_relative_difference"][key]) <= CACHE_TOLERANCE, key
    assert abs(model["cache_bytes"] - sum(planned.values())) <= CACHE_TOLERANCE * sum(planned.values())
    assert model["planner_note"] is None


def test_official_cache_bytes_equal_the_planners_count(capsys):
    out, _ = run_json(capsys, "--no-baseline", "--quant", "official")
    [model] = out["models"]
    planned = planner_cache("official", model["cache_tokens"])
    assert model["planner_cache_bytes_by_type"] == planned
    for key, n in planned.items():
        assert abs(model["cache_bytes_by_type"][key] - n) <= CACHE_TOLERANCE * n, key
    assert model["planner_note"] is None


def test_the_planners_fp8_rows_with_fp32_rope_dims_are_the_caches_rows():
    """An fp32 model's FP8 entry: the FP8 non-rope dims, one ue8m0 exponent per 64, the rope dims
    in fp32, padded to 4 bytes; DeepSeek's (bf16) stack keeps the rope dims in bf16."""
    att = AttentionConfig.preset("tiny", quant="official")
    nope = att.head_dim - att.rope_head_dim
    fp32_row = -(-(nope + nope // 64 + 4 * att.rope_head_dim) // 4) * 4
    bf16_row = -(-(nope + nope // 64 + 2 * att.rope_head_dim) // 4) * 4
    assert planner.FORMATS["fp8-rope32"].row_bytes(att.head_dim, att.rope_head_dim) == fp32_row
    assert planner.FORMATS["fp8"].row_bytes(att.head_dim, att.rope_head_dim) == bf16_row
    assert planner.FORMATS["fp8"].row_bytes(512, 64) == 584  # V4's 512-dim entry (SPEC 12)
    assert planner.official_precisions(2) == {}


# The text report and the progress line ---------------------------------------------------------


def test_the_text_report_has_the_new_lines(capsys):
    assert cli.main(TINY_RUN) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "peak RSS" in lines[2]  # the table's header
    assert any(line.startswith("attention layers by kind") for line in lines)
    kinds = {name: {line[26:34].strip() for line in lines if line.startswith(name) and line.endswith("%")}
             for name in ("hybrid ", "dense (all layers full)")}
    assert kinds == {"hybrid ": {*kinds_of("tiny"), "other"}, "dense (all layers full)": {"full", "other"}}
    context = PROMPT_LEN + NEW_TOKENS - 1
    total = sum(planner_cache("none", context).values())
    assert f"cache of one sequence, hybrid: {total:,} bytes after {context} tokens; the planner's count " \
           f"{total:,} (+0.00%)" in out
    assert "cache of one sequence, dense (all layers full):" in out and "hybrid / dense:" in out
    assert any(line.split()[:1] == ["csa_compressed"] and line.endswith("+0.00%") for line in lines)


def test_the_progress_line_shows_the_resident_memory():
    stream = io.StringIO()
    progress = generate.Progress("hybrid", 64, 2, stream=stream, memory=lambda: 3 << 30)
    progress.prefill(0, 64, 64)
    progress.token(0, 5)
    progress.close()
    frames = stream.getvalue().split("\r")[1:]
    assert all(frame.rstrip().endswith(", RSS 3 GiB") for frame in frames)
    quiet = io.StringIO()
    generate.Progress("hybrid", 64, 2, stream=quiet, memory=lambda: None).close()
    assert "RSS" not in quiet.getvalue()  # where it cannot be read, the line goes without it


def test_resident_memory_reads_statm_and_degrades(tmp_path):
    now = generate.resident_memory()
    assert now is None or now > 0
    statm = tmp_path / "statm"
    statm.write_text("1000 250 40 10 0 300 0\n")
    assert generate.resident_memory(statm) == 250 * generate.os.sysconf("SC_PAGE_SIZE")
    statm.write_text("garbage\n")
    assert generate.resident_memory(statm) is None
    assert generate.resident_memory(tmp_path / "missing") is None
    peak = generate.peak_resident_memory()
    assert peak is None or (now is None or peak >= now // 2)


# --task passkey ---------------------------------------------------------------------------------


def test_passkey_json_has_the_answer_and_whether_it_is_right(capsys):
    assert cli.main(["generate", "--task", "passkey", "--preset", "tiny", "--prompt-len", "96", "--key", "42",
                     "--cache-gib", "0.01", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out, parse_constant=_no_constants)
    assert "# hybrid-attention generate:" in captured.err
    assert out["task"] == "passkey" and out["key"] == "42"
    assert isinstance(out["answer"], str) and isinstance(out["right"], bool)
    assert 0.0 <= out["depth"] <= 1.0 and len(out["needle"]) == 2
    [model] = out["models"]
    assert_types(model, MODEL_KEYS)
    assert len(model["tokens"]) == 1 and len(model["tokens"][0]) == 3  # two digits and the end
    assert set(model["attention_s_by_kind"]) == set(kinds_of("tiny"))
    assert not math.isnan(model["total_s"])


def test_passkey_text_has_the_report(capsys):
    assert cli.main(["generate", "--task", "passkey", "--preset", "tiny", "--prompt-len", "96", "--key", "42",
                     "--cache-gib", "0.01", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "peak RSS" in out and "attention layers by kind" in out
    assert "cache of one sequence, model:" in out and "the planner's count" in out
    assert "the pass key is 42" in out and "answer: " in out

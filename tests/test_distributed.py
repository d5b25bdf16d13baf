"""Context-parallel prefill (`hybrid_attention.distributed`) under torchrun with gloo processes:
every rank's logits, the greedy tokens decoded after it and the final per-layer states equal one
process's, for split points that cut a compression block, the window and a CSA overlap."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close

from hybrid_attention import HybridTransformer, ModelConfig
from hybrid_attention.distributed import (
    communication_elements,
    halo_tokens,
    split_points,
    state_from_halo,
    token_costs,
)

WORKER = Path(__file__).with_name("cp_worker.py")
TINY = ModelConfig.preset("tiny")  # layers csa (ratio 4), hca (8), window, full; window 8
SEQ, NEW = 61, 6


def single_process(new_tokens: int):
    torch.manual_seed(0)
    model = HybridTransformer(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
        states = model.new_states(2)
        nxt = model(tokens, states)[:, -1].argmax(-1, keepdim=True)
        generated = []
        for _ in range(new_tokens):
            generated.append(nxt)
            nxt = model(nxt, states)[:, -1].argmax(-1, keepdim=True)
    return logits, torch.cat(generated, 1), states


def run(tmp_path, ranks: int, points: str, chunk: int):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(WORKER), str(tmp_path), str(SEQ), str(NEW), points, str(chunk)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


# 27 = 6 * 4 + 3 cuts a CSA block and its overlap, 3 * 8 + 3 an HCA block, and the window of 8.
@pytest.mark.parametrize("ranks, points, chunk", [(2, "0,27,61", 4096), (3, "0,19,42,61", 5), (2, "", 4096)],
                         ids=["2-cut-blocks", "3-cut-blocks-pieces-of-5", "2-balanced"])
def test_context_parallel_prefill_equals_one_process(tmp_path, ranks, points, chunk):
    logits, generated, states = single_process(NEW)
    results = run(tmp_path, ranks, points, chunk)
    bounds = results[0]["points"]
    if points:
        assert bounds == [int(p) for p in points.split(",")]
    else:
        assert bounds == split_points(SEQ, ranks, TINY.attention)
    for r, result in enumerate(results):
        assert_close(f"rank {r} logits", logits[:, bounds[r]:bounds[r + 1]], result["logits"])
        # progress: one call per piece and layer, rising to the chunk's length
        mine = bounds[r + 1] - bounds[r]
        done = [d for d, total in result["progress"] if total == mine]
        assert len(done) == len(result["progress"]) == TINY.attention.n_layers * -(-mine // chunk)
        assert done == sorted(done) and done[-1] == mine
    last = results[-1]
    assert torch.equal(last["generated"], generated)
    for layer_id, (state, saved) in enumerate(zip(states, last["states"], strict=True)):
        assert saved["pos"] == state.pos == SEQ + NEW  # each generated token was fed back
        for name in ("window", "kv", "compressed", "index_keys"):
            value = getattr(state, name)
            if value is not None:
                expected = value if isinstance(value, torch.Tensor) else value.view()
                assert_close(f"layer {layer_id} {name}", expected, saved[name])
        for name in ("compressor", "index_compressor"):
            value = getattr(state, name)
            if value is not None:
                kv, score = saved[name]
                assert_close(f"layer {layer_id} {name} kv", value.kv, kv)
                finite = torch.isfinite(value.score)
                assert torch.equal(finite, torch.isfinite(score))
                assert_close(f"layer {layer_id} {name} score", value.score[finite], score[finite])
    # the elements each rank moved are those of the formula
    sent, received = communication_elements(TINY.attention, bounds, 2)
    for result in results:
        assert result["sent"] == sent and result["received"] == received
    assert set(sent) == {"csa", "hca", "window", "full"} and sent["full"] > sent["window"]


def test_the_halo_rebuilds_the_streamed_state():
    """state_from_halo at a position that cuts every block: the window ring and both compressors'
    pending rows equal those a stream of the earlier tokens left."""
    torch.manual_seed(0)
    model = HybridTransformer(TINY).eval()
    h = torch.randn(2, 30, TINY.attention.dim, generator=torch.Generator().manual_seed(2))
    halo = halo_tokens(TINY.attention)
    for layer_id in range(3):  # csa, hca, window
        layer = model.layers[layer_id].attn
        streamed = layer.new_state(2)
        with torch.no_grad():
            layer(h, state=streamed)
            rebuilt = state_from_halo(layer, h[:, -halo:], 30, 2)
        assert torch.equal(rebuilt.window, streamed.window)
        for name in ("compressor", "index_compressor"):
            if getattr(streamed, name) is not None:
                assert torch.equal(getattr(rebuilt, name).kv, getattr(streamed, name).kv), name
                assert torch.equal(getattr(rebuilt, name).score, getattr(streamed, name).score), name


def test_split_points_balance_the_work_and_refuse_short_chunks():
    cfg = ModelConfig.preset("small").attention
    a, b = token_costs(cfg)
    points = split_points(262144, 4, cfg)
    work = [a * (q - p) + b * (q * q - p * p) / 2 for p, q in zip(points, points[1:], strict=False)]
    assert points[0] == 0 and points[-1] == 262144 and max(work) / min(work) < 1.01
    assert points[1] - points[0] > points[-1] - points[-2]  # later tokens cost more
    with pytest.raises(ValueError, match="each chunk needs at least 128 tokens"):
        split_points(300, 4, cfg)


@pytest.mark.parametrize("quant, length", [("none", 61), ("official", 75)])
def test_generate_context_parallel_gives_the_single_process_tokens(tmp_path, capsys, quant, length):
    """Through the last rank's engine (its paged FP8 / FP4 cache with --quant official)."""
    from hybrid_attention.cli import main

    common = ["generate", "--preset", "tiny", "--prompt-len", str(length), "--new-tokens", "5",
              "--batch", "2", "--quant", quant, "--cache-gib", "0.0625", "--json", "--no-progress"]
    assert main(common + ["--no-baseline"]) == 0
    single = json.loads(capsys.readouterr().out)["models"][0]["tokens"]
    drawn = [a for a in common if a != "--no-progress"]  # the progress line is checked below
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "hybrid_attention.cli"] + drawn + ["--context-parallel"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["tokens"] == single
    mine = 2 * (length - split_points(length, 2, TINY.attention)[1])  # the last rank's tokens x batch
    assert f"context-parallel prefill, rank 1 of 2: prefill [{'#' * 24}] {mine}/{mine} tokens" in done.stderr
    assert report["points"] == split_points(length, 2, TINY.attention) and len(report["ranks"]) == 2
    for rank in report["ranks"]:
        assert rank["sent"] == report["formula_elements"]["sent"]
        assert rank["received"] == report["formula_elements"]["received"]
        assert rank["prefill_s"] > 0 and rank["peak_rss_bytes"] > 0


def test_generate_context_parallel_outside_torchrun_is_a_usage_error(capsys, monkeypatch):
    from hybrid_attention.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--preset", "tiny", "--prompt-len", "61", "--context-parallel"]) == 2
    assert "torchrun --nproc-per-node N" in capsys.readouterr().err


def test_engine_continues_from_states_computed_elsewhere(tmp_path):
    """Engine.save_states: a plain streaming prefill's states, through a context file into the
    engine's paged cache, decode as the engine's own prefill does; bad states write nothing."""
    from hybrid_attention.engine import Engine

    torch.manual_seed(0)
    model = HybridTransformer(TINY).eval()
    prompt = torch.randint(0, TINY.vocab_size, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = Engine(model, cache_bytes=64 << 20, max_batch=1)
    direct = engine.generate([prompt], 6)[0].tokens
    with torch.no_grad():
        states = model.new_states(2)  # row 1 holds the prompt
        batch = torch.tensor([prompt[::-1], prompt])
        logits = model(batch, states)
    path = tmp_path / "ctx.bin"
    engine.save_states(prompt, logits[1, -1], states, path, row=1)
    assert engine.generate([[]], 6, context=path)[0].tokens == direct  # nothing after the context
    with pytest.raises(ValueError, match="layer states after the prompt's 44 tokens"):
        engine.save_states(prompt[:-1], logits[1, -1], states, tmp_path / "bad.bin", row=1)
    assert not (tmp_path / "bad.bin").exists()

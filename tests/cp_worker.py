"""Worker of tests/test_distributed.py, run under torchrun: a context-parallel prefill of a tiny
model, then (last rank) greedy decoding from the gathered states; results saved for the test."""

import sys

import torch
import torch.distributed as dist

from hybrid_attention import HybridTransformer, ModelConfig
from hybrid_attention.distributed import context_parallel_prefill


def main(out: str, seq_len: int, new_tokens: int, points: str, chunk: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = HybridTransformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    split = [int(p) for p in points.split(",")] if points else None
    calls = []
    result = context_parallel_prefill(model, tokens, points=split, chunk=chunk,
                                      progress=lambda done, total: calls.append((done, total)))
    saved = {"logits": result.logits, "points": result.points, "sent": result.sent,
             "received": result.received, "progress": calls}
    if rank == world - 1:
        states, generated = result.states, []
        nxt = result.logits[:, -1].argmax(-1, keepdim=True)
        with torch.no_grad():
            for _ in range(new_tokens):
                generated.append(nxt)
                nxt = model(nxt, states)[:, -1].argmax(-1, keepdim=True)
        saved["generated"] = torch.cat(generated, dim=1)
        saved["states"] = [_state_tensors(s) for s in states]
    torch.save(saved, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _state_tensors(state) -> dict:
    out = {"pos": state.pos}
    for name in ("window", "kv", "compressed", "index_keys"):
        value = getattr(state, name)
        if value is not None:
            out[name] = value if isinstance(value, torch.Tensor) else value.view().clone()
    for name in ("compressor", "index_compressor"):
        value = getattr(state, name)
        if value is not None:
            out[name] = (value.kv, value.score)
    return out


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))

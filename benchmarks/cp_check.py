"""Context-parallel prefill against one process, on the ranks' own device: run under torchrun.

    torchrun --standalone --nproc-per-node 2 benchmarks/cp_check.py --out cp.json            # CPU, gloo
    torchrun --standalone --nproc-per-node 2 benchmarks/cp_check.py --device cuda --out cp.json

Every rank builds the same model (seeded) and prompt, runs `distributed.context_parallel_prefill`
on its chunk, then the plain streaming prefill of the whole prompt in one process
(`model(tokens, states)`) on the same device, and compares its chunk's logits (and, on the last
rank, every layer's state) with it. The exchange: NCCL when each rank has a GPU of its own; gloo
otherwise, which is what one GPU shared by the ranks gets (NCCL refuses two ranks on one device, and
gloo moves CUDA tensors through host memory: `distributed._gather`). Rank 0 writes one JSON object:
the backend, the split, and per rank its prefill seconds, peak memory (CUDA: the allocator's peak;
CPU: the peak resident set), the largest logits difference relative to the logits' RMS, and the
elements it sent and received beside `communication_elements`. Exit status 0 when every rank's
logits and the states are within TOLERANCE and the moved elements equal the formula, else 1.
`benchmarks/gpu_session.py` runs it as its "context" part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from hybrid_attention import AttentionConfig, HybridTransformer, ModelConfig
from hybrid_attention.distributed import communication_elements, context_parallel_prefill
from hybrid_attention.generate import peak_resident_memory

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |diff| / RMS of the reference


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the ranks compute (default: cpu)")
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--length", type=int, default=300, help="prompt tokens (default: 300)")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per streamed piece (default: 4096)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="model dtype (default: fp32)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default: 0)")
    parser.add_argument("--out", help="write rank 0's JSON report here (default: print it)")
    return parser.parse_args(argv)


def init(device_kind: str) -> tuple[torch.device, str]:
    """(this rank's device, backend) from torchrun's environment."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device_kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise SystemExit("cp_check.py --device cuda: no CUDA device is visible")
        device = torch.device("cuda", local % count)
        torch.cuda.set_device(device)
        backend = "nccl" if local_world <= count else "gloo"  # NCCL wants one GPU per rank
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return device, backend


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident_memory()


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    rms = ref.square().mean().sqrt().clamp_min(1e-30)
    return float((out - ref).abs().max() / rms) if ref.numel() else 0.0


def state_errors(reference, states) -> float:
    """The largest relative error over the layers' window rings, entries, keys and KV rows."""
    worst = 0.0
    for ref, got in zip(reference, states, strict=True):
        for name in ("window", "kv", "compressed", "index_keys"):
            a, b = getattr(ref, name), getattr(got, name)
            if a is None:
                continue
            a = a if isinstance(a, torch.Tensor) else a.view()
            b = b if isinstance(b, torch.Tensor) else b.view()
            worst = max(worst, relative_error(a, b))
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    device, backend = init(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    attention = AttentionConfig.preset(args.preset)
    attention = attention.replace(max_seq_len=max(attention.max_seq_len, args.length))
    cfg = ModelConfig.preset(args.preset, attention=attention)
    torch.manual_seed(args.seed)
    model = HybridTransformer(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.length), generator=prompt).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    began = time.perf_counter()
    result = context_parallel_prefill(model, tokens, chunk=args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    peak = peak_memory(device)
    lo, hi = result.points[rank], result.points[rank + 1]
    with torch.no_grad():  # the same prompt in one process, streamed as the engine would
        states = model.new_states(1)
        reference = torch.cat([model(tokens[:, a:a + args.chunk], states)
                               for a in range(0, args.length, args.chunk)], dim=1)
    mine = {"rank": rank, "device": str(device), "tokens": [lo, hi], "prefill_s": seconds, "peak_bytes": peak,
            "logits_error": relative_error(reference[:, lo:hi], result.logits),
            "states_error": state_errors(states, result.states) if rank == world - 1 else None,
            "sent": result.sent, "received": result.received}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    sent, received = communication_elements(cfg.attention, result.points, 1)
    tolerance = TOLERANCE[dtype]
    ok = ranks[-1]["states_error"] <= tolerance and all(
        r["logits_error"] <= tolerance and r["sent"] == sent and r["received"] == received for r in ranks)
    if rank == 0:
        report = {"backend": backend, "world_size": world, "preset": args.preset, "dtype": args.dtype,
                  "length": args.length, "points": result.points, "tolerance": tolerance,
                  "formula_elements": {"sent": sent, "received": received}, "ranks": ranks, "ok": ok}
        text = json.dumps(report)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        else:
            print(text)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

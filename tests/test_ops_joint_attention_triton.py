"""ops.joint_attention's Triton backend (the row lists, then the sparse-attention kernels, run by
Triton's interpreter on CPU tensors) against the torch backend (cpu.py, itself checked against the
reference): output, teacher and every gradient."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

import pytest
import test_ops_joint_attention as torch_cases
import torch
import triton  # noqa: E402,F401  (a dev dependency: `make test` installs it; these tests must run)
from conftest import TOLERANCE, assert_close

from hybrid_attention.ops.joint_attention import cpu
from hybrid_attention.ops.joint_attention import triton as kernels

# The torch backend's cases, and chunks with no entries yet.
CASES = [*torch_cases.CASES,
         pytest.param(2, 6, 0, 2, 16, 8, 8, "dense", 0, id="B2-T6-hca-no-entries-yet"),
         pytest.param(1, 3, 0, 2, 16, 8, 4, "picks", 5, id="B1-T3-csa-no-entries-yet")]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "QUERY_BLOCK", 8)  # the teacher in several query blocks
    monkeypatch.setattr(cpu, "QUERY_BLOCK", 8)


def make_inputs(*case, dtype=torch.float32, seed=0):
    """The torch backend tests' inputs, with a fifth of the picks dropped to -1."""
    return torch_cases.make_inputs(*case, dtype=dtype, seed=seed, drop=0.2)


def run(fn, inputs, window, start, ratio, grad_out):
    """(o, teacher, [dq, dkv, dsink, dcompressed]) of `fn` for the upstream gradient grad_out on o."""
    q, kv, sink, compressed, picks = (t.detach().clone() if t is not None and t.is_floating_point() else t
                                      for t in inputs)
    leaves = [t.requires_grad_(True) if t is not None else None for t in (q, kv, sink, compressed)]
    out, teacher = fn(q, kv, sink, q.size(-1) ** -0.5, window, start, compressed, ratio, picks,
                      compressed is not None)
    out.backward(grad_out)
    return out, teacher, [t.grad if t is not None else None for t in leaves]


def check(name: str, ref: torch.Tensor, out: torch.Tensor) -> None:
    """conftest's bound; an empty result (no entries yet) only has to have the right shape."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel():
        assert_close(name, ref, out)


@pytest.mark.parametrize("b, s, start, h, d, window, ratio, mode, topk", CASES)
def test_output_teacher_and_gradients_equal_the_torch_backend(b, s, start, h, d, window, ratio, mode,
                                                               topk):
    inputs = make_inputs(b, s, start, h, d, window, ratio, mode, topk)
    grad_out = torch.randn(b, s, h, d, generator=torch.Generator().manual_seed(1))
    ref = run(cpu.joint_attention_cpu, inputs, window, start, ratio, grad_out)
    got = run(kernels.joint_attention_triton, inputs, window, start, ratio, grad_out)
    assert got[0].dtype == torch.float32
    assert_close("out", ref[0], got[0])
    if mode == "window":
        assert got[1] is None
    else:
        assert not got[1].requires_grad
        check("teacher", ref[1], got[1])
    for name, r, g in zip(("dq", "dkv", "dsink", "dcompressed"), ref[2], got[2], strict=True):
        assert (r is None) == (g is None), name
        if r is not None:
            check(name, r, g)


def test_teacher_is_zero_for_missing_picks_and_hidden_entries():
    b, s, start, h, d, window, ratio = 2, 41, 0, 3, 16, 8, 4
    q, kv, sink, compressed, picks = make_inputs(b, s, start, h, d, window, ratio, "picks", 5)
    scale = d ** -0.5
    _, teacher = kernels.joint_attention_triton(q, kv, sink, scale, window, start, compressed, ratio,
                                                picks, True)
    assert (picks < 0).any() and (picks >= 0).any()
    assert (teacher[picks < 0] == 0).all() and (teacher[picks >= 0] > 0).all()
    _, dense = kernels.joint_attention_triton(q, kv, sink, scale, window, start, compressed, ratio,
                                              None, True)
    visible = torch.div(start + torch.arange(s) + 1, ratio, rounding_mode="floor")[:, None]
    hidden = (torch.arange(compressed.size(1)) >= visible).expand(b, s, -1)
    assert (dense[hidden] == 0).all() and (dense[~hidden] > 0).all()
    assert (dense.sum(-1) < h).all()  # the window rows and the sink hold the rest of each head's mass


def test_bf16_inputs_give_fp32_output_and_input_dtype_gradients():
    inputs = make_inputs(2, 29, 5, 3, 16, 8, 4, "picks", 5, dtype=torch.bfloat16, seed=3)
    grad_out = torch.randn(2, 29, 3, 16, generator=torch.Generator().manual_seed(4))
    ref = run(cpu.joint_attention_cpu, inputs, 8, 5, 4, grad_out)  # fp32 arithmetic on bf16 inputs
    got = run(kernels.joint_attention_triton, inputs, 8, 5, 4, grad_out)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, r, g in zip(("out", "teacher", "dq", "dkv", "dsink", "dcompressed"), ref[:2] + tuple(ref[2]),
                          got[:2] + tuple(got[2]), strict=True):
        assert g.dtype == r.dtype, name
        # The kernels round P and dS to bf16 before their dots: bf16 noise, not fp32 agreement.
        assert_close(name, r.float(), g.float(), ratio=5 * TOLERANCE[torch.bfloat16])

"""`modules.linear`: the oneDNN GEMM for fp32 CPU inference of prefill-sized calls,
`nn.functional.linear` otherwise."""

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hybrid_attention import modules
from hybrid_attention.modules import linear


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_fp32_inference_runs_on_onednn_and_matches_the_torch_linear():
    assert modules._HAS_ONEDNN_LINEAR  # the CPU build of torch that `make test` installs has it
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    rows = -(-modules.ONEDNN_MIN_MACS // (96 * 256))  # the fewest rows that take oneDNN
    for shape in [(rows, 256), (3, rows, 256), (2, 1, rows, 256)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" in ops_run(lambda x=x: linear(x, weight))
            got = linear(x, weight)
        want = nn.functional.linear(x.double(), weight.double())
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    for shape in [(1, 256), (1, rows - 1, 256), (4, 0, 256)]:  # a decode step, just too few, none
        x = torch.randn(shape)
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" not in ops_run(lambda x=x: linear(x, weight))
            assert torch.equal(linear(x, weight), nn.functional.linear(x, weight))
    strided = torch.randn(6, 512)[:, ::2]  # rows that are not contiguous
    with torch.no_grad():
        torch.testing.assert_close(linear(strided, weight), nn.functional.linear(strided, weight),
                                   rtol=1e-5, atol=1e-4)


def test_autograd_other_dtypes_and_disabled_onednn_take_the_torch_linear():
    torch.manual_seed(0)
    weight = torch.randn(32, 64, requires_grad=True)
    x = torch.randn(5, 64, requires_grad=True)
    y = linear(x, weight)
    assert "mkldnn::_linear_pointwise" not in ops_run(lambda: linear(x, weight))
    assert torch.equal(y, nn.functional.linear(x, weight))
    y.square().sum().backward()
    torch.testing.assert_close(weight.grad, 2 * (x @ weight.T).T @ x)

    xb, wb = x.detach().bfloat16(), weight.detach().bfloat16()
    with torch.no_grad():
        assert torch.equal(linear(xb, wb), nn.functional.linear(xb, wb))
        torch.backends.mkldnn.enabled = False
        try:
            assert "mkldnn::_linear_pointwise" not in ops_run(lambda: linear(x, weight))
            assert torch.equal(linear(x, weight), nn.functional.linear(x, weight))
        finally:
            torch.backends.mkldnn.enabled = True

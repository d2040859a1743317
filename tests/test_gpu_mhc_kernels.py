"""The mHC Triton kernels compiled for a CUDA GPU, through the backend: each op against the fp64 math of
tests/lowerings (test_mhc.py, test_mhc_vllm.py), at the test sizes and at DeepSeek-V4-Flash's width (K = 4 x 4096,
16 split-K partials), with the kernel count Inductor launches per call."""

from __future__ import annotations

import pytest
import torch

from dsv4_compile.lowering.lowerings import mhc_vllm
from dsv4_compile.models.deepseek_v4 import cuda_ops  # noqa: F401 - defines the dsv4_cuda ops
from tests.lowerings import test_mhc_vllm as vllm_math
from tests.lowerings.test_mhc import head64, post64, pre64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the mHC Triton kernels"),
]
RMS_EPS, EPS = 0.1, 0.01  # test_mhc.py's
M = 4


def inputs(t: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, M, hidden, generator=gen).to(dtype)
    x = torch.randn(t, hidden, generator=gen).to(dtype)
    fn = torch.randn(M * (M + 2), M * hidden, generator=gen) / (M * hidden) ** 0.5
    return h, x, fn, 0.5 + torch.rand(3, generator=gen), 0.5 * torch.randn(M * (M + 2), generator=gen)


def check(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> None:
    actual = actual.cpu()
    if actual.dtype == torch.bfloat16:  # one rounding of the fp64 value, an ulp apart at most
        torch.testing.assert_close(actual, expected64.to(dtype), rtol=2 ** -7, atol=1e-5)
    else:
        torch.testing.assert_close(actual.double(), expected64, rtol=2e-5, atol=2e-6)


def kernels_per_call(fn, *args) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("t", "hidden"), [(1, 16), (7, 16), (1, 4096), (300, 4096)])
def test_pre_post_fused_head_match_the_math(t, hidden, dtype):
    h, x, fn, scale, base = inputs(t, hidden, dtype)
    post = 2 * torch.rand(t, M)
    comb = torch.rand(t, M, M).softmax(-1)
    ops = torch.ops.dsv4_cuda

    def pre(h, fn, scale, base):
        return ops.mhc_pre(h, fn, scale, base, RMS_EPS, EPS, 20)

    def fused(x, h, post, comb, fn, scale, base):
        return ops.mhc_fused_post_pre(x, h, post, comb, fn, scale, base, RMS_EPS, EPS, 20)

    def head(h, fn, scale, base):
        return ops.hc_head(h, fn[:M], scale[:1], base[:M], RMS_EPS, EPS)

    cuda = [a.cuda() for a in (x, h, post, comb, fn, scale, base)]
    c_pre, c_fused, c_head = (torch.compile(f, backend="dsv4_xpu", fullgraph=True) for f in (pre, fused, head))
    x1, post1, comb1 = c_pre(*cuda[1:2], *cuda[4:])
    e_x, e_post, e_comb = pre64(h, fn, scale, base, 20)
    check(x1, e_x, dtype)
    check(post1, e_post, dtype)
    check(comb1, e_comb, dtype)
    h2, x2, post2, comb2 = c_fused(*cuda)
    check(h2, post64(x, h, post, comb), dtype)
    n_x, n_post, n_comb = pre64(h2.cpu(), fn, scale, base, 20)
    check(x2, n_x, dtype)
    check(post2, n_post, dtype)
    check(comb2, n_comb, dtype)
    check(c_head(cuda[1], *cuda[4:]), head64(h, fn[:M], scale[:1], base[:M]), dtype)
    assert kernels_per_call(c_pre, *cuda[1:2], *cuda[4:]) == 2
    assert kernels_per_call(c_fused, *cuda) == 3
    assert kernels_per_call(c_head, cuda[1], *cuda[4:]) == 2


@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
@pytest.mark.parametrize("carried", [False, True], ids=["stream0", "carried"])
def test_vllm_pre_delayed_matches_the_math(carried, normed):
    """vLLM's delayed pre: the gates projected from `x`, the collapse with the carried gates or stream 0."""
    gen = torch.Generator().manual_seed(3)
    dtype, hidden, width = torch.bfloat16, vllm_math.H, 48
    residual = torch.randn(5, M, hidden, generator=gen).to(dtype)
    x = torch.randn(5, width, generator=gen).to(dtype)
    fn, scale, base = vllm_math.pre_params(gen, width=width)
    pre_mix = torch.rand(5, M, generator=gen) if carried else None
    weight = vllm_math.norm_weight(gen, dtype) if normed else None
    eps = (vllm_math.RMS_EPS, vllm_math.PRE_EPS, vllm_math.SINKHORN_EPS, vllm_math.POST_MULT)
    args = [a if not isinstance(a, torch.Tensor) else a.cuda() for a in
            (residual, fn, scale, base, *eps, 3, pre_mix, x, weight, vllm_math.NORM_EPS)]
    post, comb, layer_input, next_pre = torch.compile(mhc_vllm.mhc_pre_delayed_tilelang_native)(*args)
    e_pre, e_post, e_comb = vllm_math.gates64(x, fn, scale, base, 3)
    check(next_pre, e_pre, torch.float32)
    check(post.squeeze(-1), e_post, torch.float32)
    check(comb, e_comb, torch.float32)
    collapsed = vllm_math.collapse64(pre_mix, residual) if carried else residual[:, 0].double()
    expected = collapsed if weight is None else vllm_math.rms_norm64(collapsed.to(dtype), weight)
    check(layer_input, expected, dtype)

"""How many kernels Inductor generates for each mHC op after the backend, for `cuda` and `xpu`, through
`dsv4_compile.codegen` (no GPU needed): at most three per call, so a regression to the tens of kernels the
unfused math takes fails here. Needs Triton installed (the mHC kernels are Triton kernels that Inductor
inlines); `make test-triton` runs this file in the venv that has it.
"""

import pytest
import torch
from torch.utils._triton import has_triton_package

from dsv4_compile.lowering.lowerings import mhc_vllm
from dsv4_compile.models.deepseek_v4 import cuda_ops  # noqa: F401 - defines the dsv4_cuda ops
from dsv4_compile.tools.codegen import codegen

pytestmark = pytest.mark.skipif(not has_triton_package(), reason="the mHC kernels are Triton kernels: needs the "
                                "triton package (`make test-triton` runs this file in the venv that has it)")

T, M, H = 8, 4, 256
EPS = 1e-6
MIXES = M * (M + 2)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(T, M, H, generator=gen).bfloat16()
    x = torch.randn(T, H, generator=gen).bfloat16()
    fn, scale, base = torch.randn(MIXES, M * H, generator=gen), torch.rand(3, generator=gen), torch.randn(MIXES)
    post, comb = torch.rand(T, M, 1, generator=gen), torch.rand(T, M, M, generator=gen)
    return dict(h=h, x=x, fn=fn, scale=scale, base=base, post=post, comb=comb, pre_mix=torch.rand(T, M),
                norm_weight=torch.rand(H).bfloat16())


def pre(h, fn, scale, base):
    return torch.ops.dsv4_cuda.mhc_pre(h, fn, scale, base, EPS, EPS, 20)


def post(x, h, post, comb):
    return torch.ops.dsv4_cuda.mhc_post(x, h, post.squeeze(-1), comb)


def fused_post_pre(x, h, post, comb, fn, scale, base):
    return torch.ops.dsv4_cuda.mhc_fused_post_pre(x, h, post.squeeze(-1), comb, fn, scale, base, EPS, EPS, 20)


def hc_head(h, fn, scale, base):
    return torch.ops.dsv4_cuda.hc_head(h, fn[:M], scale[:1], base[:M], EPS, EPS)


# vLLM's ops exist only where vLLM is installed: the lowerings the backend emits for them, called directly.
def vllm_pre_normed(h, fn, scale, base, norm_weight):
    return mhc_vllm.mhc_pre_tilelang_native(h, fn, scale, base, EPS, EPS, EPS, 2.0, 20, norm_weight, EPS)


def vllm_fused_post_pre_delayed(x, h, post, comb, fn, scale, base, pre_mix, norm_weight):
    return mhc_vllm.mhc_fused_post_pre_delayed_tilelang_native(
        x, h, post, comb, fn, scale, base, EPS, EPS, EPS, 2.0, 20, pre_mix, norm_weight, EPS)


def vllm_hc_head(h, fn, scale, base):
    return mhc_vllm.hc_head_fused_kernel_tilelang_native(h, fn[:M], scale[:1], base[:M], EPS, EPS)


# (function, its arguments, the kernels expected: the Triton projection and gates+collapse kernels, and one
# pointwise kernel for a post)
CASES = {
    "pre": (pre, ("h", "fn", "scale", "base"), 2),
    "post": (post, ("x", "h", "post", "comb"), 1),
    "fused_post_pre": (fused_post_pre, ("x", "h", "post", "comb", "fn", "scale", "base"), 3),
    "hc_head": (hc_head, ("h", "fn", "scale", "base"), 2),
    "vllm_pre_normed": (vllm_pre_normed, ("h", "fn", "scale", "base", "norm_weight"), 2),
    "vllm_fused_post_pre_delayed": (vllm_fused_post_pre_delayed,
                                    ("x", "h", "post", "comb", "fn", "scale", "base", "pre_mix", "norm_weight"), 3),
    "vllm_hc_head": (vllm_hc_head, ("h", "fn", "scale", "base"), 2),
}


@pytest.mark.parametrize("device", ["cuda", "xpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_mhc_op_is_at_most_three_kernels(case, device):
    function, names, expected = CASES[case]
    inputs = _inputs()
    result = codegen(function, tuple(inputs[n] for n in names), device=device)
    assert result.kernel_count == expected, list(result.kernels)
    assert result.kernel_count <= 3
    projections = [k for k in result.kernels if k.startswith("_project_kernel")]
    assert len(projections) == (expected != 1), list(result.kernels)
    assert f"device_str='{device}'" in result.wrapper

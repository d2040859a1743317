"""The fused Triton kernel behind `_C::silu_and_mul_with_clamp` on CUDA, against the formula."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the fused Triton kernel"),
]


def formula(x, limit, alpha=1.0, beta=0.0):
    d = x.shape[-1] // 2
    gate = x[..., :d].double().clamp(max=limit)
    up = x[..., d:].double().clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (3, 5, 6144), (0, 128)])
@pytest.mark.parametrize(("limit", "alpha", "beta"), [(10.0, 1.0, 0.0), (7.0, 1.702, 1.0)])
def test_kernel_matches_formula(dtype, shape, limit, alpha, beta):
    from dsv4_compile.lowering.lowerings.activation import silu_and_mul_with_clamp_native

    x = (torch.randn(shape, device="cuda") * 8).to(dtype)
    out = torch.empty(*shape[:-1], shape[-1] // 2, device="cuda", dtype=dtype)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit, alpha, beta)
    # Rounding to `dtype` after the activation and after the product: one output ulp of slack per step.
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double(), formula(x, limit, alpha, beta), rtol=tol, atol=tol)
    native = silu_and_mul_with_clamp_native(x, limit, alpha, beta)
    torch.testing.assert_close(out, native, rtol=tol, atol=tol)


def test_non_contiguous_out_and_input_views():
    x = (torch.randn(16, 512, device="cuda") * 8).to(torch.bfloat16)[:, :256]
    buf = torch.full((16, 300), -1.0, device="cuda", dtype=torch.bfloat16)
    torch.ops._C.silu_and_mul_with_clamp(buf[:, 10:138], x, 10.0)
    torch.testing.assert_close(buf[:, 10:138].double(), formula(x, 10.0), rtol=1.6e-2, atol=1.6e-2)
    assert (buf[:, :10] == -1).all() and (buf[:, 138:] == -1).all()


def test_nan_propagates_like_torch_clamp():
    x = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
    x[0, 1] = float("nan")
    x[1, 5] = float("nan")
    out = torch.empty(2, 4, device="cuda", dtype=torch.bfloat16)
    torch.ops._C.silu_and_mul_with_clamp(out, x, 10.0)
    assert out[0, 1].isnan() and out[1, 1].isnan()
    assert not out[0, 0].isnan()

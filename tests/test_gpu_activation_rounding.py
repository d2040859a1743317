"""On a CUDA GPU: the compiled clamped SwiGLU (Inductor's Triton code, the codegen XPU uses too) rounds where the
fused Triton kernel rounds: bit for bit the kernel's output, and one the oracle of test_activation_rounding.py
allows. Also what the rounding costs there (run with -s to see the timings)."""

import pytest
import torch

from tests.test_activation_rounding import (
    INDUCTOR_KEEPS_CASTS,
    LOW_PRECISION,
    PARAMS,
    assert_rounds_like_kernel,
    compile_swiglu,
    make_input,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's Triton path)"),
]


def fused_kernel(x, limit, alpha, beta):
    """The fused Triton kernel's output, or a skip where the op has no CUDA kernel (no Triton)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("_C::silu_and_mul_with_clamp", "CUDA"):
        pytest.skip("_C::silu_and_mul_with_clamp has no CUDA kernel here (needs Triton)")
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit, alpha, beta)
    return out


def same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("shape", "params"), [
    ((0, 128), "default"), ((1, 2), "default"), ((3, 5, 130), "default"), ((7, 4096), "default"),
    ((257, 6144), "default"), ((257, 6144), "alpha-beta"),
])
def test_compiled_on_gpu_rounds_where_the_kernel_rounds(dtype, shape, params):
    limit, alpha, beta = PARAMS[params]
    x = make_input(shape, dtype, device="cuda")
    out = compile_swiglu(limit, alpha, beta)(x)
    assert_rounds_like_kernel(out.cpu(), x.cpu(), limit, alpha, beta, unrounded_activation=not INDUCTOR_KEEPS_CASTS)
    if not INDUCTOR_KEEPS_CASTS:
        pytest.skip("torch < 2.13 drops the activation's rounding in the compiled kernel (README, Numerics)")
    kernel = fused_kernel(x, limit, alpha, beta)
    differ = (out.view(torch.int16) != kernel.view(torch.int16)).sum().item()
    assert same_bits(out, kernel), f"{differ}/{out.numel()} outputs differ from the fused kernel's"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_without_exact_rounding_the_activation_is_not_rounded(dtype):
    """What exact_rounding buys on a GPU: Inductor's default carries the activation in fp32."""
    limit, alpha, beta = PARAMS["default"]
    x = make_input((257, 6144), dtype, device="cuda")
    plain = compile_swiglu(limit, alpha, beta, exact_rounding=False)(x)
    kernel = fused_kernel(x, limit, alpha, beta)
    if same_bits(plain, kernel):
        pytest.skip("this Inductor rounds the activation by default")
    assert_rounds_like_kernel(plain.cpu(), x.cpu(), limit, alpha, beta, unrounded_activation=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_exact_rounding_costs_no_memory_traffic(dtype):
    """The kernel stays one read of the input and one write of the output: same time within noise."""
    from triton.testing import do_bench

    limit, alpha, beta = PARAMS["default"]
    x = make_input((16384, 8192), dtype, device="cuda")
    exact = compile_swiglu(limit, alpha, beta)
    plain = compile_swiglu(limit, alpha, beta, exact_rounding=False)
    exact(x), plain(x)
    ms = {name: do_bench(lambda f=f: f(x), warmup=50, rep=300) for name, f in (("exact", exact), ("plain", plain))}
    kernel_ms = do_bench(lambda: fused_kernel(x, limit, alpha, beta), warmup=50, rep=300)
    gbps = 1.5 * x.numel() * x.element_size() / (ms["exact"] * 1e-3) / 1e9
    print(f"\n{dtype}: exact_rounding {ms['exact']:.3f} ms ({gbps:.0f} GB/s), plain {ms['plain']:.3f} ms, "
          f"fused kernel {kernel_ms:.3f} ms")
    assert ms["exact"] < 1.15 * ms["plain"], ms

"""The compiled clamped SwiGLU rounds where the fused kernel rounds: to the input dtype after the activation
`silu(gate)` and again after the product with `up`, with fp32 math in between.

Compiled through the real backend on CPU against an oracle written here, and, for the Triton targets (cuda,
xpu), in the generated code without the hardware. The GPU run is tests/test_gpu_activation_rounding.py.
"""

import re

import pytest
import torch
from torch.torch_version import TorchVersion

import dsv4_compile
from dsv4_compile import BackendOptions, OptionsError
from dsv4_compile.lowering.backend import dsv4_xpu, inductor_config_patches
from dsv4_compile.lowering.lowerings.activation import silu_and_mul_with_clamp_native

# Before torch 2.13, Inductor drops an explicit fp32 -> bf16/fp16 -> fp32 round trip inside a fused kernel even
# under emulate_precision_casts: its C++ codegen does (pytorch#182882, #185847), and so does the Triton kernel
# torch 2.11 compiles on an H200. The activation then stays unrounded, and the output is the product of the fp32
# activation rounded once.
INDUCTOR_KEEPS_CASTS = TorchVersion(torch.__version__) >= (2, 13)

LOW_PRECISION = (torch.bfloat16, torch.float16)
PARAMS = {"default": (10.0, 1.0, 0.0), "alpha-beta": (7.0, 1.702, 1.0)}


def make_swiglu(limit: float, alpha: float, beta: float):
    """A CUDA-style call of the fused op into a fresh buffer."""

    def swiglu(x):
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
        torch.ops._C.silu_and_mul_with_clamp(out, x, limit, alpha, beta)
        return out

    return swiglu


def make_input(shape, dtype, device="cpu", seed=0):
    """Normal values, every fifth one uniform in (-40, 40), far beyond the clamp; |x| < 40 keeps `alpha * gate`
    above -80, where fp32's exp neither overflows nor leaves a subnormal sigmoid (flushed to zero on GPUs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    wide = x.view(-1)[::5]
    wide.copy_(torch.rand(wide.shape, generator=g) * 80 - 40)
    return x.clamp(-40, 40).to(dtype).to(device)


def _fp32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def allowed_outputs(x, limit, alpha=1.0, beta=0.0, *, unrounded_activation=False):
    """(expected, allowed, single): the formula rounded to `x.dtype` after the activation and after the product;
    every output an fp32 evaluation may give (`allowed`, stacked on dim 0); the formula rounded once.

    As in the kernel, `alpha * gate`, `up + beta` and the product are single fp32 operations (IEEE: the same on
    every device). Only the activation `gate * sigmoid(alpha * gate)` is up to the device's fp32 exp: it is
    exact here (fp64), and `allowed` holds both of its roundings wherever an fp32 error of `rel` could round it
    the other way: 8-16 ulps, plus twice the error of rounding exp's argument (GPUs: `ex2(x * log2(e))`), which
    grows with the size of a negative argument. `unrounded_activation` also allows the activation in fp32.
    """
    limit, alpha, beta = _fp32(limit), _fp32(alpha), _fp32(beta)
    d = x.shape[-1] // 2
    gate = x[..., :d].float().clamp(max=limit)
    up = x[..., d:].float().clamp(-limit, limit)
    arg = gate * alpha
    up_beta = up + beta
    act = gate.double() * torch.sigmoid(arg.double())
    rel = 2.0**-20 + 2.0**-23 * (-arg.double()).clamp(min=0)

    def product(activation):
        return (activation.float() * up_beta).to(x.dtype)

    bounds = [act * (1 - rel), act * (1 + rel)]
    activations = [b.to(x.dtype) for b in bounds] + ([b.float() for b in bounds] if unrounded_activation else [])
    allowed = torch.stack([product(a) for a in activations])
    return product(act.to(x.dtype)), allowed, (act * up_beta.double()).to(x.dtype)


def assert_rounds_like_kernel(out, x, limit, alpha, beta, *, unrounded_activation=False):
    """`out` is bit for bit one of the outputs `allowed_outputs` allows."""
    expected, allowed, single = allowed_outputs(x, limit, alpha, beta, unrounded_activation=unrounded_activation)
    assert out.dtype == x.dtype and out.shape == expected.shape
    if not out.numel():
        return
    bits = allowed.view(torch.int16)
    ok = (bits == out.contiguous().view(torch.int16)).any(0)
    where = [tuple(i) for i in (~ok).nonzero()[:5].tolist()]
    assert ok.all(), (f"{int((~ok).sum())}/{ok.numel()} outputs off the oracle, e.g. at {where}: got "
                      f"{[out[i].item() for i in where]}, expected {[expected[i].item() for i in where]}")
    if out.numel() >= 4096:  # the oracle tells one rounding from two, and its fp32 allowance does not blur that
        assert (bits[:2] != expected.view(torch.int16)).any(0).float().mean() < 0.01
        assert (single != expected).float().mean() > 0.1


def compile_swiglu(limit, alpha, beta, **options):
    torch._dynamo.reset()
    return torch.compile(make_swiglu(limit, alpha, beta), backend=dsv4_xpu, options=options, fullgraph=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("shape", "params"), [
    ((0, 64), "default"), ((1, 2), "default"), ((3, 5, 130), "default"), ((64, 1024), "default"),
    ((64, 1024), "alpha-beta"),
])
def test_compiled_on_cpu_rounds_where_the_kernel_rounds(dtype, shape, params):
    limit, alpha, beta = PARAMS[params]
    x = make_input(shape, dtype)
    out = compile_swiglu(limit, alpha, beta)(x)
    assert_rounds_like_kernel(out, x, limit, alpha, beta, unrounded_activation=not INDUCTOR_KEEPS_CASTS)
    assert_rounds_like_kernel(silu_and_mul_with_clamp_native(x, limit, alpha, beta), x, limit, alpha, beta)


def test_exact_rounding_is_in_the_inductor_cache_key():
    """Compiles with and without it get different code; a repeat with it is a cache hit, still exact."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache, run_and_get_code

    limit, alpha, beta = PARAMS["default"]
    x = make_input((64, 1024), torch.bfloat16, seed=1)
    runs = []
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        for exact in (True, False, True):
            counters.clear()
            out, code = run_and_get_code(compile_swiglu(limit, alpha, beta, exact_rounding=exact), x)
            runs.append((out, code, counters["inductor"]["fxgraph_cache_hit"]))
    (exact_out, exact_code, _), (_, plain_code, _), (again_out, again_code, again_hits) = runs
    assert exact_code != plain_code
    assert again_hits == 1 and again_code == exact_code
    for out in (exact_out, again_out):
        assert_rounds_like_kernel(out, x, limit, alpha, beta, unrounded_activation=not INDUCTOR_KEEPS_CASTS)


def test_exact_rounding_option():
    assert BackendOptions().exact_rounding is True
    assert inductor_config_patches(BackendOptions()) == {"emulate_precision_casts": True}
    assert inductor_config_patches(BackendOptions(exact_rounding=False)) == {}
    with pytest.raises(OptionsError, match="must be bool"):
        BackendOptions.from_mapping({"exact_rounding": "yes"})


_ASSIGN = re.compile(r"^\s*(tmp\d+) = (.+)$", re.M)
_TL_TYPE = {torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}


def activation_casts(kernel: str) -> list[str]:
    """The casts applied to the activation `gate * tl.sigmoid(...)` before it meets `up` in the product."""
    defs = dict(_ASSIGN.findall(kernel))
    sigmoid = next(v for v, e in defs.items() if e.startswith("tl.sigmoid("))
    var = next(v for v, e in defs.items() if re.fullmatch(rf"tmp\d+ \* {sigmoid}|{sigmoid} \* tmp\d+", e))
    casts = []
    while cast := _cast_of(defs, var):
        var, to = cast
        casts.append(to)
    assert any(re.fullmatch(rf"tmp\d+ \* {var}|{var} \* tmp\d+", e) for e in defs.values()), \
        f"the activation {var} is not multiplied with anything:\n{kernel}"
    return casts


def _cast_of(defs: dict[str, str], var: str) -> tuple[str, str] | None:
    for name, expr in defs.items():
        if m := re.fullmatch(rf"{var}\.to\((tl\.\w+)\)", expr):
            return name, m.group(1)
    return None


@pytest.mark.parametrize("device", ["cuda", "xpu"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_triton_code_rounds_the_activation(device, dtype):
    """Generated (not run) for the device: under the backend's config the activation is cast to the dtype
    before the product and FMA contraction is off; the product is stored to a `dtype` buffer (rounded)."""
    x = make_input((4, 64), dtype)
    result = dsv4_compile.codegen(make_swiglu(*PARAMS["default"]), (x,), device=device)  # exact_rounding=True
    (kernel,) = result.kernels.values()
    assert _TL_TYPE[dtype] in activation_casts(kernel), kernel
    assert "'enable_fp_fusion': False" in kernel
    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    assert re.search(rf"'out_ptr0': '{re.escape(pointer)}'", kernel)

    plain = dsv4_compile.codegen(make_swiglu(*PARAMS["default"]), (x,), device=device, exact_rounding=False)
    (plain_kernel,) = plain.kernels.values()
    assert "'enable_fp_fusion': True" in plain_kernel
    if _TL_TYPE[dtype] in activation_casts(plain_kernel):
        pytest.skip("this Inductor keeps the activation's cast by default; exact_rounding adds the FMA setting")

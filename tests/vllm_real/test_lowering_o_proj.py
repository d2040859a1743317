"""o_proj family on vLLM's own code: `fused_inv_rope_fp8_quant` (its `vllm::fused_inv_rope_fp8_quant_kernel`
op) and the whole `deep_gemm_fp8_o_proj` (that op, then DeepGEMM's `fp8_einsum`, swapped for
`dsv4_compat::fp8_einsum` while tracing), compiled with dsv4_xpu on CPU, checked against vLLM's CPU kernel
`_C::inverse_gptj_rope_o_proj_cpu` (the de-rotated attention output, fp32).

Tolerances: FP8 e4m3 keeps 3 mantissa bits, so a dequantised value lies within 2^-4 of the value it rounds (2^-10
of its block scale among subnormals); a projection of such values within 2^-4 of sum |x| |w|, plus one bf16
rounding. Without quantisation the rotation is one rounding to the input dtype away from the CPU kernel's fp32.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from dsv4_compile.lowering.lowerings import o_proj
from dsv4_compile.lowering.registry import LOWERINGS
from tests.conftest import lower_graph_testing, reports_since
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

OP = "vllm::fused_inv_rope_fp8_quant_kernel"
GROUPS, HEADS_PER_GROUP, NOPE, ROPE, LORA = 2, 2, 448, 64, 256
HEAD_DIM = NOPE + ROPE
WIDTH = HEADS_PER_GROUP * HEAD_DIM


@pytest.fixture(autouse=True)
def _ops() -> None:
    ensure_vllm_ops()


def vllms_inv_rope_quant():
    """vLLM's Python wrapper of the op (the package's attribute of that name is the function, not the module)."""
    module = importlib.import_module("vllm.models.deepseek_v4.common.ops.fused_inv_rope_fp8_quant")
    return module.fused_inv_rope_fp8_quant


def inputs(t, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    o = (torch.randn(t, GROUPS * HEADS_PER_GROUP, HEAD_DIM, generator=gen) * 2).to(dtype)
    angles = torch.arange(128).reshape(-1, 1).double() * torch.logspace(0, -4, ROPE // 2, dtype=torch.float64)
    cache = torch.cat((angles.cos(), angles.sin()), -1).float()
    return o, torch.randint(0, 128, (t,), generator=gen), cache


def cpu_derotated(o, positions, cache):
    """vLLM's CPU kernel, as [T, G, heads_per_group * head_dim] fp32."""
    return torch.ops._C.inverse_gptj_rope_o_proj_cpu(o, positions, cache, ROPE).reshape(o.shape[0], GROUPS, WIDTH)


def block_scales(scales, packed):
    """[T, G, blocks] fp32 from what the kernel returns (packed: four exponent bytes a word, with Python ints)."""
    if not packed:
        return scales.double()
    words = [[[(w & 0xFFFFFFFF) >> (8 * i) & 0xFF for w in row for i in range(4)] for row in tok]
             for tok in scales.tolist()]
    return torch.exp2(torch.tensor(words, dtype=torch.float64).reshape(*scales.shape[:2], 4 * scales.shape[2]) - 127)


def compiled(fn, *args):
    lower_graph_testing(fn, *args, expected_before=[OP], unexpected_after=[OP, "dsv4_compat::"])
    torch._dynamo.reset()
    before = dsv4_compile.all_reports()
    with dsv4_compile.cuda_compat("cpu"):
        out = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(*args)
    (report,) = reports_since(before)
    assert report["o_proj"].matched >= 1 and report["audit"].matched == 0
    return out


def test_native_takes_vllms_schema():
    schema = torch.ops.vllm.fused_inv_rope_fp8_quant_kernel.default._schema
    assert [a.name for a in schema.arguments] == list(inspect.signature(o_proj.fused_inv_rope_fp8_quant_native)
                                                      .parameters)
    assert LOWERINGS[OP].family == "o_proj"


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["fp32-scales", "ue8m0"])
@pytest.mark.parametrize("t", [0, 1, 6])
def test_quantised_output_dequantises_to_the_cpu_kernels_rotation(t, packed):
    o, positions, cache = inputs(t)
    wrapper = vllms_inv_rope_quant()

    def quantise(o, positions, cache):
        return wrapper(o, positions, cache, GROUPS, HEADS_PER_GROUP, NOPE, ROPE, 128, tma_aligned_scales=packed)

    out, scales = compiled(quantise, o, positions, cache)
    assert out.shape == (t, GROUPS, WIDTH) and out.dtype == torch.float8_e4m3fn
    assert scales.shape == (t, GROUPS, WIDTH // 128 // (4 if packed else 1))
    assert scales.dtype == (torch.int32 if packed else torch.float32)
    expected = cpu_derotated(o, positions, cache).double().unflatten(-1, (-1, 128))
    s = block_scales(scales, packed).unsqueeze(-1)
    dequantised = out.double().unflatten(-1, (-1, 128)) * s
    absmax = expected.abs().amax(-1, keepdim=True)
    assert (absmax <= 448 * s * (1 + 1e-6)).all() and (absmax > 224 * s * (1 - 1e-6)).all()  # tightest power of 2
    assert ((dequantised - expected).abs() <= expected.abs() * 2.0**-4 * 1.001 + s * 2.0**-10 + 1e-6 * absmax).all()


@needs_vllm_cpu_kernels
def test_unquantised_output_is_the_cpu_kernels_rotation():
    """bf16 only: the CPU kernel takes nothing else (fp32 is covered in tests/lowerings/test_o_proj.py)."""
    dtype = torch.bfloat16
    o, positions, cache = inputs(5, dtype, seed=1)
    wrapper = vllms_inv_rope_quant()

    def rotate(o, positions, cache):
        return wrapper(o, positions, cache, GROUPS, HEADS_PER_GROUP, NOPE, ROPE, 128, quantize=False)

    out, scales = compiled(rotate, o, positions, cache)
    assert out.dtype == dtype and scales.numel() == 0
    torch.testing.assert_close(out, cpu_derotated(o, positions, cache).to(dtype), rtol=torch.finfo(dtype).eps,
                               atol=1e-5)


class GroupedWeight(torch.nn.Module):
    """wo_a as DeepGEMM holds it: fp8 [G, lora, width] and its block scales."""

    def __init__(self, weight, weight_scale):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)


def grouped_weight(packed, seed=2):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(GROUPS, LORA, WIDTH, generator=gen) * 20).to(torch.float8_e4m3fn)
    if not packed:  # SM90: fp32 per 128 x 128 block
        scales = torch.rand(GROUPS, LORA // 128, WIDTH // 128, generator=gen) / 200 + 1e-3
        return GroupedWeight(weight, scales), scales.repeat_interleave(128, 1).repeat_interleave(128, 2)
    exponents = torch.randint(117, 122, (GROUPS, LORA, WIDTH // 128), generator=gen)  # SM100: per row, UE8M0
    words = (exponents.unflatten(-1, (-1, 4)) << (torch.arange(4) * 8)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).int()
    return GroupedWeight(weight, words), torch.exp2(exponents.double() - 127).repeat_interleave(128, 2)


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["sm90-recipe", "sm100-recipe"])
@pytest.mark.parametrize("t", [0, 5])
def test_vllms_fp8_o_proj_is_the_projection_of_the_cpu_rotation(t, packed):
    from vllm.models.deepseek_v4.nvidia.ops.o_proj import deep_gemm_fp8_o_proj

    o, positions, cache = inputs(t, seed=3)
    wo_a, weight_factors = grouped_weight(packed)
    recipe = (1, 1, 128) if packed else (1, 128, 128)

    def project(o, positions, cache):
        return deep_gemm_fp8_o_proj(o, positions, cache, wo_a, lambda z: z, n_groups=GROUPS,
                                    heads_per_group=HEADS_PER_GROUP, nope_dim=NOPE, rope_dim=ROPE, o_lora_rank=LORA,
                                    einsum_recipe=recipe, tma_aligned_scales=packed)

    z = compiled(project, o, positions, cache)
    assert z.shape == (t, GROUPS * LORA) and z.dtype == torch.bfloat16
    x = cpu_derotated(o, positions, cache).double()
    w = wo_a.weight.double() * weight_factors
    expected = torch.einsum("tgr,gdr->tgd", x, w).reshape(t, GROUPS * LORA)
    bound = (torch.einsum("tgr,gdr->tgd", x.abs(), w.abs()).reshape(t, GROUPS * LORA) * 2.0**-4
             + expected.abs() * 2.0**-8)
    assert ((z.double() - expected).abs() <= bound + 1e-3).all()


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("m", [0, 7])
def test_deep_gemm_prenorm_gemm_matches_vllms_torch_reference(m, splits):
    """vLLM's `deep_gemm.tf32_hc_prenorm_gemm`, swapped for its op while tracing, against the torch reference
    vLLM's tilelang wrappers fall back to (one split; the split partials must sum to it)."""
    deep_gemm = importlib.import_module("vllm.utils.deep_gemm")
    reference = importlib.import_module("vllm.model_executor.kernels.mhc.tilelang")._torch_hc_prenorm_gemm
    gen = torch.Generator().manual_seed(4)
    x, fn = torch.randn(m, 4 * 96, generator=gen).bfloat16(), torch.randn(24, 4 * 96, generator=gen) / 20

    def prenorm(x, fn):
        out, sqrsum = torch.empty(splits, m, 24), torch.empty(splits, m)
        deep_gemm.tf32_hc_prenorm_gemm(x, fn, out, sqrsum, splits)
        return out, sqrsum

    lower_graph_testing(prenorm, x, fn, expected_before=["dsv4_compat::tf32_hc_prenorm_gemm"],
                        unexpected_after=["dsv4_compat::"])
    torch._dynamo.reset()
    with dsv4_compile.cuda_compat("cpu"):
        out, sqrsum = torch.compile(prenorm, backend="dsv4_xpu", fullgraph=True)(x, fn)
    expected_out, expected_sqrsum = torch.empty(1, m, 24), torch.empty(1, m)
    reference(x, fn, expected_out, expected_sqrsum)
    assert out.shape == (splits, m, 24) and sqrsum.shape == (splits, m)
    torch.testing.assert_close(out.sum(0, keepdim=True), expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sqrsum.sum(0, keepdim=True), expected_sqrsum, rtol=1e-5, atol=1e-4)

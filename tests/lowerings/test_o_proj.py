"""o_proj family without vLLM: `dsv4_compat::fp8_einsum` and `dsv4_compat::tf32_hc_prenorm_gemm` through the
backend, and the native math of `vllm::fused_inv_rope_fp8_quant_kernel` (vLLM registers that op; it is compiled
through the backend in tests/vllm_real/test_lowering_o_proj.py).

Oracles, written here in fp64 from the math: block dequantisation (fp32 scales, and UE8M0 exponent bytes packed
four to an int32 word, decoded here with Python ints), einsum, split-K sums, the inverse GPT-J rotation as a
complex product by exp(-i theta), and the FP8 e4m3 rounding bound (3 mantissa bits: half an ulp is 2^-4 of the
value, 2^-10 of the scale among subnormals).
"""

import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.ops import vllm_o_proj
from dsv4_compile.frontend.ops.vllm import define_missing_ops
from dsv4_compile.lowering.lowerings.o_proj import fused_inv_rope_fp8_quant_native
from tests.conftest import lower_graph_testing, reports_since

define_missing_ops()  # the ops vLLM's CUDA build has, without importing vLLM in this process

EINSUM, PRENORM = "dsv4_compat::fp8_einsum", "dsv4_compat::tf32_hc_prenorm_gemm"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
BF16_EPS = torch.finfo(torch.bfloat16).eps


# ----------------------------------------------------------------------------- fp64 oracles
def pack_words(exponents):
    """int32 words of four exponent bytes (block 4j + i in byte i of word j), with Python ints."""
    width = exponents.shape[-1]
    rows = exponents.reshape(-1, width).tolist()
    words = [[sum(int(b) << (8 * i) for i, b in enumerate(row[j:j + 4])) for j in range(0, width, 4)]
             for row in rows]
    signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]
    return torch.tensor(signed, dtype=torch.int32).reshape(*exponents.shape[:-1], width // 4)


def blockwise64(data, scales, blocks):
    """data * scales, each scale repeated over a block of `blocks[d]` entries along dim d; fp64."""
    factors = scales.double()
    for dim, size in enumerate(blocks):
        factors = factors.repeat_interleave(size, dim)
    return data.double() * factors[tuple(slice(0, s) for s in data.shape)]


def inv_rope64(o, positions, cache, nope, half):
    x = o.double().clone()
    cos, sin = cache[positions.long(), :half].double(), cache[positions.long(), half:].double()
    pairs = torch.complex(x[..., nope::2], x[..., nope + 1::2])
    turned = pairs * torch.complex(cos, -sin).unsqueeze(1)  # multiply by exp(-i theta)
    x[..., nope::2], x[..., nope + 1::2] = turned.real, turned.imag
    return x


# ----------------------------------------------------------------------------- fp8_einsum
def einsum_operands(b, h, d, r, packed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(b, h, r, generator=gen) * 30).to(torch.float8_e4m3fn)
    w = (torch.randn(h, d, r, generator=gen) * 30).to(torch.float8_e4m3fn)
    if not packed:  # recipe (1, 128, 128): a per token and 128 of r, w per 128 x 128
        sa = torch.rand(b, h, r // 128, generator=gen) / 100 + 1e-3
        sw = torch.rand(h, -(-d // 128), r // 128, generator=gen) / 100 + 1e-3
        return (a, sa, w, sw), (a, sa, (1, 1, 128)), (w, sw, (1, 128, 128)), [1, 128, 128]
    ea = torch.randint(118, 130, (b, h, r // 128), generator=gen)
    ew = torch.randint(118, 130, (h, d, r // 128), generator=gen)
    aligned = -(-b // 4) * 4  # MN-major, token dim padded as DeepGEMM wants it
    storage = torch.zeros(h, r // 512, aligned, dtype=torch.int32)
    storage[:, :, :b] = pack_words(ea).permute(1, 2, 0)
    sa = storage.permute(2, 0, 1)[:b]
    sw = pack_words(ew)
    return ((a, sa, w, sw), (a, torch.exp2(ea - 127.0), (1, 1, 128)), (w, torch.exp2(ew - 127.0), (1, 1, 128)),
            [1, 1, 128])


def einsum64(a_spec, w_spec, c=None):
    result = torch.einsum("bhr,hdr->bhd", blockwise64(*a_spec), blockwise64(*w_spec))
    return result if c is None else result + c.double()


def o_proj_einsum(a, sa, w, sw, recipe):
    z = torch.empty(a.shape[0], a.shape[1], w.shape[1], dtype=torch.bfloat16)
    vllm_o_proj.fp8_einsum("bhr,hdr->bhd", (a, sa), (w, sw), z, recipe=recipe)
    return z


@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("packed", [False, True], ids=["fp32-scales", "ue8m0"])
def test_fp8_einsum_dequantises_each_block(packed, b):
    operands, a_spec, w_spec, recipe = einsum_operands(b, 3, 192, 512, packed)
    lo = lower_graph_testing(o_proj_einsum, *operands, recipe, expected_before=[EINSUM],
                             expected_after=["fp8_einsum_native"], unexpected_after=[EINSUM])
    assert lo.report["o_proj"].matched == 1
    (z,) = lo.run()
    assert z.shape == (b, 3, 192) and z.dtype == torch.bfloat16
    # fp32 math against fp64, rounded once to bf16
    torch.testing.assert_close(z, einsum64(a_spec, w_spec).to(torch.bfloat16), rtol=BF16_EPS, atol=1e-3)


def test_fp8_einsum_adds_c_and_compiles():
    operands, a_spec, w_spec, recipe = einsum_operands(4, 2, 128, 256, False, seed=1)
    c = torch.randn(4, 2, 128).bfloat16()

    def accumulate(a, sa, w, sw, c):
        vllm_o_proj.fp8_einsum("bhr,hdr->bhd", (a, sa), (w, sw), c, c=c, recipe=recipe)
        return c

    expected = einsum64(a_spec, w_spec, c).to(torch.bfloat16)
    before = dsv4_compile.all_reports()
    out = torch.compile(accumulate, backend="dsv4_xpu", fullgraph=True)(*operands, c)
    (report,) = reports_since(before)
    assert report["o_proj"].matched == 1 and report["audit"].matched == 0
    assert out is c
    torch.testing.assert_close(c, expected, rtol=BF16_EPS, atol=1e-3)


def test_fp8_einsum_refuses_scales_that_do_not_fit():
    (a, _, w, sw), *_ = einsum_operands(2, 2, 128, 256, False)
    with pytest.raises(Exception, match=r"a_scale has shape \(2, 2, 3\), expected \(2, 2, 2\)"):
        lower_graph_testing(o_proj_einsum, a, torch.ones(2, 2, 3), w, sw, [1, 128, 128])


# ----------------------------------------------------------------------------- tf32_hc_prenorm_gemm
@pytest.mark.parametrize(("m", "k", "splits"), [(0, 64, 4), (5, 100, 3), (6, 256, 1), (3, 64, None)])
def test_prenorm_gemm_splits_sum_to_the_product_and_the_square_sum(m, k, splits):
    gen = torch.Generator().manual_seed(2)
    x, fn = torch.randn(m, k, generator=gen).bfloat16(), torch.randn(24, k, generator=gen) / k ** 0.5
    lead = () if splits is None else (splits,)

    def prenorm(x, fn):
        out = torch.empty(*lead, m, 24)
        sqrsum = torch.empty(*lead, m)
        vllm_o_proj.tf32_hc_prenorm_gemm(x, fn, out, sqrsum, splits)
        return out, sqrsum

    lo = lower_graph_testing(prenorm, x, fn, expected_before=[PRENORM], unexpected_after=[PRENORM])
    out, sqrsum = lo.run()
    assert out.shape == (*lead, m, 24) and sqrsum.shape == (*lead, m)
    if splits is not None:
        out, sqrsum = out.sum(0), sqrsum.sum(0)
    torch.testing.assert_close(out.double(), x.double() @ fn.double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sqrsum.double(), x.double().square().sum(-1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fused inverse RoPE + FP8 (native)
def inv_rope_inputs(t, groups=2, heads_per_group=2, nope=192, half=32, dtype=torch.bfloat16, seed=3):
    gen = torch.Generator().manual_seed(seed)
    o = (torch.randn(t, groups * heads_per_group, nope + 2 * half, generator=gen) * 3).to(dtype)
    o[:, 0, :128] *= 1e-3  # a block of small values: subnormal quantised values
    angles = torch.arange(64).reshape(-1, 1).double() * torch.logspace(0, -3, half, dtype=torch.float64)
    cache = torch.cat((angles.cos(), angles.sin()), -1).float()
    positions = torch.randint(0, 64, (t,), generator=gen)
    return o, positions, cache


def run_native(o, positions, cache, groups, heads_per_group, half, tma, quantize=True, group_size=128):
    t, _, head_dim = o.shape
    chunks = head_dim // group_size
    blocks = heads_per_group * chunks
    aligned = -(-t // 4) * 4
    inner = (-(-blocks // 4) if tma else blocks) if quantize else 0
    return fused_inv_rope_fp8_quant_native(o, positions, cache, heads_per_group, group_size, chunks,
                                           head_dim - 2 * half, half, tma, FP8_MAX, aligned, t, groups,
                                           heads_per_group * head_dim, inner, quantize)


@pytest.mark.parametrize("t", [0, 1, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_inverse_rope_then_fp8_blocks_with_power_of_two_scales(dtype, t):
    o, positions, cache = inv_rope_inputs(t, dtype=dtype)
    out, scales = run_native(o, positions, cache, 2, 2, 32, tma=False)
    aligned = -(-t // 4) * 4
    assert out.shape == (2, t, 512) and out.dtype == torch.float8_e4m3fn
    assert scales.shape == (2, t, 4) and scales.dtype == torch.float32
    assert t == 0 or scales.stride() == (4 * aligned, 1, aligned)
    storage = torch.as_strided(scales, (2, 4, aligned), (4 * aligned, aligned, 1))
    assert (storage[..., t:] == 0).all()  # the token padding of the MN-major layout
    expected = inv_rope64(o, positions, cache, 192, 32).reshape(t, 2, 512).transpose(0, 1)
    blocks = expected.unflatten(-1, (4, 128))
    absmax = blocks.abs().amax(-1)
    s = scales.double()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    assert (absmax <= FP8_MAX * s * (1 + 1e-6)).all() and (absmax > FP8_MAX * s / 2 * (1 - 1e-6)).all()
    dequantised = out.double().unflatten(-1, (4, 128)) * s.unsqueeze(-1)
    bound = blocks.abs() * 2.0**-4 * 1.001 + s.unsqueeze(-1) * 2.0**-10 + 1e-6 * absmax.unsqueeze(-1)
    assert ((dequantised - blocks).abs() <= bound).all()


def test_packed_scales_hold_the_exponent_bytes():
    o, positions, cache = inv_rope_inputs(5, heads_per_group=4, nope=448)
    out, scales = run_native(o, positions, cache, 2, 4, 32, tma=False, group_size=128)
    packed_out, words = run_native(o, positions, cache, 2, 4, 32, tma=True, group_size=128)
    assert torch.equal(out.view(torch.uint8), packed_out.view(torch.uint8))
    assert words.shape == (2, 5, 4) and words.dtype == torch.int32 and words.stride() == (32, 1, 8)
    exponents = torch.log2(scales.double()).round().long() + 127
    assert torch.equal(words, pack_words(exponents))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_without_quantisation_the_rotation_is_returned_in_the_input_dtype(dtype):
    o, positions, cache = inv_rope_inputs(3, dtype=dtype)
    out, scales = run_native(o, positions, cache, 2, 2, 32, tma=False, quantize=False)
    assert out.dtype == dtype and out.shape == (2, 3, 512) and scales.numel() == 0
    expected = inv_rope64(o, positions, cache, 192, 32).reshape(3, 2, 512).transpose(0, 1)
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert torch.equal(out[..., :192], o.reshape(3, 2, 512).transpose(0, 1)[..., :192])  # nope dims untouched


def test_inverse_rope_undoes_the_forward_rotation():
    o, positions, cache = inv_rope_inputs(4, dtype=torch.float32)
    x = o.double().clone()
    theta = torch.atan2(cache[positions, 32:].double(), cache[positions, :32].double()).unsqueeze(1)
    pairs = torch.polar(torch.ones_like(theta), theta) * torch.complex(x[..., 192::2], x[..., 193::2])
    x[..., 192::2], x[..., 193::2] = pairs.real, pairs.imag
    rotated = x.float()
    out, _ = run_native(rotated, positions, cache, 2, 2, 32, tma=False, quantize=False)
    torch.testing.assert_close(out.transpose(0, 1).reshape(o.shape), o, rtol=1e-5, atol=1e-5)

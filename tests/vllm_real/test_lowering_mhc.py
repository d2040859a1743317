"""mHC family on vLLM's own ops: `torch.ops.vllm.*_tilelang` calls compiled with dsv4_xpu on CPU, checked
against vLLM's torch references (kernels/mhc/torch.py, `vllm.ir` rms_norm) and its CPU kernels
(`_C::hc_pre_fused_cpu`, `hc_post_fused_cpu`, `hc_head_fused_cpu`), never against the lowerings themselves.

The tilelang kernels and vLLM's references take bf16 streams, so the pre ops are tested in bf16 (the post
reference also takes fp32). Tolerances: fp32 gates 1e-5; a bf16 stream value within one bf16 ulp; a layer
input with the RMSNorm fused in within two (the kernel rounds once after the weight, the reference rounds the
normalised value and the product separately).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import dsv4_compile
from dsv4_compile.lowering.lowerings import mhc_vllm  # noqa: F401  (registers the lowerings)
from dsv4_compile.lowering.registry import LOWERINGS
from tests.conftest import lower_graph_testing, reports_since
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

M, H = 4, 64
RMS_EPS, PRE_EPS, SINKHORN_EPS, NORM_EPS, POST_MULT = 0.1, 0.03, 0.01, 0.2, 1.5
OPS = ("mhc_pre_tilelang", "mhc_post_tilelang", "mhc_fused_post_pre_tilelang", "hc_head_fused_kernel_tilelang",
       "mhc_pre_delayed_tilelang", "mhc_fused_post_pre_delayed_tilelang")
BF16_ULP = torch.finfo(torch.bfloat16).eps


def reference():
    """vllm/model_executor/kernels/mhc/torch.py (the package re-exports names that shadow `torch`)."""
    return importlib.import_module("vllm.model_executor.kernels.mhc.torch")


def rms_norm(x, weight, eps):
    from vllm import ir

    return ir.ops.rms_norm(x, weight, eps)


def pre_params(gen, width=M * H, scale_size=3, mixes=M * (M + 2)):
    fn = torch.randn(mixes, width, generator=gen) / width ** 0.5
    return fn, 0.5 + torch.rand(scale_size, generator=gen), 0.5 * torch.randn(mixes, generator=gen)


def post_inputs(shape, dtype, gen):
    return (torch.randn(*shape, H, generator=gen).to(dtype), torch.randn(*shape, M, H, generator=gen).to(dtype),
            2 * torch.rand(*shape, M, 1, generator=gen), torch.rand(*shape, M, M, generator=gen).softmax(-1))


def close_stream(actual, expected, ulps=1):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulps * BF16_ULP, atol=1e-5)


def close_weights(actual, expected):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def compiled(fn, *args, ops, calls=None):
    """`fn(*args)` compiled with dsv4_xpu; asserts the ops were in the captured graph and are gone (all
    `calls` of them, one each by default)."""
    names = [f"vllm::{op}" for op in ops]
    lower_graph_testing(fn, *args, expected_before=names, unexpected_after=names)
    torch._dynamo.reset()
    before = dsv4_compile.all_reports()
    out = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(*args)
    (report,) = reports_since(before)
    assert report["mhc"].matched == (calls or len(ops)) and report["audit"].matched == 0
    return out


def test_native_functions_take_vllms_schemas():
    for op in OPS:
        schema = getattr(torch.ops.vllm, op).default._schema
        lowering = LOWERINGS[f"vllm::{op}"]
        names = [a.name for a in schema.arguments if a.name not in lowering.ignores]
        assert names == list(inspect.signature(lowering.native).parameters), op
    assert "tile_n" in LOWERINGS["vllm::mhc_fused_post_pre_tilelang"].ignores


@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3)], ids=["T0", "T5", "2x3"])
@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
def test_pre_post_fused_match_vllms_torch_reference(shape, normed):
    gen = torch.Generator().manual_seed(0)
    (x, residual, post, comb), (fn, scale, base) = post_inputs(shape, torch.bfloat16, gen), pre_params(gen)
    weight = (1 + 0.5 * torch.randn(H, generator=gen)).bfloat16() if normed else None

    def layer(x, residual, post, comb, fn, scale, base, weight):
        ops = torch.ops.vllm
        pre = ops.mhc_pre_tilelang(residual, fn, scale, base, RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT, 3,
                                   norm_weight=weight, norm_eps=NORM_EPS)
        new = ops.mhc_post_tilelang(x, residual, post, comb)
        fused = ops.mhc_fused_post_pre_tilelang(x, residual, post, comb, fn, scale, base, RMS_EPS, PRE_EPS,
                                                SINKHORN_EPS, POST_MULT, 3, 1, 1, weight, NORM_EPS)
        return pre, new, fused

    pre, new, fused = compiled(layer, x, residual, post, comb, fn, scale, base, weight, ops=OPS[:3])
    ref = reference()

    def pre_reference(stream):
        p, c, li = ref.mhc_pre_torch(stream, fn, scale, base, RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT, 3)
        return p, c, (li if weight is None else rms_norm(li, weight, NORM_EPS))

    ulps = 2 if normed else 1
    for actual, expected in ((pre, pre_reference(residual)), (fused[1:], pre_reference(fused[0]))):
        close_weights(actual[0], expected[0])
        close_weights(actual[1], expected[1])
        close_stream(actual[2], expected[2], ulps)
    expected_new = ref.mhc_post_torch(x, residual, post, comb)
    close_stream(new, expected_new)
    close_stream(fused[0], expected_new)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_post_matches_the_reference_with_extra_leading_dims(dtype):
    x, residual, post, comb = post_inputs((2, 3), dtype, torch.Generator().manual_seed(1))
    out = compiled(lambda *a: torch.ops.vllm.mhc_post_tilelang(*a), x, residual, post, comb, ops=OPS[1:2])
    expected = reference().mhc_post_torch(x, residual, post, comb)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:
        close_stream(out, expected)


@pytest.mark.parametrize("t", [0, 7])
@pytest.mark.parametrize("carried", [False, True], ids=["stream0", "carried"])
@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
def test_delayed_ops_match_vllms_torch_reference(t, carried, normed):
    gen = torch.Generator().manual_seed(2)
    (x, residual, post, comb), (fn, scale, base) = post_inputs((t,), torch.bfloat16, gen), pre_params(gen)
    embedding = torch.randn(t, H, generator=gen).bfloat16()
    narrow_fn, _, _ = pre_params(gen, width=H)
    pre_mix = torch.rand(t, M, generator=gen) if carried else None
    weight = (1 + 0.5 * torch.randn(H, generator=gen)).bfloat16() if normed else None
    eps = (RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT, 2)

    def layer(x, residual, post, comb, fn, narrow_fn, scale, base, embedding, pre_mix, weight):
        ops = torch.ops.vllm
        plain = ops.mhc_pre_delayed_tilelang(residual, fn, scale, base, *eps, pre_mix, None, weight, NORM_EPS)
        projected = ops.mhc_pre_delayed_tilelang(residual, narrow_fn, scale, base, *eps, pre_mix, embedding,
                                                 weight, NORM_EPS)
        fused = ops.mhc_fused_post_pre_delayed_tilelang(x, residual, post, comb, fn, scale, base, *eps, pre_mix,
                                                        weight, NORM_EPS, True)
        return plain, projected, fused

    plain, projected, fused = compiled(layer, x, residual, post, comb, fn, narrow_fn, scale, base, embedding,
                                       pre_mix, weight, ops=OPS[4:], calls=3)
    ref = reference()

    def delayed_reference(stream, projection, source):
        p, c, li, nxt = ref.mhc_pre_delayed_torch(stream, projection, scale, base, *eps, pre_mix=pre_mix, x=source)
        return p, c, (li if weight is None else rms_norm(li, weight, NORM_EPS)), nxt

    new = ref.mhc_post_torch(x, residual, post, comb)
    close_stream(fused[0], new)
    cases = ((plain, delayed_reference(residual, fn, None)), (projected, delayed_reference(residual, narrow_fn,
             embedding)), (fused[1:5], delayed_reference(new, fn, None)))
    for actual, expected in cases:
        close_weights(actual[0], expected[0])
        close_weights(actual[1], expected[1])
        close_stream(actual[2], expected[2], 2 if normed else 1)
        close_weights(actual[3], expected[3])
    close_stream(fused[5], new.float().mean(1).bfloat16())


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("shape", [(1,), (9,), (2, 3)], ids=["T1", "T9", "2x3"])
def test_compiled_ops_match_vllms_cpu_kernels(shape):
    # hc_pre_fused_cpu has one eps for the pre gates and Sinkhorn and a post multiplier of 2; it takes no
    # empty batch. hc_head_fused_cpu takes (hc_eps, norm_eps): the reverse of the tilelang op's order.
    gen = torch.Generator().manual_seed(3)
    (x, residual, post, comb), (fn, scale, base) = post_inputs(shape, torch.bfloat16, gen), pre_params(gen)
    head_fn, head_scale, head_base = pre_params(gen, scale_size=1, mixes=M)

    def layer(x, residual, post, comb, fn, scale, base, head_fn, head_scale, head_base):
        ops = torch.ops.vllm
        pre = ops.mhc_pre_tilelang(residual, fn, scale, base, RMS_EPS, PRE_EPS, PRE_EPS, 2.0, 4)
        new = ops.mhc_post_tilelang(x, residual, post, comb)
        head = ops.hc_head_fused_kernel_tilelang(new.flatten(0, -3), head_fn, head_scale, head_base, RMS_EPS,
                                                 PRE_EPS)
        return pre, new, head

    args = (x, residual, post, comb, fn, scale, base, head_fn, head_scale, head_base)
    (post_mix, comb_mix, layer_input), new, head = compiled(layer, *args, ops=(OPS[0], OPS[1], OPS[3]))
    streams = residual.reshape(-1, M, H)
    c_input, c_post, c_comb = torch.ops._C.hc_pre_fused_cpu(streams, fn, scale, base, M, 4, RMS_EPS, PRE_EPS)
    close_weights(post_mix, c_post.reshape(*shape, M, 1))
    close_weights(comb_mix, c_comb.reshape(*shape, M, M))
    close_stream(layer_input, c_input.reshape(*shape, H))
    c_new = torch.ops._C.hc_post_fused_cpu(x.reshape(-1, H), streams, post.reshape(-1, M), comb.reshape(-1, M, M))
    close_stream(new, c_new.reshape(residual.shape))
    c_head = torch.ops._C.hc_head_fused_cpu(new.reshape(-1, M, H), head_fn, head_scale, head_base, PRE_EPS,
                                            RMS_EPS)
    close_stream(head, c_head)


@pytest.mark.parametrize("t", [0, 6])
def test_broadcast_substitute_matches_the_reference_on_copied_streams(t):
    from dsv4_compile.frontend.kernel_wrappers import vllm_substitutes

    substitute = vllm_substitutes()["vllm.model_executor.kernels.mhc.tilelang.mhc_pre_broadcast_tilelang"]
    gen = torch.Generator().manual_seed(4)
    embedding = torch.randn(t, H, generator=gen).bfloat16()
    fn, scale, base = pre_params(gen)
    weight = (1 + 0.5 * torch.randn(H, generator=gen)).bfloat16()
    fn_broadcast = fn.view(-1, M, H).sum(1)  # as DeepseekV4Model.finalize_mhc_broadcast_weights makes it

    def first_layer(embedding, fn, scale, base, weight, fn_broadcast):
        return substitute(embedding, fn, scale, base, RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT, 3,
                          norm_weight=weight, norm_eps=NORM_EPS, fn_broadcast=fn_broadcast)

    streams, post, comb, layer_input = compiled(first_layer, embedding, fn, scale, base, weight, fn_broadcast,
                                                ops=OPS[4:5])
    expected_streams = embedding.unsqueeze(1).expand(t, M, H)
    assert torch.equal(streams, expected_streams)
    p, c, li = reference().mhc_pre_torch(expected_streams.contiguous(), fn, scale, base, RMS_EPS, PRE_EPS,
                                         SINKHORN_EPS, POST_MULT, 3)
    close_weights(post, p)
    close_weights(comb, c)
    close_stream(layer_input, rms_norm(li, weight, NORM_EPS), 2)
    with pytest.raises(ValueError, match="fn_broadcast"):
        substitute(embedding, fn, scale, base, RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT, 3, norm_weight=weight)

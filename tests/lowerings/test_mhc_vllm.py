"""mHC family, vLLM's `vllm::*_tilelang` ops: the native functions against the math written here in fp64.

The vllm:: ops exist only where vLLM is installed, so these tests call the native functions directly; the
compiled path and vLLM's own references are tested in tests/vllm_real/test_lowering_mhc.py.
Every eps differs from the others (and from the model's) so that one used in another's place shows.
"""

import pytest
import torch

from dsv4_compile.lowering.lowerings import mhc_vllm
from dsv4_compile.lowering.registry import LOWERINGS

M, H = 4, 32
RMS_EPS, PRE_EPS, SINKHORN_EPS, NORM_EPS, POST_MULT = 0.1, 0.03, 0.01, 0.2, 1.5
EPS_ARGS = (RMS_EPS, PRE_EPS, SINKHORN_EPS, POST_MULT)
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


# ----------------------------------------------------------------------------- fp64 math
def gates64(flat, fn, scale, base, repeat):
    """pre, post [N, m], comb [N, m, m] from the projection of `flat [N, K]`."""
    flat, scale, base = flat.double(), scale.double(), base.double()
    mix = (flat @ fn.double().T) / torch.sqrt(flat.square().mean(-1, keepdim=True) + RMS_EPS)
    pre = torch.sigmoid(mix[:, :M] * scale[0] + base[:M]) + PRE_EPS
    post = torch.sigmoid(mix[:, M:2 * M] * scale[1] + base[M:2 * M]) * POST_MULT
    comb = torch.softmax((mix[:, 2 * M:] * scale[2] + base[2 * M:]).reshape(-1, M, M), -1) + SINKHORN_EPS
    comb = comb / (comb.sum(-2, keepdim=True) + SINKHORN_EPS)
    for _ in range(repeat - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + SINKHORN_EPS)
        comb = comb / (comb.sum(-2, keepdim=True) + SINKHORN_EPS)
    return pre, post, comb


def collapse64(weights, streams):
    return (weights.double()[..., None] * streams.double()).sum(-2)


def post64(x, residual, post, comb):
    mixed = (comb.double()[..., None] * residual.double()[..., :, None, :]).sum(-3)
    return post.double().reshape(*residual.shape[:-1], 1) * x.double()[..., None, :] + mixed


def rms_norm64(value, weight):
    value = value.double()
    return value / torch.sqrt(value.square().mean(-1, keepdim=True) + NORM_EPS) * weight.double()


def layer_input64(collapsed64, dtype, weight):
    """The kernels round the collapse to the stream dtype before normalising it."""
    return collapsed64 if weight is None else rms_norm64(collapsed64.to(dtype), weight.to(dtype))


# ----------------------------------------------------------------------------- inputs and checks
def pre_params(gen, width=M * H):
    mixes = M * (M + 2)
    fn = torch.randn(mixes, width, generator=gen) / width ** 0.5
    return fn, 0.5 + torch.rand(3, generator=gen), 0.5 * torch.randn(mixes, generator=gen)


def streams(shape, dtype, gen):
    return torch.randn(*shape, M, H, generator=gen).to(dtype)


def post_inputs(shape, dtype, gen):
    return (torch.randn(*shape, H, generator=gen).to(dtype), streams(shape, dtype, gen),
            2 * torch.rand(*shape, M, 1, generator=gen), torch.rand(*shape, M, M, generator=gen).softmax(-1))


def norm_weight(gen, dtype):
    return (1 + 0.5 * torch.randn(H, generator=gen)).to(dtype)


def check_stream(actual, expected64, dtype, ulps=1):
    """Stream values: fp32 math against fp64, or within `ulps` of the fp64 value rounded to bf16."""
    assert actual.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(actual.double(), expected64.to(dtype).double(),
                                   rtol=ulps * torch.finfo(dtype).eps, atol=1e-5)


def check_weights(actual, expected64, shape):
    assert actual.dtype == torch.float32 and actual.shape == shape
    torch.testing.assert_close(actual.double(), expected64.reshape(shape), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tests
def test_each_vllm_op_is_registered_in_the_mhc_family_and_aiter_is_not():
    expected = {
        "vllm::mhc_pre_tilelang": ("n_splits",), "vllm::mhc_post_tilelang": (),
        "vllm::mhc_fused_post_pre_tilelang": ("n_splits", "tile_n"), "vllm::hc_head_fused_kernel_tilelang": (),
        "vllm::mhc_pre_delayed_tilelang": (), "vllm::mhc_fused_post_pre_delayed_tilelang": (),
    }
    for qualname, ignores in expected.items():
        lowering = LOWERINGS[qualname]
        assert (lowering.family, lowering.ignores, lowering.out, lowering.mutates) == ("mhc", ignores, None, ())
    assert not [name for name in LOWERINGS if "aiter" in name]


@DTYPES
@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3)], ids=["T0", "T5", "2x3"])
@pytest.mark.parametrize("repeat", [1, 3])
@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
def test_pre_matches_the_math(dtype, shape, repeat, normed):
    gen = torch.Generator().manual_seed(0)
    residual, (fn, scale, base) = streams(shape, dtype, gen), pre_params(gen)
    weight = norm_weight(gen, dtype) if normed else None
    post, comb, layer_input = mhc_vllm.mhc_pre_tilelang_native(residual, fn, scale, base, *EPS_ARGS, repeat,
                                                                norm_weight=weight, norm_eps=NORM_EPS)
    flat = residual.reshape(-1, M, H)
    pre64, post64_, comb64 = gates64(flat.flatten(1), fn, scale, base, repeat)
    check_weights(post, post64_, (*shape, M, 1))
    check_weights(comb, comb64, (*shape, M, M))
    assert layer_input.shape == (*shape, H)
    expected = layer_input64(collapse64(pre64, flat), dtype, weight).reshape(*shape, H)
    check_stream(layer_input, expected, dtype, ulps=2 if normed else 1)


def test_sinkhorn_repeat_zero_normalises_the_columns_once_like_the_kernels():
    gen = torch.Generator().manual_seed(1)
    residual, (fn, scale, base) = streams((3,), torch.float32, gen), pre_params(gen)
    zero = mhc_vllm.mhc_pre_tilelang_native(residual, fn, scale, base, *EPS_ARGS, 0)
    one = mhc_vllm.mhc_pre_tilelang_native(residual, fn, scale, base, *EPS_ARGS, 1)
    for a, b in zip(zero, one, strict=True):
        assert torch.equal(a, b)
    check_weights(zero[1], gates64(residual.flatten(1), fn, scale, base, 1)[2], (3, M, M))


@DTYPES
@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3)], ids=["T0", "T5", "2x3"])
@pytest.mark.parametrize("post_rank", ["m1", "m"])
def test_post_matches_the_math(dtype, shape, post_rank):
    x, residual, post, comb = post_inputs(shape, dtype, torch.Generator().manual_seed(2))
    if post_rank == "m":
        post = post.squeeze(-1)
    out = mhc_vllm.mhc_post_tilelang_native(x, residual, post, comb)
    assert out.shape == residual.shape
    check_stream(out, post64(x, residual, post, comb), dtype)


@DTYPES
@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3)], ids=["T0", "T5", "2x3"])
@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
def test_fused_post_pre_is_post_then_pre_on_the_rounded_stream(dtype, shape, normed):
    gen = torch.Generator().manual_seed(3)
    (x, residual, post, comb), (fn, scale, base) = post_inputs(shape, dtype, gen), pre_params(gen)
    weight = norm_weight(gen, dtype) if normed else None
    new, post_next, comb_next, layer_input = mhc_vllm.mhc_fused_post_pre_tilelang_native(
        x, residual, post, comb, fn, scale, base, *EPS_ARGS, 2, norm_weight=weight, norm_eps=NORM_EPS)
    check_stream(new, post64(x, residual, post, comb), dtype)
    flat = new.reshape(-1, M, H)  # the next pre reads the stream as the post rounded it
    pre64, post64_, comb64 = gates64(flat.flatten(1), fn, scale, base, 2)
    check_weights(post_next, post64_, (*shape, M, 1))
    check_weights(comb_next, comb64, (*shape, M, M))
    expected = layer_input64(collapse64(pre64, flat), dtype, weight).reshape(*shape, H)
    check_stream(layer_input, expected, dtype, ulps=2 if normed else 1)


@DTYPES
@pytest.mark.parametrize("t", [0, 6])
def test_head_matches_the_math(dtype, t):
    gen = torch.Generator().manual_seed(4)
    hs = streams((t,), dtype, gen)
    fn, scale, base = torch.randn(M, M * H, generator=gen) / H, 0.5 + torch.rand(1, generator=gen), torch.randn(M)
    out = mhc_vllm.hc_head_fused_kernel_tilelang_native(hs, fn, scale, base, RMS_EPS, PRE_EPS)
    flat = hs.flatten(1).double()
    mix = (flat @ fn.double().T) / torch.sqrt(flat.square().mean(-1, keepdim=True) + RMS_EPS)
    gates = torch.sigmoid(mix * scale.double() + base.double()) + PRE_EPS
    assert out.shape == (t, H)
    check_stream(out, collapse64(gates, hs), dtype)


@DTYPES
@pytest.mark.parametrize("t", [0, 5])
@pytest.mark.parametrize("carried", [False, True], ids=["stream0", "carried"])
@pytest.mark.parametrize("projected", [False, True], ids=["streams", "x"])
@pytest.mark.parametrize("normed", [False, True], ids=["raw", "normed"])
def test_pre_delayed_matches_the_math(dtype, t, carried, projected, normed):
    gen = torch.Generator().manual_seed(5)
    residual = streams((t,), dtype, gen)
    x = torch.randn(t, H, generator=gen).to(dtype) if projected else None  # a projection input narrower than m*H
    fn, scale, base = pre_params(gen, width=H if projected else M * H)
    pre_mix = torch.rand(t, M, generator=gen) if carried else None
    weight = norm_weight(gen, dtype) if normed else None
    post, comb, layer_input, next_pre = mhc_vllm.mhc_pre_delayed_tilelang_native(
        residual, fn, scale, base, *EPS_ARGS, 3, pre_mix, x, weight, NORM_EPS)
    pre64, post64_, comb64 = gates64((x if projected else residual.flatten(1)), fn, scale, base, 3)
    check_weights(next_pre, pre64, (t, M))
    check_weights(post, post64_, (t, M, 1))
    check_weights(comb, comb64, (t, M, M))
    collapsed = collapse64(pre_mix, residual) if carried else residual[:, 0].double()
    check_stream(layer_input, layer_input64(collapsed, dtype, weight), dtype, ulps=2 if normed else 1)
    if not carried and not normed:
        assert torch.equal(layer_input, residual[:, 0])


@DTYPES
@pytest.mark.parametrize("t", [0, 5])
@pytest.mark.parametrize("capture_aux", [False, True])
def test_fused_post_pre_delayed_matches_the_math(dtype, t, capture_aux):
    gen = torch.Generator().manual_seed(6)
    (x, residual, post, comb), (fn, scale, base) = post_inputs((t,), dtype, gen), pre_params(gen)
    pre_mix, weight = torch.rand(t, M, generator=gen), norm_weight(gen, dtype)
    new, post_next, comb_next, layer_input, next_pre, aux = (
        mhc_vllm.mhc_fused_post_pre_delayed_tilelang_native(
            x, residual, post, comb, fn, scale, base, *EPS_ARGS, 2, pre_mix, weight, NORM_EPS, capture_aux))
    check_stream(new, post64(x, residual, post, comb), dtype)
    pre64, post64_, comb64 = gates64(new.flatten(1), fn, scale, base, 2)
    check_weights(next_pre, pre64, (t, M))
    check_weights(post_next, post64_, (t, M, 1))
    check_weights(comb_next, comb64, (t, M, M))
    check_stream(layer_input, layer_input64(collapse64(pre_mix, new), dtype, weight), dtype, ulps=2)
    assert aux.dtype == dtype and aux.shape == ((t, H) if capture_aux else (0, H))
    if capture_aux:
        check_stream(aux, new.double().mean(1), dtype)


def test_checks_refuse_operands_the_kernels_refuse():
    gen = torch.Generator().manual_seed(7)
    residual, (fn, scale, base) = streams((2,), torch.bfloat16, gen), pre_params(gen)
    mhc_vllm.check_gate_arguments(residual, fn, scale, base)
    bad = [
        dict(residual=residual, fn=fn[:, :-1], hc_scale=scale, hc_base=base),
        dict(residual=residual, fn=fn, hc_scale=scale[:2], hc_base=base),
        dict(residual=residual, fn=fn, hc_scale=scale, hc_base=base, norm_weight=torch.ones(H + 1)),
        dict(residual=residual, fn=fn, hc_scale=scale, hc_base=base, pre_mix=torch.ones(2, M + 1)),
        dict(residual=residual, fn=fn, hc_scale=scale, hc_base=base, x=torch.ones(2, H)),  # fn is m*H wide
        dict(residual=residual[0], fn=fn, hc_scale=scale, hc_base=base),
    ]
    for arguments in bad:
        with pytest.raises(ValueError):
            mhc_vllm.check_gate_arguments(**arguments)
    x, residual, post, comb = post_inputs((2,), torch.bfloat16, gen)
    fused = dict(residual=residual, post_layer_mix=post, comb_res_mix=comb, fn=fn, hc_scale=scale, hc_base=base)
    mhc_vllm.check_fused_arguments(x=x, **fused)
    with pytest.raises(ValueError, match="x has shape"):
        mhc_vllm.check_fused_arguments(x=x[:, :-1], **fused)
    with pytest.raises(ValueError, match="comb_res_mix"):
        mhc_vllm.check_fused_arguments(x=x, **{**fused, "comb_res_mix": comb[:, :-1]})
    with pytest.raises(ValueError, match="hs_flat"):
        mhc_vllm.check_head_arguments(residual.flatten(1), fn[:M], scale[:1], base[:M])

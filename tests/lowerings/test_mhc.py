"""mHC family: `dsv4_cuda::mhc_pre`, `mhc_post`, `mhc_fused_post_pre`, `hc_head`.

Two oracles: the math written here in fp64 from the reference (docs/dsv4-reference.md, "mHC"), and the model's
own `dsv4_compile.models.deepseek_v4.mhc`, an implementation of the same math written independently of the
compiler's lowerings (it is what the ops' CUDA stand-in kernels call). The dsv4_cuda ops have no CPU kernel:
only the rewritten graph runs here, never the op.
"""

import pytest
import torch

from dsv4_compile.lowering.pipeline import run_pipeline
from dsv4_compile.models.deepseek_v4 import mhc as oracle  # importing the package defines the dsv4_cuda ops
from tests.conftest import lower_graph_testing, op_counts

M, H = 4, 16
RMS_EPS, EPS = 0.1, 0.01  # far above the model's 1e-6, so that where each eps goes shows in the results
OPS = ("dsv4_cuda::mhc_pre", "dsv4_cuda::mhc_post", "dsv4_cuda::mhc_fused_post_pre", "dsv4_cuda::hc_head")
NATIVES = ("mhc_pre_native", "mhc_post_native", "mhc_fused_post_pre_native", "hc_head_native")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- fp64 math, from the reference
def weights64(h, fn, scale, base, iters):
    """pre [T, m], post [T, m], comb [T, m, m]: RMS-normalised projection, gates, Sinkhorn (rows of a softmax,
    then columns, then iters - 1 rounds of rows and columns)."""
    t, m, _ = h.shape
    xf = h.flatten(1).double()
    mix = (xf @ fn.double().T) / torch.sqrt(xf.square().mean(-1, keepdim=True) + RMS_EPS)
    scale, base = scale.double(), base.double()
    pre = torch.sigmoid(mix[:, :m] * scale[0] + base[:m]) + EPS
    post = 2.0 * torch.sigmoid(mix[:, m:2 * m] * scale[1] + base[m:2 * m])
    comb = torch.softmax(mix[:, 2 * m:].reshape(t, m, m) * scale[2] + base[2 * m:].reshape(m, m), -1) + EPS
    comb = comb / (comb.sum(-2, keepdim=True) + EPS)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + EPS)
        comb = comb / (comb.sum(-2, keepdim=True) + EPS)
    return pre, post, comb


def pre64(h, fn, scale, base, iters):
    pre, post, comb = weights64(h, fn, scale, base, iters)
    return (pre[..., None] * h.double()).sum(1), post, comb


def post64(x, h, post, comb):
    """out[:, j] = post[:, j] x + sum_i comb[:, i, j] h[:, i]."""
    mixed = (comb.double()[..., None] * h.double()[:, :, None, :]).sum(1)
    return post.double()[..., None] * x.double()[:, None, :] + mixed


def head64(h, fn, scale, base):
    xf = h.flatten(1).double()
    mix = (xf @ fn.double().T) / torch.sqrt(xf.square().mean(-1, keepdim=True) + RMS_EPS)
    pre = torch.sigmoid(mix * scale.double() + base.double()) + EPS
    return (pre[..., None] * h.double()).sum(1)


# ----------------------------------------------------------------------------- inputs and graphs
def sublayer_params(gen, rows=M * (M + 2), gates=3):
    fn = torch.randn(rows, M * H, generator=gen) / (M * H) ** 0.5
    return fn, 0.5 + torch.rand(gates, generator=gen), 0.5 * torch.randn(rows, generator=gen)


def make_inputs(t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, M, H, generator=gen).to(dtype)
    x = torch.randn(t, H, generator=gen).to(dtype)
    post = 2 * torch.rand(t, M, generator=gen)
    comb = torch.rand(t, M, M, generator=gen).softmax(-1)
    return (h, x, post, comb, *sublayer_params(gen), *sublayer_params(gen, rows=M, gates=1))


def all_four(iters):
    def fn(h, x, post, comb, fn, scale, base, head_fn, head_scale, head_base):
        ops = torch.ops.dsv4_cuda
        return (ops.mhc_pre(h, fn, scale, base, RMS_EPS, EPS, iters),
                ops.mhc_post(x, h, post, comb),
                ops.mhc_fused_post_pre(x, h, post, comb, fn, scale, base, RMS_EPS, EPS, iters),
                ops.hc_head(h, head_fn, head_scale, head_base, RMS_EPS, EPS))
    return fn


def lowered(fn, *args, ops=OPS):
    lo = lower_graph_testing(fn, *args, expected_before=ops, unexpected_after=["dsv4_cuda::"])
    assert not any(op.startswith("dsv4_cuda::") for op in lo.after)  # nothing of the namespace is called
    return lo


def check_stream(actual, expected64, dtype):
    """A stream value of `dtype`: fp32 math against fp64, or one rounding to bf16 (up to an ulp apart)."""
    assert actual.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(actual, expected64.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-5)


def check_weights(actual, expected64):
    assert all(a.dtype == torch.float32 for a in actual)
    for a, e in zip(actual, expected64):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("iters", [1, 2, 20])  # 2: one Sinkhorn round more or less shows
@pytest.mark.parametrize("t", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_each_op_matches_the_math_and_the_model_oracle(dtype, t, iters):
    args = make_inputs(t, dtype)
    h, x, post, comb, fn, scale, base, head_fn, head_scale, head_base = args
    lo = lowered(all_four(iters), *args)
    assert [lo.before[op] for op in OPS] == [1, 1, 1, 1] and [lo.after[n] for n in NATIVES] == [1, 1, 1, 1]
    assert lo.report["mhc"].matched == 4 and lo.report["mhc"].changed >= 4
    x1, post1, comb1, h1, h2, x2, post2, comb2, head = lo.run()  # Dynamo flattens the outputs
    assert (x1.shape, post1.shape, comb1.shape) == ((t, H), (t, M), (t, M, M))
    assert (h1.shape, h2.shape, head.shape) == ((t, M, H), (t, M, H), (t, H))

    e_x, e_post, e_comb = pre64(h, fn, scale, base, iters)
    check_stream(x1, e_x, dtype)
    check_weights((post1, comb1), (e_post, e_comb))
    check_stream(h1, post64(x, h, post, comb), dtype)
    check_stream(h2, post64(x, h, post, comb), dtype)
    n_x, n_post, n_comb = pre64(h2, fn, scale, base, iters)  # the next pre, on the stream as it was rounded
    check_stream(x2, n_x, dtype)
    check_weights((post2, comb2), (n_post, n_comb))
    check_stream(head, head64(h, head_fn, head_scale, head_base), dtype)

    if t == 0:
        return  # the model's oracle cannot take 0 tokens: see test_model_oracle_takes_zero_tokens
    # The model's oracle (independent of the lowerings) agrees as closely: same math, same rounding points.
    kw = dict(rms_eps=RMS_EPS, hc_eps=EPS)
    o_x, o_post, o_comb = oracle.mhc_pre(h, fn, scale, base, iters=iters, **kw)
    check_stream(x1, o_x.double(), dtype)
    check_weights((post1, comb1), (o_post.double(), o_comb.double()))
    check_stream(h1, oracle.mhc_post(x, h, post, comb).double(), dtype)
    o_fused = oracle.mhc_fused_post_pre(x, h, post, comb, fn, scale, base, iters=iters, **kw)
    check_stream(h2, o_fused[0].double(), dtype)
    check_stream(head, oracle.hc_head(h, head_fn, head_scale, head_base, **kw).double(), dtype)
    if iters == 20:  # Sinkhorn converged: rows and columns sum to ~1 (up to the eps in the divisions)
        for dim in (-1, -2):
            torch.testing.assert_close(comb1.sum(dim), torch.ones(t, M), rtol=0, atol=2 * EPS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_post_pre_equals_post_then_pre(dtype):
    h, x, post, comb, fn, scale, base, *_ = make_inputs(5, dtype, seed=1)

    def fused(x, h, post, comb, fn, scale, base):
        return torch.ops.dsv4_cuda.mhc_fused_post_pre(x, h, post, comb, fn, scale, base, RMS_EPS, EPS, 20)

    def unfused(x, h, post, comb, fn, scale, base):
        h = torch.ops.dsv4_cuda.mhc_post(x, h, post, comb)
        return (h, *torch.ops.dsv4_cuda.mhc_pre(h, fn, scale, base, RMS_EPS, EPS, 20))

    args = (x, h, post, comb, fn, scale, base)
    # The same math in the same order, so the same bits.
    fused_out = lowered(fused, *args, ops=OPS[2:3]).run()
    for a, b in zip(fused_out, lowered(unfused, *args, ops=OPS[:2]).run(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_model_oracle_takes_zero_tokens():
    h, _, _, _, fn, scale, base, *_ = make_inputs(0, torch.float32)
    x, _, _ = oracle.mhc_pre(h, fn, scale, base, rms_eps=RMS_EPS, hc_eps=EPS, iters=1)
    assert x.shape == (0, H)


def two_sublayers(h, a_fn, a_scale, a_base, f_fn, f_scale, f_base, head_fn, head_scale, head_base):
    """The CUDA path's structure: pre, (sub-layer), fused post+pre, (sub-layer), post, head."""
    ops = torch.ops.dsv4_cuda
    x, post, comb = ops.mhc_pre(h, a_fn, a_scale, a_base, RMS_EPS, EPS, 20)
    h, x, post, comb = ops.mhc_fused_post_pre(x.tanh(), h, post, comb, f_fn, f_scale, f_base, RMS_EPS, EPS, 20)
    h = ops.mhc_post(x * 0.5, h, post, comb)
    return ops.hc_head(h, head_fn, head_scale, head_base, RMS_EPS, EPS)


def oracle_two_sublayers(h, a_fn, a_scale, a_base, f_fn, f_scale, f_base, head_fn, head_scale, head_base):
    kw = dict(rms_eps=RMS_EPS, hc_eps=EPS)
    x, post, comb = oracle.mhc_pre(h, a_fn, a_scale, a_base, iters=20, **kw)
    h = oracle.mhc_post(x.tanh(), h, post, comb)
    x, post, comb = oracle.mhc_pre(h, f_fn, f_scale, f_base, iters=20, **kw)
    h = oracle.mhc_post(x * 0.5, h, post, comb)
    return oracle.hc_head(h, head_fn, head_scale, head_base, **kw)


def test_a_chain_of_sublayers_matches_the_oracle_and_lowers_once():
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(5, M, H, generator=gen), *sublayer_params(gen), *sublayer_params(gen),
            *sublayer_params(gen, rows=M, gates=1))
    with pytest.raises(NotImplementedError):  # no CPU kernel: the op itself never runs here
        torch.ops.dsv4_cuda.hc_head(args[0], *args[-3:], RMS_EPS, EPS)
    lo = lowered(two_sublayers, *args)
    assert {op for op in lo.before if op.startswith("dsv4_cuda::")} == set(OPS)
    assert lo.report["mhc"].matched == 4 and lo.report["audit"].matched == 0
    (out,) = lo.run()
    torch.testing.assert_close(out, oracle_two_sublayers(*args), rtol=1e-5, atol=1e-5)
    code = lo.gm.code
    again = run_pipeline(lo.gm, CPU)
    assert again.get("mhc") is None or (again["mhc"].matched, again["mhc"].changed) == (0, 0)
    assert lo.gm.code == code and op_counts(lo.gm) == lo.after

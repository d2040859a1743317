import pytest
import torch

from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, mhc
from dsv4_compile.passes.audit import find_cuda_only_nodes
from dsv4_compile.passes.base import PassContext
from dsv4_compile.passes.mhc import MHC_OPS, rewrite_mhc
from tests.conftest import capture_graph, targets

CTX = PassContext(device=torch.device("cpu"))
EPS = dict(rms_eps=1e-6, hc_eps=1e-6)


@pytest.fixture(scope="module")
def layers():
    model = DeepseekV4Model(DeepseekV4Config.tiny(), dtype=torch.float32)
    return model, model.layers[0], model.layers[1]


def two_sublayers(h, a_fn, a_scale, a_base, f_fn, f_scale, f_base, head_fn, head_scale, head_base):
    """The CUDA path's structure: pre, (sub-layer), fused post+pre, (sub-layer), post, head."""
    ops = torch.ops.dsv4_cuda
    x, post, comb = ops.mhc_pre(h, a_fn, a_scale, a_base, 1e-6, 1e-6, 20)
    h, x, post, comb = ops.mhc_fused_post_pre(x.tanh(), h, post, comb, f_fn, f_scale, f_base, 1e-6, 1e-6, 20)
    h = ops.mhc_post(x * 0.5, h, post, comb)
    return ops.hc_head(h, head_fn, head_scale, head_base, 1e-6, 1e-6)


def oracle_two_sublayers(h, a_fn, a_scale, a_base, f_fn, f_scale, f_base, head_fn, head_scale, head_base):
    x, post, comb = mhc.mhc_pre(h, a_fn, a_scale, a_base, iters=20, **EPS)
    h = mhc.mhc_post(x.tanh(), h, post, comb)
    x, post, comb = mhc.mhc_pre(h, f_fn, f_scale, f_base, iters=20, **EPS)
    h = mhc.mhc_post(x * 0.5, h, post, comb)
    return mhc.hc_head(h, head_fn, head_scale, head_base, **EPS)


def test_fused_ops_become_torch_math_matching_the_oracle(layers):
    model, l0, _ = layers
    args = (torch.randn(5, 4, model.config.hidden_size), l0.hc_attn_fn, l0.hc_attn_scale, l0.hc_attn_base,
            l0.hc_ffn_fn, l0.hc_ffn_scale, l0.hc_ffn_base, model.hc_head_fn, model.hc_head_scale, model.hc_head_base)
    gm, inputs = capture_graph(two_sublayers, *args)
    assert {op for op in targets(gm) if op.startswith("dsv4_cuda::")} == set(MHC_OPS)
    result = rewrite_mhc(gm, CTX)
    gm.graph.lint()
    gm.recompile()
    assert (result.matched, result.changed) == (4, 4)
    assert not any(t.startswith("dsv4_cuda::") for t in targets(gm))
    assert find_cuda_only_nodes(gm, CTX.device) == []
    torch.testing.assert_close(gm(*inputs)[0], oracle_two_sublayers(*args), rtol=1e-5, atol=1e-5)
    again = rewrite_mhc(gm, CTX)
    assert (again.matched, again.changed) == (0, 0)

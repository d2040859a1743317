import pytest
import torch
import torch.nn.functional as F

from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.passes.base import PassContext
from dsv4_compile.passes.silu_and_mul_with_clamp import rewrite_silu_and_mul_with_clamp
from tests.conftest import capture_graph, targets

CTX = PassContext(device=torch.device("cpu"))
OP = "_C::silu_and_mul_with_clamp"


def formula(x, limit, alpha=1.0, beta=0.0):
    """The clamped SwiGLU written from the reference, in fp64 (no rounding points)."""
    d = x.shape[-1] // 2
    gate = x[..., :d].double().clamp(max=limit)
    up = x[..., d:].double().clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


def fresh_buffer(x, limit):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit)
    return out * 2


def run_pass(fn, *args):
    gm, inputs = capture_graph(fn, *args)
    before = targets(gm)
    result = rewrite_silu_and_mul_with_clamp(gm, CTX)
    gm.graph.lint()
    gm.recompile()
    return gm, inputs, before, result


def test_fresh_buffer_becomes_functional_result():
    x = torch.randn(6, 32) * 8
    gm, inputs, before, result = run_pass(fresh_buffer, x, 7.0)
    assert OP in before and "empty" in " ".join(before)
    after = targets(gm)
    assert OP not in after and not any("empty" in t for t in after)
    assert (result.matched, result.changed) == (1, 1)
    torch.testing.assert_close(gm(*inputs)[0], 2 * formula(x, 7.0).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_matches_eager_native_silu_times_up(dtype):
    x = (torch.randn(4, 64) * 6).to(dtype)
    gm, inputs, _, _ = run_pass(fresh_buffer, x, 10.0)
    d = x.shape[-1] // 2
    native = F.silu(x[..., :d].clamp(max=10.0)) * x[..., d:].clamp(-10.0, 10.0)  # the upstream XPU fallback
    torch.testing.assert_close(gm(*inputs)[0], 2 * native, rtol=0, atol=0)


def test_alpha_beta_and_keyword_call():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2)
        torch.ops._C.silu_and_mul_with_clamp.default(out, x, limit=3.0, alpha=1.702, beta=1.0)
        return out

    x = torch.randn(5, 16) * 4
    gm, inputs, _, result = run_pass(fn, x)
    assert result.changed == 1
    torch.testing.assert_close(gm(*inputs)[0], formula(x, 3.0, 1.702, 1.0).float(), rtol=1e-5, atol=1e-5)


def test_caller_owned_buffer_is_still_filled():
    def fn(x, out):
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return out.sum()

    x, out = torch.randn(3, 8) * 5, torch.zeros(3, 4)
    gm, inputs, _, _ = run_pass(fn, x, out)
    assert "aten::copy_" in targets(gm)
    total = gm(*inputs)[0]
    filled = next(t for t in inputs if t.shape == (3, 4))
    torch.testing.assert_close(filled, formula(x, 5.0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, filled.sum())


def test_view_of_bigger_buffer_fills_only_the_view():
    def fn(x):
        buf = torch.full((x.shape[0], 10), -1.0)
        torch.ops._C.silu_and_mul_with_clamp(buf[:, 2:6], x, 5.0)
        return buf

    x = torch.randn(3, 8)
    gm, inputs, _, _ = run_pass(fn, x)
    out = gm(*inputs)[0]
    torch.testing.assert_close(out[:, 2:6], formula(x, 5.0).float(), rtol=1e-5, atol=1e-5)
    assert (out[:, :2] == -1).all() and (out[:, 6:] == -1).all()


def test_buffer_read_before_the_call_is_not_treated_as_fresh():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2)
        out.fill_(3.0)
        before = out.sum()
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return before, out

    x = torch.randn(2, 8)
    gm, inputs, _, _ = run_pass(fn, x)
    before, out = gm(*inputs)
    assert before.item() == pytest.approx(3.0 * 8)
    torch.testing.assert_close(out, formula(x, 5.0).float(), rtol=1e-5, atol=1e-5)


def test_idempotent():
    gm, _, _, _ = run_pass(fresh_buffer, torch.randn(2, 8), 7.0)
    code = gm.code
    again = rewrite_silu_and_mul_with_clamp(gm, CTX)
    assert (again.matched, again.changed) == (0, 0) and gm.code == code


def test_unexpected_schema_names_the_node():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    out = graph.placeholder("out")
    call = graph.call_function(torch.ops._C.silu_and_mul_with_clamp, (out, x, 1.0, 1.0, 0.0, 99))
    call.meta["stack_trace"] = '  File "model.py", line 42, in forward\n    act(out, x)\n'
    graph.output(None)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(UnsupportedNodeError, match=r"6 positional arguments[\s\S]*model.py\", line 42"):
        rewrite_silu_and_mul_with_clamp(gm, CTX)


def test_wrong_out_buffer_shape_is_rejected_at_trace_time():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1])
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return out

    with pytest.raises(Exception, match="result has shape"):
        capture_graph(fn, torch.randn(2, 8))

"""Activation family: `_C::silu_and_mul_with_clamp(result, input, limit[, alpha, beta])`, an out-style op.

Oracle: the clamped SwiGLU written here from the math in fp64, never the lowering nor the op's CPU kernel.
"""

import pytest
import torch
import torch.nn.functional as F

import dsv4_compile  # noqa: F401 - defines _C::silu_and_mul_with_clamp where no vLLM provides it
from dsv4_compile.errors import LoweringContractError, UnsupportedNodeError
from dsv4_compile.lowering.pipeline import run_pipeline
from tests.conftest import capture_graph, lower_graph_testing, op_counts

OP = "_C::silu_and_mul_with_clamp"
NATIVE, INTO = "silu_and_mul_with_clamp_native", "silu_and_mul_with_clamp_native_into"
CPU = torch.device("cpu")


def parts(x, limit, alpha=1.0, beta=0.0):
    """(activation, up + beta) in fp64: gate = min(x[..., :d], limit), up = clamp(x[..., d:], -limit, limit)."""
    d = x.shape[-1] // 2
    gate = x[..., :d].double().clamp(max=limit)
    up = x[..., d:].double().clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate), up + beta


def formula(x, limit, alpha=1.0, beta=0.0, rounded_to=None):
    """gate * sigmoid(alpha * gate) * (up + beta) in fp64; with `rounded_to`, rounded to that dtype where the
    fused kernel rounds: after the activation and after the product."""
    activated, up = parts(x, limit, alpha, beta)
    if rounded_to is None:
        return activated * up
    return (activated.to(rounded_to).double() * up).to(rounded_to)


def ulp(t):
    """The gap above |t| in t's dtype, in fp64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def fresh_buffer(x, limit):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit)
    return out * 2


def lowered(fn, *args, expected_before=(), expected_after=(), unexpected_after=()):
    """The pipeline over `fn`'s graph, which held the op and holds it no more."""
    return lower_graph_testing(fn, *args, expected_before=[OP, *expected_before], expected_after=expected_after,
                               unexpected_after=[OP, *unexpected_after])


def test_fresh_buffer_and_the_op_disappear():
    x = torch.randn(6, 32) * 8
    lo = lowered(fresh_buffer, x, 7.0, expected_before=["torch.empty"], unexpected_after=["torch.empty", INTO])
    assert (lo.before[OP], lo.before["torch.empty"], lo.after[NATIVE]) == (1, 1, 1)
    assert lo.after[OP] == lo.after["torch.empty"] == 0
    assert lo.report["activation"].matched == 1 and lo.report["activation"].changed >= 1
    torch.testing.assert_close(lo.run()[0].double(), 2 * formula(x, 7.0), rtol=1e-6, atol=1e-6)


def test_caller_owned_buffer_is_written_in_place_exactly():
    def fn(x, out):
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return out.sum()

    x, out = torch.randn(3, 8) * 5, torch.zeros(3, 4)
    lo = lowered(fn, x, out, expected_after=[INTO])
    buffer = next(t for t in lo.inputs if t.shape == (3, 4))
    address = buffer.data_ptr()
    (total,) = lo.run()
    assert buffer.data_ptr() == address and buffer.dtype == torch.float32
    torch.testing.assert_close(buffer.double(), formula(x, 5.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, buffer.sum())


def test_view_of_a_bigger_buffer_writes_only_the_view():
    def fn(x):
        buf = torch.full((x.shape[0], 10), -1.0)
        torch.ops._C.silu_and_mul_with_clamp(buf[:, 2:6], x, 5.0)
        return buf

    x = torch.randn(3, 8)
    (out,) = lowered(fn, x, expected_after=[INTO]).run()
    torch.testing.assert_close(out[:, 2:6].double(), formula(x, 5.0), rtol=1e-6, atol=1e-6)
    assert (out[:, :2] == -1).all() and (out[:, 6:] == -1).all()


def test_buffer_read_before_the_call_is_not_fresh():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2)
        out.fill_(3.0)
        before = out.sum()
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return before, out

    x = torch.randn(2, 8)
    lo = lowered(fn, x, expected_after=[INTO, "torch.empty"])
    before, out = lo.run()
    assert before.item() == pytest.approx(3.0 * 8)
    torch.testing.assert_close(out.double(), formula(x, 5.0), rtol=1e-6, atol=1e-6)


def test_buffer_written_twice():
    def fn(x, y):
        out = torch.empty(x.shape[0], x.shape[1] // 2)
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        first, row = out.sum(), out[0]  # a value read between the writes, and a view that sees the second
        torch.ops._C.silu_and_mul_with_clamp(out, y, 5.0)
        return first, out, row

    x, y = torch.randn(3, 8) * 4, torch.randn(3, 8) * 4
    first, out, row = lowered(fn, x, y, expected_after=[NATIVE, INTO], unexpected_after=["torch.empty"]).run()
    torch.testing.assert_close(first.double(), formula(x, 5.0).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), formula(y, 5.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row, out[0], rtol=0, atol=0)


def test_alpha_beta_keywords_and_default_overload():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2)
        torch.ops._C.silu_and_mul_with_clamp.default(out, x, limit=3.0, alpha=1.702, beta=1.0)
        return out

    x = torch.randn(5, 16) * 4
    lo = lowered(fn, x, unexpected_after=["torch.empty"])
    assert lo.report["activation"].matched == 1
    torch.testing.assert_close(lo.run()[0].double(), formula(x, 3.0, 1.702, 1.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, -0.25), (1.0, -1.5), (0.25, 0.0)])
def test_alpha_below_one_and_negative_beta(alpha, beta):
    # values on the other side of the defaults: the lowering leaves out only alpha == 1 and beta == 0 exactly
    x = torch.randn(6, 16) * 4
    (out,) = lowered(lambda x: _alpha_beta(x, 3.0, alpha, beta), x).run()
    torch.testing.assert_close(out.double(), formula(x, 3.0, alpha, beta), rtol=1e-6, atol=1e-6)


def test_tokens_with_several_leading_dims():
    # [batch, tokens, 2d] as well as [tokens, 2d]: the halves are taken along the last dim
    def fn(x):
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2)
        torch.ops._C.silu_and_mul_with_clamp(out, x, 3.0)
        return out

    x = torch.randn(2, 3, 16) * 4
    (out,) = lowered(fn, x).run()
    torch.testing.assert_close(out.double(), formula(x, 3.0), rtol=1e-6, atol=1e-6)


def arithmetic_ops(alpha, beta):
    """The mul/add ops the lowering's math traces to, for these alpha and beta."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dsv4_compile.lowering.lowerings.activation import silu_and_mul_with_clamp_native

    gm = make_fx(lambda x: silu_and_mul_with_clamp_native(x, 3.0, alpha, beta))(torch.randn(4, 16))
    return sorted(str(n.target) for n in gm.graph.nodes if "mul" in str(n.target) or "add" in str(n.target))


def test_the_default_alpha_and_beta_add_no_operations():
    # alpha = 1 and beta = 0 are left out of the graph (the README: under exact rounding the two no-ops slowed the
    # kernel); any other value is applied
    assert arithmetic_ops(1.0, 0.0) == ["aten.mul.Tensor", "aten.mul.Tensor"]
    assert arithmetic_ops(1.5, 0.5) == ["aten.add.Tensor", "aten.mul.Tensor", "aten.mul.Tensor", "aten.mul.Tensor"]
    assert arithmetic_ops(0.0, 1.0) == ["aten.add.Tensor", "aten.mul.Tensor", "aten.mul.Tensor", "aten.mul.Tensor"]


OLD_SCHEMA_PROCESS = """
import torch
torch.library.define("_C::silu_and_mul_with_clamp", "(Tensor(a!) result, Tensor input, float limit) -> ()")
import dsv4_compile  # finds the op defined, with vLLM's older schema, and leaves it
from dsv4_compile.lowering.pipeline import run_pipeline
from tests.conftest import capture_graph
from tests.lowerings.test_activation import formula
def fn(x):
    out = torch.empty(x.shape[0], x.shape[1] // 2)
    torch.ops._C.silu_and_mul_with_clamp(out, x, 3.0)
    return out
x = torch.randn(4, 16) * 4
gm, _ = capture_graph(fn, x)
run_pipeline(gm, torch.device("cpu"))
torch.testing.assert_close(gm(x)[0].double(), formula(x, 3.0), rtol=1e-6, atol=1e-6)
print("OK")
"""


def test_the_older_schema_without_alpha_beta_takes_the_defaults():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", OLD_SCHEMA_PROCESS], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_round_where_the_kernel_rounds(dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 128) * 6).to(dtype)
    limit, alpha, beta = 10.0, 1.702, 1.0
    (out,) = lowered(lambda x: fresh_buffer(x, limit) / 2, x).run()
    assert out.dtype == dtype and out.shape == (64, 64)
    if dtype == torch.float32:  # no rounding point: fp32 math against fp64
        torch.testing.assert_close(out.double(), formula(x, limit), rtol=1e-6, atol=1e-7)
    else:
        # The same two rounding points in fp64: fp32 and fp64 math round alike except near a tie, where they may
        # land one ulp apart at either point; the activation's ulp reaches the output times |up + beta|.
        activated, up = parts(x, limit)
        bound = ulp(formula(x, limit, rounded_to=dtype)) + up.abs() * ulp(activated.to(dtype))
        diff = (out.double() - formula(x, limit, rounded_to=dtype).double()).abs()
        assert (diff <= bound).all(), diff.max()
        assert (diff == 0).float().mean() > 0.95  # rounding elsewhere (once, or in fp64) would disagree more
        # Bit for bit the upstream XPU fallback: silu, rounded, times up, rounded.
        d = x.shape[-1] // 2
        eager = F.silu(x[:, :d].clamp(max=limit)) * x[:, d:].clamp(-limit, limit)
        assert torch.equal(out, eager)
    # alpha/beta go through the same rounding points
    (out,) = lowered(lambda x: _alpha_beta(x, limit, alpha, beta), x).run()
    expected = formula(x, limit, alpha, beta, rounded_to=dtype if dtype != torch.float32 else None)
    tol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(out.double(), expected.double(), rtol=tol, atol=tol)


def _alpha_beta(x, limit, alpha, beta):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit, alpha, beta)
    return out


def test_values_beyond_the_clamp():
    x = torch.tensor([[100.0, -100.0, 3.0, -100.0, 100.0, 0.5], [-100.0, 7.0, 8.0, 100.0, -7.5, 2.0]])
    (out,) = lowered(lambda x: fresh_buffer(x, 7.0) / 2, x).run()
    sat = 7.0 * torch.sigmoid(torch.tensor(7.0, dtype=torch.float64))
    assert out[0, 0].item() == pytest.approx(-sat.item() * 7.0, rel=1e-6)  # gate capped, up clamped below
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-30)  # silu(-100) ~ -4e-42
    torch.testing.assert_close(out.double(), formula(x, 7.0), rtol=1e-6, atol=1e-30)


def test_zero_tokens():
    (out,) = lowered(fresh_buffer, torch.randn(0, 16), 7.0).run()
    assert out.shape == (0, 8) and out.dtype == torch.float32


def test_second_run_changes_nothing():
    lo = lowered(fresh_buffer, torch.randn(2, 8), 7.0)
    code = lo.gm.code
    again = run_pipeline(lo.gm, CPU)
    assert again["lower_ops"].matched == again["lower_ops"].changed == 0
    assert again.get("activation") is None or again["activation"].matched == 0
    assert lo.gm.code == code and op_counts(lo.gm) == lo.after


def hand_built(out_value=None, x_value=None, args=None):
    """`op(out, x, 5.0)` as a hand-built graph; placeholders carry example values only when given."""
    graph = torch.fx.Graph()
    x, out = graph.placeholder("x"), graph.placeholder("out")
    for node, value in ((x, x_value), (out, out_value)):
        if value is not None:
            node.meta["example_value"] = value
    call = graph.call_function(torch.ops._C.silu_and_mul_with_clamp.default, args or (out, x, 5.0))
    call.meta["stack_trace"] = '  File "model.py", line 42, in forward\n    act(out, x)\n'
    graph.output(None)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(("out", "why"), [
    (torch.zeros(3, 8), r"result has shape \(3, 8\), expected \(3, 4\)"),
    (torch.zeros(3, 2), r"result has shape \(3, 2\), expected \(3, 4\)"),
    (torch.zeros(3, 4, dtype=torch.float16), r"result dtype torch\.float16 != input dtype torch\.float32"),
], ids=["wider", "narrower", "dtype"])
def test_wrong_buffer_is_rejected_naming_the_node(out, why):
    gm = hand_built(out, torch.zeros(3, 8))
    node = (r"node 'silu_and_mul_with_clamp_default' \(call_function "
            r"_C::silu_and_mul_with_clamp\) at \"model\.py\", line 42")
    with pytest.raises(LoweringContractError, match=why + r"[\s\S]*" + node):
        run_pipeline(gm, CPU)


def test_wrong_buffer_is_rejected_when_tracing():
    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1])
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return out

    with pytest.raises(Exception, match="result has shape"):
        capture_graph(fn, torch.randn(2, 8))


def test_call_that_does_not_fit_the_schema_names_the_node():
    graph_module = hand_built(args=None)
    call = next(n for n in graph_module.graph.nodes if n.op == "call_function")
    call.args = (*call.args, 1.0, 0.0, 99)  # six positional arguments
    with pytest.raises(UnsupportedNodeError, match=r"do not fit[\s\S]*model.py\", line 42"):
        run_pipeline(graph_module, CPU)


def test_no_example_values_emits_a_guarded_call():
    gm = hand_built()
    report = run_pipeline(gm, CPU)
    assert report["activation"].matched == 1
    counts = op_counts(gm)
    assert counts[INTO] == 1 and counts[OP] == 0
    with pytest.raises(LoweringContractError, match=r"result has shape \(3, 8\)[\s\S]*line 42"):
        gm(torch.randn(3, 8), torch.empty(3, 8))
    with pytest.raises(LoweringContractError, match=r"result dtype torch\.bfloat16"):
        gm(torch.randn(3, 8), torch.empty(3, 4, dtype=torch.bfloat16))
    x, out = torch.randn(3, 8) * 6, torch.full((3, 4), float("nan"))
    gm(x, out)
    torch.testing.assert_close(out.double(), formula(x, 5.0), rtol=1e-6, atol=1e-6)

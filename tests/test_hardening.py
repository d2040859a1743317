"""Hardening (issue 8): under odd graphs and bad input the backend gives the right numbers or stops with a
clear error naming the node and its source line; never a silently wrong result. One test per row of
docs/hardening.md (rows already covered elsewhere point at those tests)."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch._dynamo.graph_bytecode_inputs import get_external_object_by_index

import dsv4_compile
from dsv4_compile import CudaOnlyNodesError, DeviceError, OptionsError, UnsupportedNodeError
from dsv4_compile.lowering.backend import resolve_device
from dsv4_compile.lowering.passes.aux_streams import remove_aux_streams
from dsv4_compile.lowering.passes.base import PassContext
from dsv4_compile.lowering.passes.lower_ops import lower_registered_ops
from dsv4_compile.models.deepseek_v4 import cuda_ops  # noqa: F401 - defines the dsv4_cuda ops
from dsv4_compile.models.deepseek_v4.oracle import _silu_and_mul_with_clamp as oracle_activation
from tests.blocks import scheduled_decode, slow_sparse_decode
from tests.conftest import capture_graph, needs_stream_aware_dynamo, targets

CPU = PassContext(device=torch.device("cpu"))

# A CUDA-only op nobody registered a lowering for: a CUDA kernel and a fake, no CPU kernel.
_lib = torch.library.Library("_C", "FRAGMENT")
_lib.define("dsv4_hardening_cuda_only(Tensor x) -> Tensor")
_lib.impl("dsv4_hardening_cuda_only", lambda x: x.clone(), "CUDA")
torch.library.register_fake("_C::dsv4_hardening_cuda_only", lambda x: torch.empty_like(x), lib=_lib)


def cause(exc: BaseException, kind: type[BaseException]) -> BaseException:
    """The exception of type `kind` in `exc`'s cause/context chain (Dynamo wraps backend errors)."""
    seen = exc
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no {kind.__name__} in the chain of {type(exc).__name__}: {exc}"
    return seen


def line_of(fn: object, needle: str) -> int:
    """The source line number of the first line of `fn` containing `needle`."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if needle in text)


def activation(x: torch.Tensor, limit: float = 5.0) -> torch.Tensor:
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit)
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """fp32: a few ulps (Inductor fuses); fp16/bf16: one rounding step of the output dtype."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[dtype]


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x"])
def test_unknown_device_is_a_device_error_on_every_entry_point(device):
    with pytest.raises(DeviceError, match="device"):
        dsv4_compile.compile(lambda x: x, device=device)
    with pytest.raises(DeviceError, match="device"):
        dsv4_compile.BackendOptions(device=device)
    with pytest.raises(DeviceError, match="device"), dsv4_compile.cuda_compat(device):
        pass
    with pytest.raises(Exception) as info:
        torch.compile(lambda x: x + 1, backend="dsv4_xpu", options={"device": device})(torch.ones(2))
    cause(info.value, DeviceError)


@pytest.mark.skipif(torch.xpu.is_available(), reason="needs a machine without XPU")
def test_unavailable_device_stops_before_any_rewrite():
    seen = len(dsv4_compile.all_reports())
    with pytest.raises(Exception) as info:
        dsv4_compile.compile(lambda x: x * 2, device="xpu")(torch.ones(2))
    assert "'xpu' is not available" in str(cause(info.value, DeviceError))
    with pytest.raises(DeviceError, match="'xpu' is not available"):
        resolve_device("xpu", [torch.ones(())])  # only a 0-dim scalar: no mismatch to report
    assert len(dsv4_compile.all_reports()) == seen  # nothing was rewritten


def test_mixed_device_inputs_through_torch_compile():
    def two(x, y):
        return x * 2, y * 2

    with pytest.raises(Exception) as info:
        torch.compile(two, backend="dsv4_xpu")(torch.ones(2), torch.ones(3, device="meta"))
    assert "several devices ['cpu', 'meta']" in str(cause(info.value, DeviceError))
    # a 0-dim CPU scalar mixes with anything: what is reported is the meta target, not a mixture
    with pytest.raises(DeviceError, match="'meta' is not available"):
        resolve_device(None, [torch.ones(2, device="meta"), torch.tensor(1.0)])


# ---------------------------------------------------------------------------------------------- options
def test_option_typos_are_rejected_with_the_valid_choices():
    with pytest.raises(OptionsError, match=r"unknown dsv4_xpu option\(s\) \['stirct'\]; valid options are"):
        dsv4_compile.compile(activation, stirct=True)  # at compile(), before anything is traced
    with pytest.raises(OptionsError, match=r"unknown pass\(es\) \['silu_and_mul'\]"):
        dsv4_compile.compile(activation, disable=["silu_and_mul"])  # a near miss is not a prefix match
    with pytest.raises(OptionsError, match="must be bool"):
        dsv4_compile.compile(activation, inductor="no")
    with pytest.raises(Exception) as info:  # by name: checked when the backend first runs
        torch.compile(activation, backend="dsv4_xpu", options={"disabel": ["mhc"]})(torch.randn(2, 8))
    assert "valid options are ['device', 'strict', 'disable', 'inductor'" in str(cause(info.value, OptionsError))


# ---------------------------------------------------------------------------- _C.silu_and_mul_with_clamp calls
def _located_call(args: tuple, kwargs: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
    """A graph calling the op with `args`/`kwargs` (placeholders named x/out), with a source line."""
    graph = torch.fx.Graph()
    nodes = {name: graph.placeholder(name) for name in ("out", "x")}
    for name, (shape, dtype) in (shapes or {}).items():
        nodes[name].meta["example_value"] = torch.empty(shape, dtype=dtype)
    resolve = {name: nodes[name] for name in nodes}
    args = tuple(resolve.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {k: resolve.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    call = graph.call_function(torch.ops._C.silu_and_mul_with_clamp.default, args, kwargs)
    call.meta["stack_trace"] = '  File "/src/moe.py", line 77, in expert\n    act(out, x, limit)\n'
    graph.output(nodes["out"])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("out", "x", 1.0, 1.0, 0.0, 99), {}, "too many positional arguments"),
        (("out", "x"), {}, "missing a required argument: 'limit'"),
        (("out", "x", 1.0), {"gamma": 2.0}, "unexpected keyword argument 'gamma'"),
        (("out", "x", 1.0), {"limit": 2.0}, "multiple values for argument 'limit'"),
    ],
)
def test_activation_called_with_an_unexpected_schema_names_the_node(args, kwargs, message):
    gm = _located_call(args, kwargs)
    with pytest.raises(UnsupportedNodeError, match=message) as info:
        lower_registered_ops(gm, CPU)
    text = str(info.value)
    assert "node 'silu_and_mul_with_clamp_default'" in text
    assert '/src/moe.py", line 77' in text and "act(out, x, limit)" in text


def test_wrong_out_dtype_stops_tracing_at_the_users_line():
    def wrong_dtype(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=torch.float16)
        torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
        return out

    with pytest.raises(Exception, match=r"result dtype torch\.float16 != input dtype torch\.float32") as info:
        dsv4_compile.compile(wrong_dtype)(torch.randn(2, 8))
    assert f"test_hardening.py\", line {line_of(wrong_dtype, 'silu_and_mul_with_clamp(')}" in str(info.value)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (((2, 3, 4), torch.float32), r"result has shape \(2, 3, 4\), expected \(3, 4\)"),  # copy_ would broadcast
        (((3, 4), torch.bfloat16), "result dtype torch.bfloat16 != input dtype torch.float32"),  # copy_ would cast
        (((3, 8), torch.float32), r"result has shape \(3, 8\), expected \(3, 4\)"),
    ],
)
def test_out_buffer_breaking_the_contract_is_an_error_not_a_broadcast(out, message):
    """A graph that reaches the pass unchecked (a library whose fake impl does not check, a hand-built
    graph) with a bad result buffer: the pass refuses it, naming the node, instead of copy_-broadcasting."""
    gm = _located_call(("out", "x", 5.0), {}, shapes={"x": ((3, 8), torch.float32), "out": out})
    with pytest.raises(UnsupportedNodeError, match=message) as info:
        lower_registered_ops(gm, CPU)
    assert '/src/moe.py", line 77' in str(info.value)
    # the same call with a good buffer goes through, and the caller's buffer is filled
    good = _located_call(("out", "x", 5.0), {}, shapes={"x": ((3, 8), torch.float32), "out": ((3, 4), torch.float32)})
    assert lower_registered_ops(good, CPU).changed == 1
    good.recompile()
    x, buf = torch.randn(3, 8) * 4, torch.zeros(3, 4)
    good(buf, x)
    torch.testing.assert_close(buf, oracle_activation(x, 5.0))


# -------------------------------------------------------------------------------- layouts, sizes, dtypes
def test_non_contiguous_inputs_through_inductor():
    torch.manual_seed(0)
    big = torch.randn(16, 7) * 6
    for x in (big.t(), torch.randn(5, 24)[:, 4:20], torch.randn(4, 3, 16).transpose(0, 1), torch.randn(6, 16)[::2]):
        assert not x.is_contiguous()
        torch._dynamo.reset()
        got = dsv4_compile.compile(activation)(x)
        torch.testing.assert_close(got, oracle_activation(x, 5.0), **tolerance(torch.float32))
    q, kv = torch.randn(4, 3, 32).transpose(0, 1), torch.randn(32, 20).t()  # q [3, 4, 32], kv [20, 32]
    indices = torch.tensor([[0, 5, 7, -1], [1, 2, 3, 4], [-1, -1, 19, 10]], dtype=torch.int32).t().contiguous().t()
    sink, seq_lens = torch.randn(4), torch.tensor([3, 4, 2], dtype=torch.int32)
    got = dsv4_compile.compile(scheduled_decode)(seq_lens, q, kv, indices, sink)
    expected = slow_sparse_decode(q, kv, indices, sink, 32**-0.5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inductor", [False, True])
def test_zero_size_decode_and_activation(inductor):
    """Decode with no decode tokens (B = 0) and the activation on 0 rows: empty results of the right shape."""
    q, kv = torch.randn(0, 4, 32), torch.randn(20, 32)
    indices, sink, seq_lens = torch.zeros(0, 6, dtype=torch.int32), torch.randn(4), torch.zeros(0, dtype=torch.int32)
    gm, inputs = capture_graph(scheduled_decode, seq_lens, q, kv, indices, sink)
    report = dsv4_compile.run_pipeline(gm, torch.device("cpu"))
    assert report["attention"].changed == 2 and not any(t.startswith("dsv4_cuda::") for t in targets(gm))
    assert gm(*inputs)[0].shape == (0, 4, 32)
    torch._dynamo.reset()
    got = dsv4_compile.compile(scheduled_decode, inductor=inductor)(seq_lens, q, kv, indices, sink)
    assert got.shape == (0, 4, 32) and got.dtype == q.dtype
    # one sequence whose candidates are all missing: only the sink is attended, the output is 0, not NaN
    got = dsv4_compile.compile(scheduled_decode, inductor=inductor)(
        torch.zeros(1, dtype=torch.int32), torch.randn(1, 4, 32), kv, torch.full((1, 6), -1, dtype=torch.int32), sink)
    torch.testing.assert_close(got, torch.zeros(1, 4, 32))
    for x in (torch.randn(0, 16), torch.randn(3, 0, 16), torch.randn(2, 0)):
        out = dsv4_compile.compile(activation, inductor=inductor)(x)
        assert out.shape == (*x.shape[:-1], x.shape[-1] // 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_through_inductor_match_the_oracle(dtype):
    """The compiled (Inductor) rewrite vs the oracle's formula: same rounding points, dtype tolerance;
    tests/test_pass_silu_and_mul_with_clamp.py::test_rounding_matches_eager_native_silu_times_up checks the
    rewritten graph run eagerly bit for bit."""
    x = (torch.randn(33, 64, generator=torch.Generator().manual_seed(1)) * 6).to(dtype)
    got = dsv4_compile.compile(activation)(x, 7.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got, oracle_activation(x, 7.0), **tolerance(dtype))


SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0, -3.0, 1e-30]


@pytest.mark.parametrize("alpha_beta", [(1.0, 0.0), (1.702, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_parity_with_the_oracle(alpha_beta, dtype):
    """Every (gate, up) pair of special values through the compiled path: NaN where the oracle has NaN,
    the same infinities and finite values elsewhere."""
    alpha, beta = alpha_beta
    x = torch.tensor([[g, u] for g in SPECIALS for u in SPECIALS]).to(dtype)  # [100, 2]: gate, up (d = 1)

    def fn(x):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        torch.ops._C.silu_and_mul_with_clamp(out, x, 6.0, alpha, beta)
        return out

    got = dsv4_compile.compile(fn)(x)
    expected = oracle_activation(x, 6.0, alpha, beta)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, equal_nan=True, **tolerance(dtype))
    assert expected.isnan().any()  # the grid does reach NaN (NaN inputs, -inf * sigmoid(-inf))


# ----------------------------------------------------------------------------------- CUDA-only leftovers
def test_unregistered_cuda_only_op_stops_with_the_source_line():
    def uses_unknown_op(x):
        y = torch.relu(x)
        return torch.ops._C.dsv4_hardening_cuda_only(y) + 1

    with pytest.raises(Exception) as info:
        dsv4_compile.compile(uses_unknown_op)(torch.randn(4))
    error = cause(info.value, CudaOnlyNodesError)
    text = str(error)
    assert "1 CUDA-only node(s)" in text and "_C::dsv4_hardening_cuda_only has no cpu kernel" in text
    assert f"test_hardening.py\", line {line_of(uses_unknown_op, 'dsv4_hardening_cuda_only')}" in text
    assert "Register a native lowering" in text
    # strict=False lets the graph through with a warning; running it fails loudly, never a wrong number
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NotImplementedError, match="CPU"):
        warnings.simplefilter("always")
        dsv4_compile.compile(uses_unknown_op, strict=False, inductor=False)(torch.randn(4))
    assert any("dsv4_hardening_cuda_only" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------ streams: use before join
class UseBeforeJoin(torch.nn.Module):
    """An aux-stream region whose results the current stream uses BEFORE the join (a race on CUDA): an
    out-of-place result, and an in-place write to a buffer that the current stream reads and overwrites."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.cuda.Stream()
        self.fork, self.join = torch.cuda.Event(), torch.cuda.Event()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf = x.cos()
        self.fork.record()
        with torch.cuda.stream(self.aux):
            self.fork.wait()
            b = x.sin() * 3
            buf.add_(b)  # aux writes buf
        early = b * 2 + buf  # the current stream reads b and buf before the join
        buf.mul_(0.5)  # and writes buf while the aux stream may still be writing it
        self.join.record(self.aux)
        self.join.wait()
        return early + b, buf


def serial_use_before_join(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UseBeforeJoin in program order, no streams."""
    b = x.sin() * 3
    buf = x.cos() + b
    early = b * 2 + buf
    return early + b, buf * 0.5


@pytest.mark.parametrize("inductor", [False, True])
def test_aux_stream_result_used_before_the_join_runs_in_program_order(inductor):
    """aux_streams removes ordering only; program order is kept, so the result equals eager serial
    execution (what a CUDA run gives when the race happens to resolve in program order)."""
    with dsv4_compile.cuda_compat("cpu"):
        model = UseBeforeJoin()
    x = torch.randn(4, 8)
    got = dsv4_compile.compile(model, inductor=inductor, fullgraph=True)(x)
    report = dsv4_compile.last_report()
    assert report["aux_streams"].changed > 0 and report["audit"].matched == 0
    torch.testing.assert_close(got, serial_use_before_join(x))


class MutatesInputOnAux(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.cuda.Stream()
        self.join = torch.cuda.Event()

    def forward(self, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self.aux):
            buf.add_(x)
        self.join.record(self.aux)
        self.join.wait()
        return buf * 2


@needs_stream_aware_dynamo
def test_graph_input_mutated_on_an_aux_stream_before_an_event_is_refused_by_dynamo():
    """Dynamo applies input mutations after the graph, so an event recorded after one would not cover it;
    it stops with both source lines (before the backend sees the graph) rather than mis-synchronising."""
    with dsv4_compile.cuda_compat("cpu"):
        model = MutatesInputOnAux()
    with pytest.raises(Exception, match="event was recorded on a stream where a graph input was previously mutated"
                       ) as info:
        dsv4_compile.compile(model, fullgraph=True)(torch.ones(3), torch.zeros(3))
    assert f"test_hardening.py\", line {line_of(MutatesInputOnAux.forward, 'buf.add_(x)')}" in str(info.value)


def test_hand_built_stream_tagged_value_used_before_the_join():
    """The torch 2.11 spelling (call_methods on stream objects) with a tagged node used on the current
    stream before `wait_stream`: after the pass the graph is the serial program, node for node."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    cur = graph.call_function(get_external_object_by_index, (0,))
    aux = graph.call_function(get_external_object_by_index, (1,))
    graph.call_method("wait_stream", (aux, cur))
    y = graph.call_function(torch.mul, (x, 2))
    y.meta["custom"] = {"stream": 1}
    z = graph.call_function(torch.add, (y, 1))  # current stream, before the join
    x_add = graph.call_method("add_", (x, y))  # and an in-place write of the fork's input
    x_add.meta["custom"] = {"stream": 1}
    graph.call_method("wait_stream", (cur, aux))
    graph.output(graph.call_function(torch.mul, (z, x)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    remove_aux_streams(gm, CPU)
    gm.graph.lint()
    gm.recompile()
    assert targets(gm) == ["torch.mul", "torch.add", ".add_()", "torch.mul"]
    t = torch.arange(4.0)
    expected = (t * 2 + 1) * (t + t * 2)
    torch.testing.assert_close(gm(t.clone()), expected)
    assert math.isclose(float(gm(torch.ones(1))), 3.0 * 3.0)

import pytest
import torch

from dsv4_compile.errors import CudaOnlyNodesError
from dsv4_compile.lowering.passes.audit import audit_residual_cuda, find_cuda_only_nodes
from dsv4_compile.lowering.passes.base import PassContext
from dsv4_compile.lowering.registry import op_qualname
from tests.conftest import capture_graph

CPU = PassContext(device=torch.device("cpu"))

_lib = torch.library.Library("_C", "FRAGMENT")
_lib.define("dsv4_test_cuda_only(Tensor x) -> Tensor")
_lib.impl("dsv4_test_cuda_only", lambda x: x.clone(), "CUDA")
torch.library.register_fake("_C::dsv4_test_cuda_only", lambda x: torch.empty_like(x), lib=_lib)


def located(node: torch.fx.Node, line: int, code: str) -> torch.fx.Node:
    node.meta["stack_trace"] = f'  File "/src/model.py", line {line}, in forward\n    {code}\n'
    return node


def leftover_graph() -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    out = located(graph.call_function(torch.empty, (4,), {"device": "cpu"}), 10, "out = torch.empty(4)")
    located(graph.call_function(torch.ops._C.silu_and_mul_with_clamp.default, (out, x, 1.0)), 11, "act(out, x)")
    y = located(graph.call_function(torch.ops._C.dsv4_test_cuda_only.default, (x,)), 12, "y = unknown_op(x)")
    z = located(graph.call_function(torch.arange, (4,), {"device": "cuda"}), 13, 'z = torch.arange(4, device="cuda")')
    located(graph.call_function(torch.ops.streams.wait_stream.default, (0, 1)), 14, "s.wait_stream(t)")
    graph.output((out, y, z))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_error_names_every_offending_node_with_its_source_line():
    with pytest.raises(CudaOnlyNodesError) as info:
        audit_residual_cuda(leftover_graph(), CPU)
    text = str(info.value)
    assert "4 CUDA-only node(s)" in text
    for line, snippet in [(11, "native lowering that was not applied"), (12, "has no cpu kernel"),
                          (13, "cuda device constant"), (14, "stream/event operation")]:
        assert f'/src/model.py", line {line}' in text
        assert snippet in text
    assert "_C::dsv4_test_cuda_only" in text and "_C::silu_and_mul_with_clamp" in text


def test_non_strict_warns_and_counts():
    with pytest.warns(UserWarning, match="CUDA-only node"):
        result = audit_residual_cuda(leftover_graph(), PassContext(device=torch.device("cpu"), strict=False))
    assert result.matched == 4 and result.changed == 0


def test_cuda_target_accepts_cuda_kernels_and_devices_but_not_streams():
    reasons = [why for _, why in find_cuda_only_nodes(leftover_graph(), torch.device("cuda"))]
    assert len(reasons) == 2
    assert any("native lowering" in r for r in reasons) and any("stream" in r for r in reasons)


def test_clean_graph_passes():
    graph = torch.fx.Graph()
    graph.output(graph.call_function(torch.relu, (graph.placeholder("x"),)))
    assert audit_residual_cuda(torch.fx.GraphModule(torch.nn.Module(), graph), CPU).matched == 0


# A fresh namespace (not a known CUDA library): an op with only a CUDA kernel, one with only an XPU kernel,
# and one with a composite implementation. A namespace list could not judge them; kernel availability does.
_fresh = torch.library.Library("dsv4_audit_fresh", "DEF")
_fresh.define("cuda_only(Tensor x) -> Tensor")
_fresh.impl("cuda_only", lambda x: x * 2, "CUDA")
torch.library.register_fake("dsv4_audit_fresh::cuda_only", lambda x: torch.empty_like(x), lib=_fresh)
_fresh.define("xpu_only(Tensor x) -> Tensor")
_fresh.impl("xpu_only", lambda x: x * 2, "XPU")
torch.library.register_fake("dsv4_audit_fresh::xpu_only", lambda x: torch.empty_like(x), lib=_fresh)
_fresh.define("anywhere(Tensor x) -> Tensor")
_fresh.impl("anywhere", lambda x: x * 2, "CompositeExplicitAutograd")


def one_call_graph(target) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph.output(located(graph.call_function(target, (graph.placeholder("x"),)), 7, "y = op(x)"))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(
    ("target", "flagged_for"),
    [
        (torch.ops.dsv4_audit_fresh.cuda_only, {"cpu", "xpu"}),  # the packet, as Dynamo records it
        (torch.ops.dsv4_audit_fresh.cuda_only.default, {"cpu", "xpu"}),
        (torch.ops.dsv4_audit_fresh.xpu_only.default, {"cpu", "cuda"}),
        (torch.ops.dsv4_audit_fresh.anywhere.default, set()),
        (torch.ops.aten.relu.default, set()),  # Inductor lowers aten ops for every device it targets
    ],
)
def test_ops_of_any_namespace_are_judged_by_their_kernels(target, flagged_for):
    for device in ("cpu", "cuda", "xpu"):
        reasons = [why for _, why in find_cuda_only_nodes(one_call_graph(target), torch.device(device))]
        if device in flagged_for:
            assert reasons == [f"{op_qualname(target)} has no {device} kernel and no native lowering is registered"]
        else:
            assert reasons == []


def test_fresh_namespace_cuda_only_op_fails_the_compile_with_its_line():
    def fn(x):
        return torch.ops.dsv4_audit_fresh.cuda_only(x) + 1

    with pytest.raises(Exception, match=r"dsv4_audit_fresh::cuda_only has no cpu kernel") as info:
        torch.compile(fn, backend="dsv4_xpu")(torch.randn(3))
    assert "test_pass_audit.py" in str(info.value) and "cuda_only(x) + 1" in str(info.value)


def test_audit_looks_inside_subgraphs():
    def fn(pred, x):
        return torch.cond(pred, lambda y: torch.ops.dsv4_audit_fresh.cuda_only(y), lambda y: y + 1, (x,))

    gm, _ = capture_graph(fn, torch.tensor(True), torch.randn(3))
    (finding,) = find_cuda_only_nodes(gm, torch.device("cpu"))
    assert "dsv4_audit_fresh::cuda_only has no cpu kernel" in finding[1] and "subgraph" in finding[1]
    assert "of cond" in finding[1]

import pytest
import torch

from dsv4_compile.errors import CudaOnlyNodesError
from dsv4_compile.passes.audit import audit_residual_cuda, find_cuda_only_nodes
from dsv4_compile.passes.base import PassContext

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

import pytest
import torch
from torch._dynamo.graph_bytecode_inputs import get_external_object_by_index

from dsv4_compile.lowering.passes.audit import find_cuda_only_nodes
from dsv4_compile.lowering.passes.aux_streams import remove_aux_streams, stream_tag
from dsv4_compile.lowering.passes.base import PassContext
from tests.conftest import capture_graph, targets

CTX = PassContext(device=torch.device("cpu"))


class ForkJoin(torch.nn.Module):
    """The CUDA-path helper: fn0 on the current stream, fn1 on an aux stream, joined by events."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.aux = torch.cuda.Stream()
        self.fork, self.join = torch.cuda.Event(), torch.cuda.Event()

    def forward(self, x):
        self.fork.record()
        a = self.lin(x)
        with torch.cuda.stream(self.aux):
            self.fork.wait()
            b = x.sin() * 3
            self.join.record()
        self.join.wait()
        torch.cuda.current_stream().wait_stream(self.aux)
        return a + b


def test_torch_2_13_spelling_is_removed_and_numbers_kept():
    with torch.no_grad():
        import dsv4_compile

        with dsv4_compile.cuda_compat("cpu"):
            model = ForkJoin()
            x = torch.randn(4, 8)
            expected = model(x)
        gm, inputs = capture_graph(model, x)
    before = targets(gm)
    assert any(t.startswith("streams::") for t in before)
    assert any(stream_tag(n) is not None for n in gm.graph.nodes)
    result = remove_aux_streams(gm, CTX)
    gm.graph.lint()
    gm.recompile()
    after = targets(gm)
    assert not any(t.startswith("streams::") or "get_external_object" in t for t in after)
    assert all(stream_tag(n) is None for n in gm.graph.nodes)
    assert result.changed == result.matched > 0
    assert find_cuda_only_nodes(gm, CTX.device) == []
    torch.testing.assert_close(gm(*inputs)[0], expected)
    again = remove_aux_streams(gm, CTX)
    assert (again.matched, again.changed) == (0, 0)


def test_torch_2_11_spelling_call_methods_on_external_objects():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    cur = graph.call_function(get_external_object_by_index, (0,))
    aux = graph.call_function(get_external_object_by_index, (1,))
    graph.call_method("wait_stream", (aux, cur))
    y = graph.call_function(torch.mul, (x, 2))
    y.meta["custom"] = {"stream": 1}
    graph.call_method("record_stream", (y, aux))
    graph.call_method("wait_stream", (cur, aux))
    graph.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    result = remove_aux_streams(gm, CTX)
    gm.recompile()
    assert targets(gm) == ["torch.mul"]
    assert "custom" not in y.meta
    assert result.changed == 6
    torch.testing.assert_close(gm(torch.ones(2)), torch.full((2,), 2.0))


def test_stream_object_still_used_elsewhere_is_left_for_the_audit():
    graph = torch.fx.Graph()
    graph.placeholder("x")
    aux = graph.call_function(get_external_object_by_index, (1,))
    graph.output(aux)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    result = remove_aux_streams(gm, CTX)
    assert (result.matched, result.changed) == (1, 0)
    with pytest.raises(Exception, match="stream/event"):
        from dsv4_compile.lowering.passes.audit import audit_residual_cuda

        audit_residual_cuda(gm, CTX)

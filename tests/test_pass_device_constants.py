import torch

from dsv4_compile.lowering.passes.base import PassContext
from dsv4_compile.lowering.passes.device_constants import cuda_device_uses, retarget_device_constants

CPU = PassContext(device=torch.device("cpu"))


def cuda_graph() -> torch.fx.GraphModule:
    """A graph as captured with CUDA semantics: factory kwargs, .to("cuda"), .cuda()."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    idx = graph.call_function(torch.arange, (4,), {"device": torch.device("cuda", 0)})
    zeros = graph.call_function(torch.zeros, (4,), {"device": "cuda", "dtype": torch.float32})
    moved = graph.call_method("to", (x, "cuda"))
    moved2 = graph.call_method("cuda", (moved,))
    total = graph.call_function(torch.add, (moved2, idx))
    graph.output(graph.call_function(torch.add, (total, zeros)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_every_cuda_constant_is_retargeted():
    gm = cuda_graph()
    result = retarget_device_constants(gm, CPU)
    gm.graph.lint()
    gm.recompile()
    assert (result.matched, result.changed) == (4, 4)
    assert not any(cuda_device_uses(n) for n in gm.graph.nodes)
    assert "type='cuda'" not in gm.code and "'cuda'" not in gm.code and ".cuda(" not in gm.code
    torch.testing.assert_close(gm(torch.ones(4)), torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_idempotent_and_cuda_target_untouched():
    gm = cuda_graph()
    retarget_device_constants(gm, CPU)
    again = retarget_device_constants(gm, CPU)
    assert (again.matched, again.changed) == (0, 0)
    untouched = cuda_graph()
    code = untouched.code
    assert retarget_device_constants(untouched, PassContext(device=torch.device("cuda"))).changed == 0
    assert untouched.code == code

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import (
    kernel_side_table,
    triton_kernel_wrapper_mutation,
)

from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.lowering.passes.audit import find_cuda_only_nodes, pdl_flags
from dsv4_compile.lowering.passes.base import PassContext
from dsv4_compile.lowering.passes.pdl import disable_pdl
from dsv4_compile.lowering.registry import triton_fallback


def _double_into_kernel(x_ptr, out_ptr, n, BLOCK, USE_GDC):
    """Stands in for a @triton.jit kernel: the pass only needs its name."""


@triton_fallback("_double_into_kernel")
def _double_into_fallback(x_ptr, out_ptr, n, BLOCK):
    out_ptr.copy_(x_ptr * 2)


def launch_graph(kernel=_double_into_kernel, pdl=True) -> torch.fx.GraphModule:
    """What Dynamo captures for `kernel[grid](x, out, n, BLOCK=64, USE_GDC=pdl, launch_pdl=pdl)`."""
    graph = torch.fx.Graph()
    x, out = graph.placeholder("x"), graph.placeholder("out")
    constants = {"n": 4, "BLOCK": 64, "USE_GDC": pdl, "launch_pdl": pdl}
    launch = graph.call_function(
        triton_kernel_wrapper_mutation,
        kwargs={"kernel_idx": kernel_side_table.add_kernel(kernel),
                "constant_args_idx": kernel_side_table.add_constant_args(constants),
                "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x_ptr": x, "out_ptr": out}},
    )
    launch.meta["stack_trace"] = '  File "/src/compressor.py", line 7, in forward\n    kernel[grid](...)\n'
    graph.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("device", ["xpu", "cuda"])
def test_triton_targets_keep_the_kernel_without_pdl(device):
    gm = launch_graph()
    ctx = PassContext(device=torch.device(device))
    assert find_cuda_only_nodes(gm, ctx.device)
    result = disable_pdl(gm, ctx)
    gm.graph.lint()
    (launch,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    constants = kernel_side_table.get_constant_args(launch.kwargs["constant_args_idx"])
    assert "launch_pdl" not in constants and constants["USE_GDC"] is False and constants["BLOCK"] == 64
    assert (result.matched, result.changed) == (1, 1)
    assert pdl_flags(launch) == [] and find_cuda_only_nodes(gm, ctx.device) == []
    assert disable_pdl(gm, ctx).changed == 0  # idempotent


def test_cpu_replaces_the_launch_with_the_registered_fallback():
    gm = launch_graph()
    result = disable_pdl(gm, PassContext(device=torch.device("cpu")))
    gm.graph.lint()
    gm.recompile()
    assert result.changed == 1
    assert not any(n.target is triton_kernel_wrapper_mutation for n in gm.graph.nodes)
    x, out = torch.arange(4.0), torch.zeros(4)
    torch.testing.assert_close(gm(x, out), x * 2)


def test_cpu_without_fallback_names_the_kernel_and_line():
    def _unregistered_kernel(x_ptr, out_ptr, n, BLOCK, USE_GDC):
        pass

    expected = r"'_unregistered_kernel' has no plain-torch fallback[\s\S]*compressor.py"
    with pytest.raises(UnsupportedNodeError, match=expected):
        disable_pdl(launch_graph(_unregistered_kernel), PassContext(device=torch.device("cpu")))

"""PDL off in both spellings: `launch_pdl` as a launch option (dropped) and as a `tl.constexpr` parameter of the
kernel, as vLLM's DeepSeek-V4 kernels take it (set to False: dropping it would leave the kernel short of an
argument); a GDC guard `USE_GDC` is set to False. The kernels are real Triton JITFunctions where Triton is
installed (`make test-triton`); no GPU is needed, the launches are graph nodes that are rewritten, not run."""

from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_mutation
from torch.utils._triton import has_triton_package

from dsv4_compile.lowering.passes.base import PassContext
from dsv4_compile.lowering.passes.pdl import disable_pdl, kernel_parameters, pdl_off


@pytest.mark.parametrize(
    ("constants", "parameters", "expected"),
    [
        ({"launch_pdl": True, "BLOCK": 64}, frozenset({"x_ptr", "BLOCK"}), {"BLOCK": 64}),  # launch option
        ({"launch_pdl": True, "BLOCK": 64}, frozenset({"x_ptr", "BLOCK", "launch_pdl"}),
         {"launch_pdl": False, "BLOCK": 64}),  # constexpr parameter
        ({"USE_GDC": True, "launch_pdl": True}, frozenset({"USE_GDC"}), {"USE_GDC": False}),
        ({"BLOCK": 64}, frozenset({"BLOCK"}), {"BLOCK": 64}),
    ],
)
def test_pdl_off_in_both_spellings(constants, parameters, expected):
    assert pdl_off(constants, parameters) == expected


def _launch_graph(kernel, constants: dict) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(triton_kernel_wrapper_mutation, kwargs={
        "kernel_idx": kernel_side_table.add_kernel(kernel),
        "constant_args_idx": kernel_side_table.add_constant_args(constants),
        "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x_ptr": x},
    })
    graph.output(x)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.skipif(not has_triton_package(), reason="needs the triton package to build real kernels "
                    "(make test-triton installs it)")
@pytest.mark.parametrize("device", ["xpu", "cuda"])
def test_real_kernels_get_pdl_off_in_their_own_spelling(device):
    import triton
    import triton.language as tl

    @triton.jit
    def scale_with_pdl_param(x_ptr, BLOCK: tl.constexpr, launch_pdl: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)

    @triton.jit
    def scale(x_ptr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)

    assert kernel_parameters(scale_with_pdl_param) == {"x_ptr", "BLOCK", "launch_pdl"}
    for kernel, expected in ((scale_with_pdl_param, {"BLOCK": 8, "launch_pdl": False}), (scale, {"BLOCK": 8})):
        gm = _launch_graph(kernel, {"BLOCK": 8, "launch_pdl": True})
        result = disable_pdl(gm, PassContext(device=torch.device(device)))
        (launch,) = [n for n in gm.graph.nodes if n.target is triton_kernel_wrapper_mutation]
        assert (result.matched, result.changed) == (1, 1)
        assert kernel_side_table.get_constant_args(launch.kwargs["constant_args_idx"]) == expected
        assert disable_pdl(gm, PassContext(device=torch.device(device))).matched == 0  # idempotent

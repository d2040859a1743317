"""Pass `pdl`: programmatic dependent launch off, for user Triton kernels.

Matches: user Triton launches captured by Dynamo (`triton_kernel_wrapper_mutation` / `_functional`) whose
constant arguments (kept in Inductor's kernel side table, not in the graph) carry `launch_pdl` or `USE_GDC`.
Emits:   for Triton targets (xpu, cuda): the same launch with PDL off: `launch_pdl` dropped where it is a launch
         option, set to False where it is a `tl.constexpr` parameter of the kernel (vLLM), `USE_GDC=False`
         (Intel's Triton has no PDL); for targets without Triton (cpu): a call of the kernel's registered
         plain-torch fallback (dsv4_compile.lowering.registry.triton_fallback), which fills the same tensors.
"""

from __future__ import annotations

import torch
import torch.fx

from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.lowering.devices import TRITON_DEVICE_TYPES
from dsv4_compile.lowering.passes.base import PassContext, PassResult, copy_provenance, graph_scopes
from dsv4_compile.lowering.registry import TRITON_FALLBACKS, kernel_name

TRITON_WRAPPERS = ("triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional")


def is_triton_launch(node: torch.fx.Node) -> bool:
    """A user-Triton kernel launch as Dynamo captures it."""
    return node.op == "call_function" and getattr(node.target, "__name__", None) in TRITON_WRAPPERS


def disable_pdl(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Turn PDL off in every user Triton launch of `gm` and its subgraphs (on CPU: the kernels' fallbacks)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    result = PassResult()
    for scope in graph_scopes(gm):
        for node in list(scope.gm.graph.nodes):
            if not is_triton_launch(node):
                continue
            constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
            if ctx.device.type in TRITON_DEVICE_TYPES:
                if not pdl_flags(node):
                    continue
                scope.require_rewritable(node, "a Triton launch with PDL")
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                cleaned = pdl_off(constants, kernel_parameters(kernel))
                node.kwargs = {**node.kwargs, "constant_args_idx": kernel_side_table.add_constant_args(cleaned)}
            else:
                scope.require_rewritable(node, "a Triton launch")
                _replace_with_fallback(scope.gm.graph, node, constants, kernel_side_table)
            result.count(matched=1, changed=1)
    return result


def pdl_off(constants: dict[str, object], parameters: frozenset[str]) -> dict[str, object]:
    """The launch's constant arguments with PDL off, in both spellings: `launch_pdl` as a launch option is
    dropped, `launch_pdl` as a `tl.constexpr` parameter of the kernel (vLLM's spelling) is set to False, and a
    GDC guard (`USE_GDC`) is set to False."""
    cleaned = dict(constants)
    if "launch_pdl" in cleaned:
        if "launch_pdl" in parameters:
            cleaned["launch_pdl"] = False
        else:
            del cleaned["launch_pdl"]
    if "USE_GDC" in cleaned:
        cleaned["USE_GDC"] = False
    return cleaned


def kernel_parameters(kernel: object) -> frozenset[str]:
    """The parameter names of a Triton kernel (JITFunction, or one wrapped by an Autotuner / heuristics)."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return frozenset(getattr(kernel, "arg_names", ()))


def pdl_flags(node: torch.fx.Node) -> list[str]:
    """The PDL settings that are on in a user-Triton launch node ('launch_pdl', 'USE_GDC')."""
    if not is_triton_launch(node):
        return []
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    index = node.kwargs.get("constant_args_idx")
    constants = kernel_side_table.get_constant_args(index) if index is not None else {}
    return [key for key in ("launch_pdl", "USE_GDC") if constants.get(key)]


def _replace_with_fallback(graph: torch.fx.Graph, node: torch.fx.Node, constants: dict, table: object) -> None:
    name = kernel_name(table.get_kernel(node.kwargs["kernel_idx"]))
    fallback = TRITON_FALLBACKS.get(name)
    if fallback is None:
        raise UnsupportedNodeError(node, f"user Triton kernel '{name}' has no plain-torch fallback for a target "
                                   "without Triton; register one with dsv4_compile.lowering.registry.triton_fallback")
    if node.target.__name__ == "triton_kernel_wrapper_functional":
        raise UnsupportedNodeError(node, f"functional launch of '{name}' on a target without Triton is not supported")
    arguments = {k: v for k, v in constants.items() if k not in ("launch_pdl", "USE_GDC")}
    with graph.inserting_before(node):
        call = graph.call_function(fallback, kwargs={**arguments, **node.kwargs["kwargs"]})
    copy_provenance(node, call)
    graph.erase_node(node)

"""Pass `pdl`: programmatic dependent launch off, for user Triton kernels.

Matches: user Triton launches captured by Dynamo (`triton_kernel_wrapper_mutation` / `_functional`) whose
constant arguments (kept in Inductor's kernel side table, not in the graph) carry `launch_pdl` or `USE_GDC`.
Emits:   for Triton targets (xpu, cuda): the same launch with `launch_pdl` dropped and `USE_GDC=False`
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
                cleaned = {k: v for k, v in constants.items() if k != "launch_pdl"}
                if "USE_GDC" in cleaned:
                    cleaned["USE_GDC"] = False
                node.kwargs = {**node.kwargs, "constant_args_idx": kernel_side_table.add_constant_args(cleaned)}
            else:
                scope.require_rewritable(node, "a Triton launch")
                _replace_with_fallback(scope.gm.graph, node, constants, kernel_side_table)
            result.count(matched=1, changed=1)
    return result


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

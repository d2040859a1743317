"""Pass `pdl`: programmatic dependent launch off, for user Triton kernels.

Matches: user Triton launches captured by Dynamo (`triton_kernel_wrapper_mutation` / `_functional`) whose
constant arguments (kept in Inductor's kernel side table, not in the graph) carry `launch_pdl` or `USE_GDC`.
Emits:   for Triton targets (xpu, cuda): the same launch with `launch_pdl` dropped and `USE_GDC=False`
         (Intel's Triton has no PDL); for targets without Triton (cpu): a call of the kernel's registered
         plain-torch fallback (dsv4_compile.registry.triton_fallback), which fills the same tensors.
"""

from __future__ import annotations

import torch
import torch.fx

from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.passes.base import PassContext, PassResult, copy_provenance
from dsv4_compile.registry import TRITON_FALLBACKS, kernel_name

TRITON_WRAPPERS = ("triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional")
TRITON_TARGETS = ("cuda", "xpu")


def is_triton_launch(node: torch.fx.Node) -> bool:
    """A user-Triton kernel launch as Dynamo captures it."""
    return node.op == "call_function" and getattr(node.target, "__name__", None) in TRITON_WRAPPERS


def disable_pdl(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Turn PDL off in every user Triton launch of `gm` (or replace launches by fallbacks on CPU)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    result = PassResult()
    for node in list(gm.graph.nodes):
        if not is_triton_launch(node):
            continue
        constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
        pdl_on = bool(constants.get("launch_pdl")) or bool(constants.get("USE_GDC"))
        if ctx.device.type in TRITON_TARGETS:
            if not pdl_on:
                continue
            result.matched += 1
            cleaned = {k: v for k, v in constants.items() if k != "launch_pdl"}
            if "USE_GDC" in cleaned:
                cleaned["USE_GDC"] = False
            node.kwargs = {**node.kwargs, "constant_args_idx": kernel_side_table.add_constant_args(cleaned)}
        else:
            result.matched += 1
            _replace_with_fallback(gm.graph, node, constants, kernel_side_table)
        result.changed += 1
    return result


def _replace_with_fallback(graph: torch.fx.Graph, node: torch.fx.Node, constants: dict, table: object) -> None:
    name = kernel_name(table.get_kernel(node.kwargs["kernel_idx"]))
    fallback = TRITON_FALLBACKS.get(name)
    if fallback is None:
        raise UnsupportedNodeError(node, f"user Triton kernel '{name}' has no plain-torch fallback for a target "
                                   "without Triton; register one with dsv4_compile.registry.triton_fallback")
    if node.target.__name__ == "triton_kernel_wrapper_functional":
        raise UnsupportedNodeError(node, f"functional launch of '{name}' on a target without Triton is not supported")
    arguments = {k: v for k, v in constants.items() if k not in ("launch_pdl", "USE_GDC")}
    with graph.inserting_before(node):
        call = graph.call_function(fallback, kwargs={**arguments, **node.kwargs["kwargs"]})
    copy_provenance(node, call)
    graph.erase_node(node)

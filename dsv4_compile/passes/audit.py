"""Pass `audit` (always last): the residual-CUDA check.

Matches: whatever CUDA-only construct is still in the graph after the rewrites:
  - calls of ops with a registered native lowering (their pass was disabled or did not apply);
  - ops of CUDA-only namespaces (`_C`, `_moe_C`, `_flashmla_C`, ...) with no kernel for the target device;
  - stream/event nodes and stream tags;
  - `cuda` device constants, on a non-CUDA target;
  - user Triton launches with PDL (`launch_pdl=True` or `USE_GDC=True`).
Emits:   nothing. Under `strict` it raises one CudaOnlyNodesError naming every offending node with its op
         and user source line; otherwise it warns once with the same text and lets the graph through.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.fx

from dsv4_compile.errors import CudaOnlyNodesError
from dsv4_compile.passes.aux_streams import is_stream_node, stream_tag
from dsv4_compile.passes.base import PassContext, PassResult
from dsv4_compile.passes.device_constants import cuda_device_uses
from dsv4_compile.passes.pdl import is_triton_launch
from dsv4_compile.registry import CUDA_ONLY_NAMESPACES, LOWERINGS, has_kernel_for, op_qualname

log = logging.getLogger("dsv4_compile")

def find_cuda_only_nodes(gm: torch.fx.GraphModule, device: torch.device) -> list[tuple[torch.fx.Node, str]]:
    """Every CUDA-only node of `gm` for target `device`, with the reason it is CUDA-only."""
    findings = []
    for node in gm.graph.nodes:
        why = _why_cuda_only(node, device)
        if why:
            findings.append((node, why))
    return findings


def _why_cuda_only(node: torch.fx.Node, device: torch.device) -> str | None:
    qualname = op_qualname(node.target) if node.op == "call_function" else None
    if qualname in LOWERINGS:
        return f"{qualname} has a native lowering that was not applied (is its pass disabled?)"
    if qualname and qualname.split("::")[0] in CUDA_ONLY_NAMESPACES and not has_kernel_for(qualname, device.type):
        return f"{qualname} has no {device.type} kernel and no native lowering is registered"
    if is_stream_node(node):
        return "stream/event operation (serial execution needs none)"
    if stream_tag(node) is not None:
        return f"tagged to run on stream {stream_tag(node)}"
    if device.type != "cuda" and node.op in ("call_function", "call_method") and cuda_device_uses(node):
        return f"cuda device constant ({', '.join(cuda_device_uses(node))})"
    if pdl_flags(node):
        return f"Triton launch with programmatic dependent launch ({', '.join(pdl_flags(node))})"
    return None


def pdl_flags(node: torch.fx.Node) -> list[str]:
    """The PDL settings that are on in a user-Triton launch node ('launch_pdl', 'USE_GDC')."""
    if not is_triton_launch(node):
        return []
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    index = node.kwargs.get("constant_args_idx")
    constants = kernel_side_table.get_constant_args(index) if index is not None else {}
    return [key for key in ("launch_pdl", "USE_GDC") if constants.get(key)]


def audit_residual_cuda(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Raise (strict) or warn if `gm` still holds CUDA-only nodes; counts them as matched."""
    findings = find_cuda_only_nodes(gm, ctx.device)
    if findings:
        error = CudaOnlyNodesError(findings, str(ctx.device))
        if ctx.strict:
            raise error
        log.warning("%s", error)
        warnings.warn(str(error), stacklevel=2)
    return PassResult(matched=len(findings), changed=0)

"""Pass `audit` (always last): the residual-CUDA check, over the top graph and every subgraph.

Matches: whatever cannot run on the target device after the rewrites:
  - calls of ops with a registered native lowering (their family was disabled, or they could not be lowered);
  - any other operator call (OpOverload or packet, whatever its namespace) with no kernel for the target
    device and no composite implementation; `aten` and `prims` ops are Inductor's own and always lowered;
  - ops known to be CUDA-only although they report a kernel for the target (the refused op rows of
    dsv4_compile.vllm_constructs: vLLM registers its Python kernel wrappers under the platform's dispatch key,
    so on a CPU build `vllm::mhc_pre_tilelang` "has" a CPU kernel, one that needs tilelang);
  - stream/event nodes and stream tags;
  - `cuda` device constants, on a non-CUDA target;
  - user Triton launches with PDL (`launch_pdl=True` or `USE_GDC=True`).
Emits:   nothing. Under `strict` it raises one CudaOnlyNodesError naming every offending node with its op
         and user source line; otherwise it warns once with the same text and lets the graph through.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings

import torch
import torch.fx

from dsv4_compile.errors import CudaOnlyNodesError
from dsv4_compile.lowering.devices import TRITON_DEVICE_TYPES
from dsv4_compile.lowering.passes.aux_streams import is_stream_node, stream_tag
from dsv4_compile.lowering.passes.base import PassContext, PassResult, graph_scopes
from dsv4_compile.lowering.passes.device_constants import cuda_device_uses
from dsv4_compile.lowering.passes.pdl import pdl_flags
from dsv4_compile.lowering.registry import LOWERINGS
from dsv4_compile.vllm_constructs import TARGETS, cuda_only_op_patterns

log = logging.getLogger("dsv4_compile")

# Inductor lowers or decomposes these itself, for every device it generates code for.
INDUCTOR_NAMESPACES = frozenset({"aten", "prims"})
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU"}
_COMPOSITE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")


def find_cuda_only_nodes(gm: torch.fx.GraphModule, device: torch.device) -> list[tuple[torch.fx.Node, str]]:
    """Every node of `gm` and its subgraphs that cannot run on `device`, with the reason."""
    findings = []
    for scope in graph_scopes(gm):
        where = f" (in subgraph '{scope.path}' of {scope.hop})" if scope.hop else ""
        for node in scope.gm.graph.nodes:
            why = _why_cuda_only(node, device)
            if why:
                findings.append((node, why + where))
    return findings


def overloads_of(target: object) -> list[torch._ops.OpOverload]:
    """The overloads a call target may dispatch to: itself, or every overload of a packet."""
    if isinstance(target, torch._ops.OpOverload):
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, name) for name in target.overloads()]
    return []


def has_kernel_for(overload: torch._ops.OpOverload, device_type: str) -> bool:
    """Whether `overload` can run on `device_type`: a kernel for its dispatch key or a composite one."""
    name = overload.name()
    keys = (_DEVICE_KEYS.get(device_type, device_type.upper()), *_COMPOSITE_KEYS)
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in keys)


def known_cuda_only(qualname: str, device: torch.device) -> str | None:
    """Why `qualname` is CUDA-only on `device` although it may report a kernel for it; None if not known so."""
    # a device type the table does not name is judged as a target without Triton, or as XPU with it
    target = device.type if device.type in TARGETS else ("xpu" if device.type in TRITON_DEVICE_TYPES else "cpu")
    table = cuda_only_op_patterns(target)
    return next((why for pattern, why in table.items() if fnmatch.fnmatchcase(qualname, pattern)), None)


def _why_cuda_only(node: torch.fx.Node, device: torch.device) -> str | None:
    overloads = overloads_of(node.target) if node.op == "call_function" else []
    if overloads:
        qualname = overloads[0]._schema.name
        if qualname in LOWERINGS:
            return (f"{qualname} has a native lowering that was not applied (is its family "
                    f"'{LOWERINGS[qualname].family}' or the lower_ops pass disabled?)")
        namespace = qualname.split("::", 1)[0]
        if namespace == "streams":
            return "stream/event operation (serial execution needs none)"
        if namespace not in INDUCTOR_NAMESPACES and not any(has_kernel_for(o, device.type) for o in overloads):
            return f"{qualname} has no {device.type} kernel and no native lowering is registered"
        known = known_cuda_only(qualname, device)
        if known is not None:
            return f"{qualname} is {known}, and no native lowering is registered"
    if is_stream_node(node):
        return "stream/event operation (serial execution needs none)"
    if stream_tag(node) is not None:
        return f"tagged to run on stream {stream_tag(node)}"
    if device.type != "cuda" and node.op in ("call_function", "call_method") and cuda_device_uses(node):
        return f"cuda device constant ({', '.join(cuda_device_uses(node))})"
    if pdl_flags(node):
        return f"Triton launch with programmatic dependent launch ({', '.join(pdl_flags(node))})"
    return None


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

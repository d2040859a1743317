"""Pass `device_constants`.

Matches: `cuda` devices baked into the graph: `device=` keyword arguments (factory calls such as
`torch.arange(n, device="cuda")`, `tensor.new_zeros(..., device=...)`), device arguments of `.to(...)`, and
`.cuda()` calls.
Emits:   the same calls with the target device (`.cuda()` becomes `.to(device)`); a `cuda` target leaves
         the graph unchanged.
"""

from __future__ import annotations

import torch
import torch.fx

from dsv4_compile.lowering.devices import is_cuda_device
from dsv4_compile.lowering.passes.base import PassContext, PassResult, graph_scopes


def cuda_device_uses(node: torch.fx.Node) -> list[str]:
    """Where `node` names a cuda device: 'kwarg device', 'arg 1', or 'method cuda'."""
    found = [f"kwarg {key}" for key, value in node.kwargs.items() if is_cuda_device(value)]
    if node.op == "call_method" and node.target == "cuda":
        found.append("method cuda")
    if node.op == "call_method" and node.target == "to":
        found += [f"arg {i}" for i, value in enumerate(node.args) if is_cuda_device(value)]
    return found


def retarget_device_constants(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Point every `cuda` device constant of `gm` and its subgraphs at `ctx.device`."""
    result = PassResult()
    if ctx.device.type == "cuda":
        return result
    for scope in graph_scopes(gm):
        for node in scope.gm.graph.nodes:
            if node.op in ("call_function", "call_method") and cuda_device_uses(node):
                scope.require_rewritable(node, "a cuda device constant")
                _retarget(node, ctx.device)
                result.count(matched=1, changed=1)
    return result


def _retarget(node: torch.fx.Node, device: torch.device) -> None:
    node.kwargs = {k: device if is_cuda_device(v) else v for k, v in node.kwargs.items()}
    if node.op == "call_method" and node.target == "to":
        node.args = tuple(device if is_cuda_device(a) else a for a in node.args)
    if node.op == "call_method" and node.target == "cuda":
        node.target = "to"
        node.args = (node.args[0], device)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k == "non_blocking"}
    # The recorded fake value still says cuda; drop it rather than leave a lie for later passes.
    node.meta.pop("example_value", None)
    node.meta.pop("val", None)

"""Replace calls of a registered CUDA-only op by its native lowering (see dsv4_compile.registry).

Functional ops: the call becomes a call of the native function.
Out-parameter ops (return nothing, fill a buffer):
  - the buffer is fresh (`torch.empty`-like, untouched before the call): every later use of the buffer
    reads the functional result instead, and the empty allocation goes away;
  - otherwise (a graph input, a view of a bigger tensor, a reused buffer) the buffer is still filled,
    through `aten.copy_`, so the caller sees the same memory effect as with the CUDA kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.passes.base import PassResult, copy_provenance, example_value
from dsv4_compile.registry import _NO_DEFAULT, LOWERINGS, NativeLowering, op_qualname

_EMPTY_FUNCTIONS = {
    torch.empty, torch.empty_like, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default
}
_EMPTY_METHODS = {"new_empty", "new_empty_strided"}


def lower_registered_op(
    gm: torch.fx.GraphModule, qualname: str, overrides: Mapping[str, object] | None = None
) -> PassResult:
    """Rewrite every call of `qualname` in `gm` to its registered native lowering.

    `overrides` replaces bound arguments by name (e.g. None for inputs the native math does not need).
    """
    lowering = LOWERINGS[qualname]
    result = PassResult()
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_qualname(node.target) != qualname:
            continue
        result.matched += 1
        bound = _bind(node, lowering)
        _check_contract(node, lowering, bound)
        bound = {**bound, **(overrides or {})}
        if lowering.out_arg is None:
            _replace_functional(gm.graph, node, lowering, bound)
        else:
            _replace_out_style(gm.graph, node, lowering, bound, order)
        result.changed += 1
    return result


def _bind(node: torch.fx.Node, lowering: NativeLowering) -> dict[str, object]:
    """Map the call's args/kwargs to the lowering's parameter names, checking the op's real schema."""
    names = [name for name, _ in lowering.params]
    schema_names = _schema_arg_names(node.target)
    if schema_names is not None and schema_names != names[: len(schema_names)]:
        raise UnsupportedNodeError(
            node, f"{lowering.qualname} has schema arguments {schema_names}; the native lowering expects {names}"
        )
    if len(node.args) > len(names):
        raise UnsupportedNodeError(node, f"{lowering.qualname} called with {len(node.args)} positional arguments; "
                                   f"expected at most {len(names)} ({', '.join(names)})")
    unknown = set(node.kwargs) - set(names)
    if unknown:
        raise UnsupportedNodeError(node, f"{lowering.qualname} called with unknown keyword(s) {sorted(unknown)}")
    bound = dict(zip(names, node.args))
    for name, default in lowering.params:
        if name in node.kwargs:
            if name in bound:
                raise UnsupportedNodeError(node, f"{lowering.qualname}: argument '{name}' given twice")
            bound[name] = node.kwargs[name]
        elif name not in bound:
            if default is _NO_DEFAULT:
                raise UnsupportedNodeError(node, f"{lowering.qualname}: missing required argument '{name}'")
            bound[name] = default
    return bound


def _check_contract(node: torch.fx.Node, lowering: NativeLowering, bound: dict[str, object]) -> None:
    """Run the lowering's contract check on the call's recorded example values (skipped when an argument has
    none): a call the kernel would reject must not become a native call that broadcasts or casts instead."""
    if lowering.check is None:
        return
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(list(bound.values()), nodes.append)
    if any(example_value(n) is None for n in nodes):
        return
    values = torch.fx.node.map_arg(bound, example_value)
    try:
        lowering.check(**values)
    except ValueError as exc:
        raise UnsupportedNodeError(node, f"{lowering.qualname}: the call breaks the kernel's contract: {exc}") from exc


def _schema_arg_names(target: object) -> list[str] | None:
    overload = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
    schema = getattr(overload, "_schema", None)
    return None if schema is None else [arg.name for arg in schema.arguments]


def _replace_functional(graph: torch.fx.Graph, node: torch.fx.Node, lowering: NativeLowering, bound: dict) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(lowering.native, kwargs=bound)
    copy_provenance(node, new)
    if "example_value" in node.meta:
        new.meta["example_value"] = node.meta["example_value"]
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _replace_out_style(
    graph: torch.fx.Graph, node: torch.fx.Node, lowering: NativeLowering, bound: dict, order: dict
) -> None:
    if node.users:
        raise UnsupportedNodeError(node, f"{lowering.qualname} returns nothing, yet its result is used")
    out = bound.pop(lowering.out_arg)
    out_value = example_value(out)
    kwargs = dict(bound)
    if isinstance(out_value, torch.Tensor):
        kwargs["out_dtype"] = out_value.dtype
    with graph.inserting_before(node):
        new = graph.call_function(lowering.native, kwargs=kwargs)
    copy_provenance(node, new)
    if isinstance(out_value, torch.Tensor) and _is_fresh_buffer(out, node, order):
        new.meta["example_value"] = out_value
        for user in list(out.users):
            if user is not node:
                user.replace_input_with(out, new)
        graph.erase_node(node)
        if not out.users:
            graph.erase_node(out)
        return
    with graph.inserting_after(new):
        fill = graph.call_function(torch.ops.aten.copy_.default, (out, new))
    copy_provenance(node, fill)
    graph.erase_node(node)


def _is_fresh_buffer(out: object, call: torch.fx.Node, order: dict) -> bool:
    """An uninitialised allocation that nothing reads or aliases before `call` fills it."""
    if not isinstance(out, torch.fx.Node):
        return False
    allocates = (out.op == "call_function" and out.target in _EMPTY_FUNCTIONS) or (
        out.op == "call_method" and out.target in _EMPTY_METHODS
    )
    if not allocates:
        return False
    return all(user is call or order.get(user, -1) > order[call] for user in out.users)

"""Pass `lower_ops`: every call of an op in the registry (dsv4_compile.lowering.registry) becomes its native
lowering, in the top graph and in every higher-order-op subgraph; counted per op family for the report.

Matches: call_function nodes whose target is a registered op (OpOverloadPacket or OpOverload).
Emits:
  - functional op: a call of the native function with the op's arguments bound by name to its schema;
  - op that mutates arguments in place (`mutates=`: a cache scatter, several outs): the same call, kept as a
    side effect; the native function writes those arguments with in-place torch ops;
  - out-style op whose buffer is fresh (`torch.empty`-like, read by nothing before the call): the native call,
    and every later reader of the buffer reads its value; the allocation goes;
  - out-style op whose buffer is the caller's (graph input, a view, a reused buffer): `<native>_into(...)`,
    which computes and writes the buffer, refusing a value of another shape or dtype (no broadcast, no cast).
The kernel's contract check (`check=`) runs on the recorded values at rewrite time; when a value is not
recorded the emitted call runs it instead (`<native>_checked` / `_into`), so a bad call never passes silently.
Where the target's library has a kernel with the op's contract (lowering/kernel_providers.py), the call may get
that kernel instead of the native math; the result's `kernels` says which each op got.
Arguments a lowering `ignores` are dropped, and their producers (a tile scheduler) go once unused. A `paged`
cache given as a reshape that keeps its block dim (`cache.view(cache.shape[0], -1)`) is given as the tensor it
reshapes, so that Inductor writes the graph input in place.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
from torch.fx.operator_schemas import normalize_function

from dsv4_compile.errors import UnsupportedNodeError, describe_node
from dsv4_compile.lowering.kernel_providers import choose
from dsv4_compile.lowering.passes.base import (
    PassContext,
    PassResult,
    copy_provenance,
    erase_dead_producers,
    example_value,
    graph_scopes,
)
from dsv4_compile.lowering.registry import LOWERINGS, NativeLowering, op_qualname

_EMPTY_FUNCTIONS = {
    torch.empty, torch.empty_like, torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default
}
_EMPTY_METHODS = {"new_empty", "new_empty_strided"}


def lowering_for(node: torch.fx.Node) -> NativeLowering | None:
    """The registered lowering of the op `node` calls, else None."""
    return LOWERINGS.get(op_qualname(node.target)) if node.op == "call_function" else None


def lower_registered_ops(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every registered-op call in `gm` and its subgraphs to the op's native lowering."""
    result = PassResult(detail={family: PassResult(skipped=True) for family in sorted(ctx.disabled_families)})
    for scope in graph_scopes(gm):
        graph = scope.gm.graph
        order = {node: i for i, node in enumerate(graph.nodes)}
        dropped: list[torch.fx.Node] = []
        for node in list(graph.nodes):
            lowering = lowering_for(node)
            if lowering is None or lowering.family in ctx.disabled_families:
                continue
            scope.require_rewritable(node, lowering.qualname)
            arguments = bind_arguments(node, lowering)
            for name in lowering.paged:
                arguments[name] = paged_base(arguments[name])
            dropped += [arguments[name] for name in lowering.ignores if isinstance(arguments[name], torch.fx.Node)]
            choice = choose(lowering, ctx.device.type, dict(ctx.providers), recorded_values(arguments),
                            describe_node(node))
            lower_call(graph, node, choice.lowering(lowering), arguments, order)
            result.count(lowering.family, matched=1, changed=1)
            _note_kernel(result, lowering.qualname, choice.label)
            removed = erase_dead_producers(graph, dropped)
            if removed:
                result.count(lowering.family, changed=removed)
            dropped = [n for n in dropped if n.users]
    return result


def _note_kernel(result: PassResult, qualname: str, label: str) -> None:
    """Record the implementation `qualname`'s calls got; calls that got different ones are all listed."""
    seen = result.kernels.get(qualname)
    result.kernels[qualname] = label if seen in (None, label) else " / ".join(sorted({*seen.split(" / "), label}))


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.flatten,
                      torch.ops.aten.view.default, torch.ops.aten.reshape.default}


def paged_base(argument: object) -> object:
    """The tensor a paged cache argument reshapes, through any chain of reshapes that keep the block dim and the
    bytes of each block in order (trailing dims contiguous among themselves); else the argument."""
    while isinstance(argument, torch.fx.Node) and (
        (argument.op == "call_method" and argument.target in _RESHAPE_METHODS)
        or (argument.op == "call_function" and argument.target in _RESHAPE_FUNCTIONS)
    ) and isinstance(argument.args[0], torch.fx.Node):
        base, view = example_value(argument.args[0]), example_value(argument)
        if not (isinstance(base, torch.Tensor) and isinstance(view, torch.Tensor) and base.dim() >= 1
                and view.dim() >= 1 and base.dtype == view.dtype
                and statically_known_true(sym_eq(base.shape[0], view.shape[0]))
                and statically_known_true(sym_eq(base.numel(), view.numel()))
                and base[0].is_contiguous()):
            break
        argument = argument.args[0]
    return argument


def bind_arguments(node: torch.fx.Node, lowering: NativeLowering) -> dict[str, object]:
    """The call's arguments by schema name, defaults filled in; refuses calls that do not fit the schema and a
    schema the native function does not take (an op redefined elsewhere with other arguments)."""
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                    normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise UnsupportedNodeError(node, f"{lowering.qualname}: the call's arguments do not fit the op's schema "
                                   f"({_schema_text(node.target)}): {_why_unbound(node)}")
    arguments = dict(normalized.kwargs)
    check_schema_fits(node, lowering, list(arguments))
    return arguments


def check_schema_fits(node: torch.fx.Node, lowering: NativeLowering, schema_names: list[str]) -> None:
    """The op's schema arguments (minus out and ignored ones) must all be parameters of the native function."""
    missing = set(lowering.native_arguments(dict.fromkeys(schema_names))) - lowering.native_params
    if missing or (lowering.out is not None and lowering.out not in schema_names):
        raise UnsupportedNodeError(
            node, f"{lowering.qualname} has schema ({_schema_text(node.target)}); its native lowering "
            f"{lowering.native.__name__}{tuple(sorted(lowering.native_params))} cannot take "
            f"{sorted(missing) or [lowering.out]}")


def _why_unbound(node: torch.fx.Node) -> str:
    from torch.fx.operator_schemas import _torchscript_schema_to_signature

    overload = node.target.default if isinstance(node.target, torch._ops.OpOverloadPacket) else node.target
    try:
        _torchscript_schema_to_signature(overload._schema).bind(*node.args, **node.kwargs)
    except (TypeError, AttributeError, RuntimeError) as exc:
        return str(exc)
    return "no overload takes these arguments"


def _schema_text(target: object) -> str:
    overload = target.default if isinstance(target, torch._ops.OpOverloadPacket) else target
    schema = getattr(overload, "_schema", None)
    return str(schema) if schema is not None else "no schema"


def lower_call(
    graph: torch.fx.Graph, node: torch.fx.Node, lowering: NativeLowering, arguments: dict[str, object],
    order: Mapping[torch.fx.Node, int],
) -> None:
    """Replace one call by its native lowering."""
    where = describe_node(node)
    values = recorded_values(arguments)
    if values is not None:
        lowering.run_check(values, where)
    if lowering.out is None:  # functional, or writes its `mutates` arguments itself
        if values is not None or lowering.check is None:
            new = _insert(graph, node, lowering.native, lowering.native_arguments(arguments))
        else:
            new = _insert(graph, node, lowering.checked, {**arguments, "_where": where})
        if "example_value" in node.meta:
            new.meta["example_value"] = node.meta["example_value"]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return
    if node.users:
        raise UnsupportedNodeError(node, f"{lowering.qualname} returns nothing, yet its result is used")
    out = arguments[lowering.out]
    # A fresh buffer is replaced by the native value only when the kernel's contract check has vouched for
    # its shape and dtype; otherwise the buffer stays and `into` writes it, refusing any mismatch.
    if values is not None and lowering.check is not None and _is_fresh_buffer(out, node, order):
        new = _insert(graph, node, lowering.native, lowering.native_arguments(arguments))
        new.meta["example_value"] = values[lowering.out]
        for user in list(out.users):
            if user is not node:
                user.replace_input_with(out, new)
        graph.erase_node(node)
        if not out.users:
            graph.erase_node(out)
        return
    _insert(graph, node, lowering.into, {**arguments, "_where": where})
    graph.erase_node(node)


def _insert(graph: torch.fx.Graph, node: torch.fx.Node, target: object, kwargs: dict) -> torch.fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, kwargs=kwargs)
    copy_provenance(node, new)
    return new


def recorded_values(arguments: dict[str, object]) -> dict[str, object] | None:
    """The arguments with graph nodes replaced by their recorded values; None if any node has none."""
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(list(arguments.values()), nodes.append)
    if any(example_value(n) is None for n in nodes):
        return None
    return torch.fx.node.map_arg(arguments, example_value)


def _is_fresh_buffer(out: object, call: torch.fx.Node, order: Mapping[torch.fx.Node, int]) -> bool:
    """An uninitialised allocation that nothing reads or aliases before `call` fills it (nodes added by this
    pass count as earlier: when in doubt, the buffer is kept and written)."""
    if not isinstance(out, torch.fx.Node):
        return False
    allocates = (out.op == "call_function" and out.target in _EMPTY_FUNCTIONS) or (
        out.op == "call_method" and out.target in _EMPTY_METHODS
    )
    if not allocates:
        return False
    return all(user is call or order.get(user, -1) > order[call] for user in out.users)

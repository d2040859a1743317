"""The ATen-level (post-grad) rewrite: what `lower_ops` and `pdl` do at the Dynamo level, done on the functional
ATen graph Inductor's post-grad passes see (vLLM's own compilation, mode 3).

  - `auto_functionalized_v2(op.default, ..., _all_bases=[buf])` (and v1) of an out-style registered op: its
    `getitem(.., k)` users become the new base values;
  - plain `op.default(...)` calls of registered functional ops (tuple outputs through getitem);
  - user Triton launches (`triton_kernel_wrapper_functional`): PDL off on Triton targets, the kernel's
    registered plain-torch fallback on CPU.
Each call is bound and checked by the same code as the Dynamo-level pass (`bind_arguments`) and computed by the
same per-op functions (`NativeLowering.checked` / `.into`: contract check, native math, exact write of the
out buffer), traced by make_fx (functionalized, with Inductor's decompositions) on the node's fake values and
inlined in place of the node, so the graph holds only ATen ops Inductor lowers.
"""

from __future__ import annotations

import operator
import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from dsv4_compile.errors import UnsupportedNodeError, describe_node
from dsv4_compile.lowering.devices import TRITON_DEVICE_TYPES
from dsv4_compile.lowering.passes.base import PassContext, PassResult, copy_provenance, example_value
from dsv4_compile.lowering.passes.lower_ops import bind_arguments, check_schema_fits
from dsv4_compile.lowering.passes.pdl import disable_pdl, is_triton_launch
from dsv4_compile.lowering.registry import LOWERINGS, TRITON_FALLBACKS, NativeLowering, kernel_name, op_qualname

_AUTO_FUNCTIONALIZED = {
    torch.ops.higher_order.auto_functionalized: 1,
    torch.ops.higher_order.auto_functionalized_v2: 2,
}


def selected_ops(only: Sequence[str] | None) -> set[str]:
    """The registered ops to lower: all of them, or those of `only` that are registered."""
    return set(LOWERINGS) if only is None else set(only) & set(LOWERINGS)


# --- registered ops --------------------------------------------------------------------------------------


def lower_registered_ops(graph: torch.fx.Graph, only: Sequence[str] | None = None) -> PassResult:
    """Inline the native lowering of every registered op call (functional or auto-functionalized) in `graph`."""
    wanted = selected_ops(only)
    result = PassResult()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        version = _AUTO_FUNCTIONALIZED.get(node.target)
        qualname = op_qualname(node.args[0] if version and node.args else node.target)
        if qualname not in wanted:
            continue
        lowering = LOWERINGS[qualname]
        if version:
            fn, leaves = _auto_functionalized_replacement(node, lowering, version)
        else:
            fn, leaves = _functional_replacement(node, lowering)
        _replace(graph, node, _trace_and_inline(graph, node, fn, leaves))
        result.count(lowering.family, matched=1, changed=1)
    return result


def _functional_replacement(node: torch.fx.Node, lowering: NativeLowering) -> tuple[Callable[..., Any], list]:
    if lowering.out is not None:
        raise UnsupportedNodeError(node, f"{lowering.qualname} is out-style, yet it reached post-grad "
                                   "as a plain call instead of auto_functionalized")
    leaves, spec = pytree.tree_flatten(bind_arguments(node, lowering))
    where = describe_node(node)
    return (lambda *values: lowering.checked(where, **pytree.tree_unflatten(list(values), spec))), leaves


def _auto_functionalized_replacement(
    node: torch.fx.Node, lowering: NativeLowering, version: int
) -> tuple[Callable[..., Any], list]:
    """What auto_functionalized(_v2) computes, with the native function in place of the CUDA op."""
    from torch._higher_order_ops.auto_functionalize import (
        get_mutable_args_from_schema,
        read_view_information_from_args,
    )
    from torch._prims_common import clone_preserve_strides

    schema = node.args[0]._schema
    names, types_ = get_mutable_args_from_schema(schema)
    if lowering.out is None or names != [lowering.out] or schema.returns:
        raise UnsupportedNodeError(node, f"{lowering.qualname}: only out-style ops that mutate just their "
                                   f"out argument ({lowering.out}) and return nothing are supported; "
                                   f"it mutates {names} and returns {len(schema.returns)} value(s)")
    check_schema_fits(node, lowering, [arg.name for arg in schema.arguments])
    leaves, spec = pytree.tree_flatten(dict(node.kwargs))
    where = describe_node(node)

    def dense(*values: Any) -> tuple[Any, ...]:
        kwargs = pytree.tree_unflatten(list(values), spec)
        if version == 2:
            bases = [clone_preserve_strides(b) for b in kwargs.pop("_all_bases")]
            view = read_view_information_from_args(names, types_, kwargs, bases)[lowering.out]
            out, mutated = view.regenerate_view(bases), bases
        else:
            out = clone_preserve_strides(kwargs.pop(lowering.out))
            mutated = [out]
        lowering.into(where, **kwargs, **{lowering.out: out})
        return (None, *mutated)  # slot 0 is the op's own (empty) result

    return dense, leaves


# --- user Triton launches --------------------------------------------------------------------------------


def rewrite_triton_launches(graph: torch.fx.Graph) -> PassResult:
    """PDL off in user Triton launches on Triton targets; on CPU, their plain-torch fallbacks inlined."""
    launches = [node for node in graph.nodes if is_triton_launch(node)]
    if not launches:
        return PassResult()
    device = _launch_device(launches)
    module = graph.owning_module or types.SimpleNamespace(graph=graph)  # disable_pdl reads only `.graph`
    if device.type in TRITON_DEVICE_TYPES:
        return disable_pdl(module, PassContext(device=device))
    result = PassResult()
    for node in launches:
        if node.target.__name__ == "triton_kernel_wrapper_functional":
            fn, leaves = _functional_launch_replacement(node)
            _replace(graph, node, _trace_and_inline(graph, node, fn, leaves))
            result.count(matched=1, changed=1)
    result += disable_pdl(module, PassContext(device=device))  # what is left: mutation launches
    return result


def _launch_device(launches: list[torch.fx.Node]) -> torch.device:
    for node in launches:
        for value in node.kwargs["kwargs"].values():
            fake = example_value(value)
            if isinstance(fake, torch.Tensor):
                return fake.device
    return torch.device("cpu")


def _functional_launch_replacement(node: torch.fx.Node) -> tuple[Callable[..., Any], list]:
    """What triton_kernel_wrapper_functional computes, with the kernel's plain-torch fallback."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._prims_common import clone_preserve_strides

    name = kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
    fallback = TRITON_FALLBACKS.get(name)
    if fallback is None:
        raise UnsupportedNodeError(node, f"user Triton kernel '{name}' has no plain-torch fallback for a target "
                                   "without Triton; register one with dsv4_compile.lowering.registry.triton_fallback")
    constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
    constants = {k: v for k, v in constants.items() if k not in ("launch_pdl", "USE_GDC")}
    to_clone = list(node.kwargs["tensors_to_clone"])
    leaves, spec = pytree.tree_flatten(dict(node.kwargs["kwargs"]))

    def dense(*values: Any) -> dict[str, Any]:
        tensors = pytree.tree_unflatten(list(values), spec)
        tensors = {k: clone_preserve_strides(v) if k in to_clone else v for k, v in tensors.items()}
        fallback(**constants, **tensors)
        return {k: tensors[k] for k in to_clone}

    return dense, leaves


# --- tracing and inlining --------------------------------------------------------------------------------


def _trace_and_inline(graph: torch.fx.Graph, node: torch.fx.Node, fn: Callable[..., Any], leaves: list) -> Any:
    """Trace `fn(*leaves)` to functional ATen (graph-node leaves are inputs, constants are baked in), insert
    it before `node`, and return fn's output structure with graph nodes in place of tensors."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [leaf for leaf in leaves if isinstance(leaf, torch.fx.Node)]
    examples = []
    for leaf in inputs:
        if "val" not in leaf.meta:
            raise UnsupportedNodeError(node, f"input {leaf.name} has no fake value (meta['val']) to trace with")
        examples.append(leaf.meta["val"])

    def closed(*values: Any) -> Any:
        given = iter(values)
        return fn(*[next(given) if isinstance(leaf, torch.fx.Node) else leaf for leaf in leaves])

    fake_mode = detect_fake_mode(examples)
    with fake_mode if fake_mode is not None else nullcontext():
        traced = make_fx(torch.func.functionalize(closed, remove="mutations"),
                         decomposition_table=select_decomp_table(), tracing_mode="real")(*examples)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    given = iter(inputs)
    with graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(given)
            elif sub.op == "output":
                return torch.fx.map_arg(sub.args[0], env.__getitem__)
            elif sub.op == "get_attr":
                raise UnsupportedNodeError(node, "the native lowering creates tensor constants; build them "
                                           "with factory functions of the inputs' device instead")
            else:
                env[sub] = graph.node_copy(sub, env.__getitem__)
                copy_provenance(node, env[sub])
    raise AssertionError("traced graph has no output")


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, outputs: Any) -> None:
    """Point the users of `node` at `outputs`: getitem users at their item, direct users at the value."""
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
            value = outputs[user.args[1]]
            if not isinstance(value, torch.fx.Node):
                raise UnsupportedNodeError(user, f"item {user.args[1]!r} of the replaced call is not a tensor")
            user.replace_all_uses_with(value)
            graph.erase_node(user)
        elif isinstance(outputs, torch.fx.Node):
            user.replace_input_with(node, outputs)
        else:
            raise UnsupportedNodeError(user, "uses a multi-output call other than through getitem")
    graph.erase_node(node)

"""Graph inputs that view one storage in different dtypes, merged into a single byte input before Inductor.

What: when two or more tensor inputs of a graph share one storage and do not all have the same dtype, the graph
gets ONE new input instead, a flat uint8 tensor over that whole storage, and rebuilds each original input inside
the graph as `base.as_strided(...)` in bytes, then `.view(dtype)`. The callable handed back to Dynamo takes
the original inputs, checks they still alias the way they did at compile time, and passes the byte tensor.

Why: AOTAutograd cannot functionalize mutations of inputs that overlap in memory with different dtypes
("does not yet handle input mutations on views with different dtypes"). vLLM lays every KV-cache group over one
backing buffer (fp32 compressor states and uint8 FP8 caches over the same bytes) and its layers write them, so
a decoder layer's graph has exactly such inputs. After the merge every mutation is a mutation of a view of one
input of one dtype, which functionalization handles.

When: only when such a group exists among the example inputs, with static shapes, and none of its members
needs gradients; otherwise the graph is left untouched. The layout is read from the example inputs at compile
time; a call whose inputs alias differently (other storage, size, strides or offset) raises AliasMismatchError.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from dsv4_compile.errors import Dsv4CompileError


@dataclasses.dataclass(frozen=True)
class AliasedInput:
    """One graph input inside a shared storage: where it is, and its layout in elements of its dtype."""

    index: int
    name: str
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


@dataclasses.dataclass(frozen=True)
class SharedStorage:
    """Inputs viewing one storage of `nbytes` bytes in more than one dtype."""

    members: tuple[AliasedInput, ...]
    nbytes: int


def find_mixed_dtype_aliases(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[SharedStorage]:
    """The groups of tensor inputs that share a storage with more than one dtype among them."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = [node.name for node in placeholders]
    by_storage: dict[StorageWeakRef, list[int]] = {}
    for index, value in enumerate(example_inputs):
        # An input with symbolic sizes (a dynamic-shape graph) cannot be rebuilt from its example's fixed layout.
        traced = placeholders[index].meta.get("example_value")
        if isinstance(traced, torch.Tensor) and not all(isinstance(n, int) for n in (*traced.shape, *traced.stride())):
            continue
        if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
            by_storage.setdefault(StorageWeakRef(value.untyped_storage()), []).append(index)
    groups = []
    for indices in by_storage.values():
        tensors = [example_inputs[i] for i in indices]
        if len({t.dtype for t in tensors}) < 2 or any(t.requires_grad for t in tensors):
            continue
        members = tuple(AliasedInput(i, names[i], t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
                        for i, t in zip(indices, tensors, strict=True))
        groups.append(SharedStorage(members, tensors[0].untyped_storage().nbytes()))
    return groups


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under `tensor` as a flat uint8 tensor (shares memory with it)."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _typed_view(graph: torch.fx.Graph, base: torch.fx.Node, member: AliasedInput) -> torch.fx.Node:
    # as_strided must come first on the input: functionalization cannot replay a mutation through an as_strided
    # taken of another view. So the member is first described in bytes and only then reinterpreted in its dtype.
    # With a contiguous last dim that dim is simply widened to its bytes (view(dtype) narrows it back); otherwise
    # a trailing dim holds one element's bytes, folded to 1 by view(dtype) and squeezed (torch 2.11's Inductor
    # cannot lower the inverse of that form, so it is used only where it must be).
    aten = torch.ops.aten
    if member.dtype == torch.uint8:
        return graph.call_function(aten.as_strided.default, (base, list(member.size), list(member.stride),
                                                             member.storage_offset))
    itemsize = member.dtype.itemsize
    offset = member.storage_offset * itemsize
    if member.size and member.stride[-1] == 1:
        in_bytes = graph.call_function(aten.as_strided.default, (
            base, [*member.size[:-1], member.size[-1] * itemsize], [s * itemsize for s in member.stride[:-1]] + [1],
            offset))
        return graph.call_function(aten.view.dtype, (in_bytes, member.dtype))
    in_bytes = graph.call_function(aten.as_strided.default, (
        base, [*member.size, itemsize], [s * itemsize for s in member.stride] + [1], offset))
    typed = graph.call_function(aten.view.dtype, (in_bytes, member.dtype))
    return graph.call_function(aten.squeeze.dim, (typed, -1))


def rewrite_graph(gm: torch.fx.GraphModule, groups: Sequence[SharedStorage]) -> torch.fx.GraphModule:
    """A copy of `gm` whose groups' inputs are one byte-tensor input each (after the other inputs) and views of it.

    A copy, because Dynamo keeps reading the placeholders of the graph it handed to the backend."""
    graph = copy.deepcopy(gm.graph)  # node meta is copied shallowly
    placeholders = list(graph.find_nodes(op="placeholder"))
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), placeholders, strict=True):
        new._dynamo_source = getattr(old, "_dynamo_source", None)  # type: ignore[attr-defined]
    first_body_node = next(node for node in graph.nodes if node.op != "placeholder")
    for number, group in enumerate(groups):
        with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
            base = graph.placeholder(f"aliased_storage_{number}")
        base._dynamo_source = None  # type: ignore[attr-defined]  # AOTAutograd reads it on every placeholder
        for member in group.members:
            with graph.inserting_before(first_body_node):
                view = _typed_view(graph, base, member)
            placeholders[member.index].replace_all_uses_with(view)
    for group in groups:
        for member in group.members:
            graph.erase_node(placeholders[member.index])
    graph.lint()
    rewritten = torch.fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        rewritten._param_name_to_source = gm._param_name_to_source
    return rewritten


class AliasMismatchError(Dsv4CompileError):
    """The inputs of a call do not alias the way those the graph was compiled for did."""


def _check_call(args: Sequence[Any], groups: Sequence[SharedStorage]) -> None:
    grouped = {member.index for group in groups for member in group.members}
    shared = {}
    for number, group in enumerate(groups):
        first = args[group.members[0].index]
        for member in group.members:
            arg = args[member.index]
            layout = (arg.dtype, tuple(arg.shape), tuple(arg.stride()), arg.storage_offset())
            if layout != (member.dtype, member.size, member.stride, member.storage_offset):
                raise AliasMismatchError(f"input {member.name}: compiled as a view {member.dtype} {member.size} "
                                         f"stride {member.stride} offset {member.storage_offset} of a shared "
                                         f"storage, called with {layout}")
            if arg.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
                raise AliasMismatchError(f"inputs {group.members[0].name} and {member.name} shared one storage at "
                                         "compile time but not in this call")
        if first.untyped_storage().nbytes() != group.nbytes:
            raise AliasMismatchError(f"the storage under {first.shape} input {group.members[0].name} has "
                                     f"{first.untyped_storage().nbytes()} bytes, compiled for {group.nbytes}")
        shared[first.untyped_storage().data_ptr()] = number
    for index, arg in enumerate(args):
        if index not in grouped and isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() in shared:
            raise AliasMismatchError(f"input {index} shares a storage with aliased inputs it did not share at "
                                     "compile time")


def merge_mixed_dtype_aliases(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    compile_graph: Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]],
    groups: Sequence[SharedStorage] | None = None,
) -> Callable[..., Any] | None:
    """Compile `gm` with `compile_graph` after merging its mixed-dtype aliased inputs (`groups`, found here
    when not given); None when it has none. The returned callable takes the original inputs."""
    groups = find_mixed_dtype_aliases(gm, example_inputs) if groups is None else groups
    if not groups:
        return None
    grouped = {member.index for group in groups for member in group.members}
    kept = [index for index in range(len(example_inputs)) if index not in grouped]

    def inner_args(args: Sequence[Any]) -> list[Any]:
        return [args[i] for i in kept] + [storage_bytes(args[group.members[0].index]) for group in groups]

    example = inner_args(example_inputs)
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        # Under Dynamo, a real tensor it never saw would get fresh size symbols that no guard source backs.
        bases = example[len(kept):]
        example[len(kept):] = [context.fake_mode.from_tensor(base, static_shapes=True) for base in bases]
    compiled = compile_graph(rewrite_graph(gm, groups), example)

    def call_with_merged_inputs(*args: Any) -> Any:
        _check_call(args, groups)
        return compiled(*inner_args(args))  # called like Dynamo calls a backend's result

    return call_with_merged_inputs

"""vLLM integration: the backend spellings of modes 1/2, and an Inductor post-grad pass for mode 3.

Modes 1/2, `CompilationConfig(mode=1 or 2, backend=...)`: vLLM hands `backend` to torch.compile as is when
the name is in `torch._dynamo.list_backends(exclude_tags=())` (our `torch_dynamo_backends` entry point puts
"dsv4_xpu" there); any other string is imported as "module.attr" ("dsv4_compile.backend.dsv4_xpu"). Neither
needs anything from this module; the names are here as constants.

Mode 3, vLLM's own piecewise backend: Inductor runs `post_grad_custom_post_pass(graph)` on the functional
ATen graph, after the Dynamo-level pipeline would have run. `Dsv4PostGradPass` rewrites what reaches it:
  - `auto_functionalized_v2(op.default, ..., _all_bases=[buf])` (and v1) of an out-style op registered in
    dsv4_compile.registry.LOWERINGS; its `getitem(.., k)` users are the new base values;
  - plain `op.default(...)` calls of registered functional ops (tuple outputs through getitem);
  - user Triton launches (`triton_kernel_wrapper_functional`): PDL off on Triton targets (the pdl pass),
    the kernel's registered plain-torch fallback on CPU.
Every replacement is the native function traced by make_fx (functionalized, with Inductor's decompositions) on
the node's fake values and inlined in place of the node, so it holds only ATen ops Inductor lowers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import marshal
import operator
import sys
import time
import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils import _pytree as pytree

import dsv4_compile as _package
from dsv4_compile.errors import UnsupportedNodeError
from dsv4_compile.passes._op_lowering import _bind
from dsv4_compile.passes.base import PassContext, PassResult, copy_provenance, example_value
from dsv4_compile.passes.pdl import TRITON_TARGETS, disable_pdl, is_triton_launch
from dsv4_compile.registry import LOWERINGS, TRITON_FALLBACKS, NativeLowering, kernel_name, op_qualname

log = logging.getLogger("dsv4_compile")

BACKEND_NAME = "dsv4_xpu"
BACKEND_QUALNAME = "dsv4_compile.backend.dsv4_xpu"
POST_GRAD_PASS_QUALNAME = "dsv4_compile.integrations.vllm.dsv4_post_grad_pass"

# Modules whose code decides what the pass emits; their source is part of uuid().
_CODE_MODULES = (
    __name__, "dsv4_compile.passes.pdl", "dsv4_compile.passes.base", "dsv4_compile.passes._op_lowering",
    "dsv4_compile.registry",
)
_AUTO_FUNCTIONALIZED = {
    torch.ops.higher_order.auto_functionalized: 1,
    torch.ops.higher_order.auto_functionalized_v2: 2,
}


@dataclasses.dataclass(frozen=True)
class PostGradOptions:
    """What the post-grad pass rewrites.

    ops:  "namespace::name" of the registered ops to lower; None = every op in LOWERINGS when the pass runs.
    pdl:  rewrite user Triton launches (PDL off on Triton targets, plain-torch fallback on CPU).
    """

    ops: tuple[str, ...] | None = None
    pdl: bool = True


class Dsv4PostGradPass(CustomGraphPass):
    """Inductor `post_grad_custom_post_pass`: registered CUDA-only ops and PDL launches -> native ATen.

    `uuid()` hashes the source of the code that decides the rewrite (this module, the pdl pass, the registry,
    the modules of the selected native lowerings and Triton fallbacks) and the options, so Inductor's FX graph
    cache misses when either changes. `last_result` holds the counts of the latest call.
    """

    def __init__(self, options: PostGradOptions | None = None, **overrides: Any) -> None:
        self.options = dataclasses.replace(options or PostGradOptions(), **overrides)
        self.last_result: dict[str, PassResult] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        lowered = lower_registered_ops(graph, self.options.ops)
        launches = rewrite_triton_launches(graph) if self.options.pdl else PassResult()
        graph.lint()
        self.last_result = {"registered_ops": lowered, "triton_launches": launches}
        log.info("dsv4 post-grad pass: registered ops %d matched / %d changed, Triton launches %d / %d (%.2f ms)",
                 lowered.matched, lowered.changed, launches.matched, launches.changed,
                 1e3 * (time.perf_counter() - start))

    def uuid(self) -> str:
        return post_grad_uuid(self.options)

    def is_applicable_for_range(self, compile_range: object) -> bool:
        """vLLM's pass manager asks every pass this; the rewrite does not depend on shapes."""
        return True

    def __repr__(self) -> str:
        return f"Dsv4PostGradPass({self.options})"


def post_grad_uuid(options: PostGradOptions) -> str:
    """sha256 of the rewrite code's source and the options (the registry is read when called)."""
    digest = hashlib.sha256()
    for name in _CODE_MODULES:
        digest.update(_source_bytes(sys.modules[name]))
    for qualname in sorted(_selected_ops(options.ops)):
        digest.update(qualname.encode())
        digest.update(_source_bytes(LOWERINGS[qualname].native))
    if options.pdl:
        for name in sorted(TRITON_FALLBACKS):
            digest.update(name.encode())
            digest.update(_source_bytes(TRITON_FALLBACKS[name]))
    digest.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    return digest.hexdigest()


def _source_bytes(obj: object) -> bytes:
    """Source of a module, or of the module defining a function (its helpers live there too)."""
    module = obj if isinstance(obj, types.ModuleType) else inspect.getmodule(obj)
    try:
        return inspect.getsource(module).encode()
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        return marshal.dumps(code) if code is not None else repr(obj).encode()


def _selected_ops(only: Sequence[str] | None) -> set[str]:
    return set(LOWERINGS) if only is None else set(only) & set(LOWERINGS)


# --- registered ops --------------------------------------------------------------------------------------


def lower_registered_ops(graph: torch.fx.Graph, only: Sequence[str] | None = None) -> PassResult:
    """Inline the native lowering of every registered op call (functional or auto-functionalized) in `graph`."""
    wanted = _selected_ops(only)
    result = PassResult()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        version = _AUTO_FUNCTIONALIZED.get(node.target)
        qualname = op_qualname(node.args[0] if version and node.args else node.target)
        if qualname not in wanted:
            continue
        result.matched += 1
        lowering = LOWERINGS[qualname]
        if version:
            fn, leaves = _auto_functionalized_replacement(node, lowering, version)
        else:
            fn, leaves = _functional_replacement(node, lowering)
        _replace(graph, node, _trace_and_inline(graph, node, fn, leaves))
        result.changed += 1
    return result


def _functional_replacement(node: torch.fx.Node, lowering: NativeLowering) -> tuple[Callable[..., Any], list]:
    if lowering.out_arg is not None:
        raise UnsupportedNodeError(node, f"{lowering.qualname} is out-style, yet it reached post-grad "
                                   "as a plain call instead of auto_functionalized")
    leaves, spec = pytree.tree_flatten(_bind(node, lowering))
    return (lambda *values: lowering.native(**pytree.tree_unflatten(list(values), spec))), leaves


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
    if lowering.out_arg is None or names != [lowering.out_arg] or schema.returns:
        raise UnsupportedNodeError(node, f"{lowering.qualname}: only out-style ops that mutate just their "
                                   f"out argument ({lowering.out_arg}) and return nothing are supported; "
                                   f"it mutates {names} and returns {len(schema.returns)} value(s)")
    leaves, spec = pytree.tree_flatten(dict(node.kwargs))

    def dense(*values: Any) -> tuple[Any, ...]:
        kwargs = pytree.tree_unflatten(list(values), spec)
        if version == 2:
            bases = [clone_preserve_strides(b) for b in kwargs.pop("_all_bases")]
            view = read_view_information_from_args(names, types_, kwargs, bases)[lowering.out_arg]
            out, mutated = view.regenerate_view(bases), bases
        else:
            out = clone_preserve_strides(kwargs.pop(lowering.out_arg))
            mutated = [out]
        if lowering.check is not None:  # the contract the fused kernel enforces; copy_ would broadcast or cast
            try:
                lowering.check(**{lowering.out_arg: out}, **kwargs)
            except ValueError as exc:
                raise UnsupportedNodeError(node, f"{lowering.qualname}: {exc}") from exc
        out.copy_(lowering.native(**kwargs, out_dtype=out.dtype))
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
    if device.type in TRITON_TARGETS:
        return disable_pdl(module, PassContext(device=device))
    result = PassResult()
    for node in launches:
        if node.target.__name__ == "triton_kernel_wrapper_functional":
            result.matched += 1
            fn, leaves = _functional_launch_replacement(node)
            _replace(graph, node, _trace_and_inline(graph, node, fn, leaves))
            result.changed += 1
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
                                   "without Triton; register one with dsv4_compile.registry.triton_fallback")
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


# --- vLLM -----------------------------------------------------------------------------------------------

# Where vLLM defines InductorPass (>= 0.11 and older releases).
_VLLM_INDUCTOR_PASS_MODULES = ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass")


def register_with_vllm(*, import_vllm: bool = True) -> bool:
    """Make `Dsv4PostGradPass` a virtual subclass of vLLM's `InductorPass`; returns whether it did.

    vLLM wraps any `inductor_passes` value that is not an InductorPass in `CallableInductorPass`, whose uuid
    hashes only the wrapped object's class source: our options and the rewrite modules would then not reach
    the cache key. Registered, vLLM takes the pass as is and keys on `uuid()`. Runs at import when vLLM is
    already loaded (never imports it then: importing vLLM patches torch); call it after importing vLLM otherwise.
    """
    for name in _VLLM_INDUCTOR_PASS_MODULES:
        module = sys.modules.get(name)
        if module is None and import_vllm:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                continue
        base = getattr(module, "InductorPass", None)
        if isinstance(base, type) and hasattr(base, "register"):
            base.register(Dsv4PostGradPass)
            return True
    return False


register_with_vllm(import_vllm=False)

# The instance `POST_GRAD_PASS_QUALNAME` names.
dsv4_post_grad_pass = Dsv4PostGradPass()

# vLLM resolves an `inductor_passes` string "a.b.c.name" as `__import__("a.b.c").__dict__["name"]`: the import
# runs this module, but `__import__` returns the top-level package, where the name is looked up. Publish the
# instance there too (here rather than in dsv4_compile/__init__.py: importing this module imports Inductor).
_package.dsv4_post_grad_pass = dsv4_post_grad_pass

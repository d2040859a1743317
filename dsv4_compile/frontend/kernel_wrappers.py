"""Trace-time substitution of CUDA-only kernel wrappers: Python entry points (tilelang, DeepGEMM, FlashMLA)
that Dynamo cannot trace off CUDA (they import a CUDA-only library, or only raise in a CPU build) are swapped,
inside `cuda_compat`, for calls of registered ops, so that the graph holds a node the lowering pass rewrites.

A wrapper is swapped wherever it is bound under its own name: in its defining module and in every loaded
module that imported it (`from vllm.model_executor.kernels.mhc.tilelang import mhc_pre_tilelang`). The name
must match as well as the object: in vLLM's CPU build every FlashMLA entry point is one and the same function
(it raises "FlashMLA unavailable"), and each needs its own stand-in. Only modules already loaded
are touched, and every binding is restored on exit: outside the block the code is exactly the user's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch


def vllm_substitutes(target: torch.device | None = None) -> Mapping[str, Callable[..., object]]:
    """Every known vLLM kernel wrapper ("module.function") -> what runs in its place while tracing for
    `target` (default cpu). The same read-only table on every call."""
    from dsv4_compile.lowering.devices import TRITON_DEVICE_TYPES

    return _substitutes(target is not None and target.type in TRITON_DEVICE_TYPES)


@functools.cache
def _substitutes(has_triton: bool) -> Mapping[str, Callable[..., object]]:
    # Built once, from dsv4_compile.vllm_constructs: the same stand-in objects on every entry, so that what
    # Dynamo guarded on when it traced is still there on the next call (and the table is not rebuilt on every
    # call of a compiled model). On a Triton target (XPU) vLLM's Triton kernels compile as they are.
    from dsv4_compile.vllm_constructs import CONSTRUCTS, SAME_NAME_OP, Handling, entry_point_substitutes, resolve

    target = "xpu" if has_triton else "cpu"
    table: dict[str, Callable[..., object]] = {}
    for dotted, impl in entry_point_substitutes(target).items():
        table[dotted] = _op_packet("vllm", dotted.rpartition(".")[2]) if impl == SAME_NAME_OP else resolve(impl)
    _not_as_frames(table[c.name] for c in CONSTRUCTS if c.name in table and c.handling(target) is Handling.STAND_IN)
    return types.MappingProxyType(table)


def _not_as_frames(functions: Iterable[object]) -> None:
    """The plain-torch stand-ins (for targets without Triton) run as they are when eager code between graph breaks
    calls them; compiled as frames of their own (with dynamic shapes, their buffers' sizes unrelated symbols) they
    would only cost compiles, and some fail to trace (a broadcast of two sizes Dynamo cannot prove equal). Traced
    code still inlines them: frame strategies do not apply to inlining."""
    skip_code = getattr(importlib.import_module("torch._dynamo.eval_frame"), "skip_code", None)
    for function in functions:
        if isinstance(function, types.ModuleType):  # a stand-in module (`triton`) has no code of its own
            continue
        code = getattr(function, "__code__", None)
        if skip_code is not None and code is not None:
            skip_code(code)


def _op_packet(namespace: str, name: str) -> Callable[..., object]:
    def call_op(*args: object, **kwargs: object) -> object:
        return getattr(getattr(torch.ops, namespace), name)(*args, **kwargs)

    call_op.__name__ = call_op.__qualname__ = f"{name}_as_op"
    return call_op


def bindings_of(original: object, name: str, package: str) -> list[object]:
    """Every loaded module under `package` that binds `original` to the global `name`."""
    return _binding_modules(original, name, _modules_of(package, _loaded_fingerprint()))


def _binding_modules(original: object, name: str, modules: list[object]) -> list[object]:
    """The modules of `modules` whose global `name` is `original`."""
    return [module for module in modules if getattr(module, "__dict__", {}).get(name) is original]


def _loaded_fingerprint() -> tuple[int, object]:
    """Changes when a module is loaded or unloaded: the count, and the most recently inserted module (sys.modules
    keeps insertion order). O(1), as it runs on every cuda_compat entry; a module object swapped into an existing
    sys.modules entry (no import does that) is not seen."""
    last = next(reversed(sys.modules.values()), None)
    return len(sys.modules), last  # the module itself, not its id: an id can be reused


_PACKAGE_MODULES: dict[str, tuple[tuple[int, object], list[object]]] = {}


def _modules_of(package: str, loaded: tuple[int, object]) -> list[object]:
    """The loaded modules of `package`, rescanned only when the set of loaded modules (`loaded`) has changed:
    vLLM loads thousands of modules, and cuda_compat is entered on every call of a compiled model."""
    cached = _PACKAGE_MODULES.get(package)
    if cached is None or cached[0] != loaded:
        prefix = package + "."
        modules = [module for module_name, module in list(sys.modules.items())
                   if module is not None and (module_name == package or module_name.startswith(prefix))]
        cached = _PACKAGE_MODULES[package] = (loaded, modules)
    return cached[1]


@contextlib.contextmanager
def substituted_wrappers(table: Mapping[str, Callable[..., object]]) -> Iterator[list[str]]:
    """Swap each loaded wrapper of `table` for its replacement inside the block; yields the names swapped."""
    swaps, names = _swap_plan(table, _loaded_fingerprint())
    done: list[tuple[object, str, object, object]] = []
    try:
        for swap in swaps:
            holder, function, _, replacement = swap
            setattr(holder, function, replacement)
            done.append(swap)
        yield list(names)
    finally:
        for holder, function, original, _ in reversed(done):
            setattr(holder, function, original)


Swap = tuple[object, str, object, object]  # (module, global name, original, replacement)
# id(table) -> (the table, the loaded-modules fingerprint, its swaps, the wrapper names they cover)
_PLANS: dict[int, tuple[Mapping[str, object], tuple[int, object], tuple[Swap, ...], tuple[str, ...]]] = {}


def _swap_plan(table: Mapping[str, Callable[..., object]],
               loaded: tuple[int, object]) -> tuple[tuple[Swap, ...], tuple[str, ...]]:
    """Every (module, name) binding of a wrapper of `table`, found once per set of loaded modules: cuda_compat is
    entered on every call of a compiled model, and the scan would cost more than the swap. A remembered plan is
    used only while each of its modules still binds the original."""
    cached = _PLANS.get(id(table))
    if (cached is not None and cached[0] is table and cached[1] == loaded
            and all(holder.__dict__.get(function) is original for holder, function, original, _ in cached[2])):
        return cached[2], cached[3]
    swaps: list[Swap] = []
    names: list[str] = []
    for dotted, replacement in table.items():
        module_name, _, function = dotted.rpartition(".")
        module = sys.modules.get(module_name)
        original = getattr(module, function, None) if module is not None else None
        if original is None or original is replacement:
            continue
        package_modules = _modules_of(module_name.split(".", 1)[0], loaded)
        swaps += [(holder, function, original, replacement)
                  for holder in _binding_modules(original, function, package_modules)]
        names.append(dotted)
    _PLANS[id(table)] = (table, loaded, tuple(swaps), tuple(names))
    return tuple(swaps), tuple(names)


@contextlib.contextmanager
def vllm_kernel_wrappers(target: torch.device | None = None) -> Iterator[list[str]]:
    """`substituted_wrappers(vllm_substitutes(target))` when vLLM is loaded, after defining the ops vLLM's
    build lacks; otherwise nothing."""
    if "vllm" not in sys.modules:
        yield []
        return
    from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops

    ensure_vllm_ops()
    with substituted_wrappers(vllm_substitutes(target)) as names:
        yield names

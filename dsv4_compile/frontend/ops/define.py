"""Defining a CUDA-only op from Python when no loaded library provides it: the exact schema and a fake
impl (shapes only), so Dynamo can trace code that calls it on any machine; the backend lowers the call.

The library is a FRAGMENT, never DEF: the C++ extension (vLLM's `_C`, `_moe_C`, `_flashmla_C`) owns the
namespace when it is loaded, and then its definition is the one used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARIES: dict[str, torch.library.Library] = {}


def op_exists(qualname: str) -> bool:
    """Whether `namespace::name` is a registered operator."""
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def fragment(namespace: str) -> torch.library.Library:
    """The one FRAGMENT library this project uses for `namespace`."""
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def define_if_missing(
    qualname: str, schema: str, fake: Callable[..., object], cuda: Callable[..., object] | None = None,
    cpu: Callable[..., object] | None = None,
) -> bool:
    """Define `qualname` with `schema` (without the namespace) and `fake`, plus a CUDA and a CPU kernel if
    given, unless it already exists. Returns whether it was defined here."""
    namespace, name = qualname.split("::")
    if not schema.startswith(name + "("):
        raise ValueError(f"schema of {qualname} must start with '{name}(': {schema}")
    if op_exists(qualname):
        return False
    library = fragment(namespace)
    library.define(schema)
    torch.library.register_fake(qualname, fake, lib=library)
    if cuda is not None:
        library.impl(name, cuda, "CUDA")
    if cpu is not None:
        library.impl(name, cpu, "CPU")
    return True

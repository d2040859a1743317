"""CUDA-only op -> native lowering registry.

Adding support for the next CUDA-only op is one decorated function:

    @native_lowering("_C::my_op", out_arg="out")
    def my_op_native(x: torch.Tensor, scale: float) -> torch.Tensor: ...

The op-rewriting passes replace calls of a registered op by a call of its native function, and the
residual-CUDA audit treats every registered op that is still in the graph as CUDA-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

# Namespaces whose ops are CUDA/vLLM kernels; an op there without a kernel for the target is CUDA-only.
CUDA_ONLY_NAMESPACES = frozenset({"_C", "_moe_C", "_flashmla_C", "_vllm_fa3_C", "_C_cache_ops", "dsv4_cuda"})


_NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class NativeLowering:
    """How one CUDA-only op becomes plain torch.

    qualname:  "namespace::op" of the CUDA-only op.
    native:    functional torch implementation; takes the op's arguments minus `out_arg`.
    out_arg:   name of the mutated out-parameter, for out-style ops that return nothing.
    declared:  the op's parameter names in schema order, with defaults for the optional ones; None to
               read them from the op's registered schema.
    check:     optional contract check of the op's arguments (all of them, `out_arg` included, by name),
               called by the passes with the recorded example values; raises ValueError saying what is wrong.
    """

    qualname: str
    native: Callable[..., object]
    out_arg: str | None
    declared: tuple[tuple[str, object], ...] | None
    check: Callable[..., object] | None = None

    @property
    def params(self) -> tuple[tuple[str, object], ...]:
        if self.declared is not None:
            return self.declared
        namespace, name = self.qualname.split("::")
        schema = getattr(getattr(torch.ops, namespace), name).default._schema
        return tuple((a.name, a.default_value if a.has_default_value() else _NO_DEFAULT) for a in schema.arguments)

    @property
    def namespace(self) -> str:
        return self.qualname.split("::", 1)[0]


LOWERINGS: dict[str, NativeLowering] = {}


def native_lowering(
    qualname: str,
    *,
    params: tuple[str | tuple[str, object], ...] | None = None,
    out_arg: str | None = None,
    check: Callable[..., object] | None = None,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Register `fn` as the native lowering of the CUDA-only op `qualname`.

    `params` lists the op's parameters in schema order (a bare name for a required one, a `(name, default)`
    pair for an optional one); leave it out to take them from the op's registered schema. Give it where
    the op may be defined elsewhere with an older schema (vLLM's `_C` library).
    `check(**arguments)` (out argument included) raises ValueError when the kernel would reject the call
    (a result buffer of the wrong shape or dtype, ...); the rewrite then stops with an error naming the node
    instead of producing a silently different result (`copy_` broadcasts and casts, a kernel does not).
    """

    def register(fn: Callable[..., object]) -> Callable[..., object]:
        normalised = None if params is None else tuple(p if isinstance(p, tuple) else (p, _NO_DEFAULT) for p in params)
        if qualname in LOWERINGS and LOWERINGS[qualname].native is not fn:
            raise ValueError(f"{qualname} already has a native lowering: {LOWERINGS[qualname].native}")
        LOWERINGS[qualname] = NativeLowering(qualname, fn, out_arg, normalised, check)
        return fn

    return register


def op_qualname(target: object) -> str | None:
    """'namespace::name' for an OpOverload or OpOverloadPacket target, else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def has_kernel_for(qualname: str, device_type: str) -> bool:
    """Whether the op can run on `device_type` (a backend kernel or a composite implementation)."""
    keys = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU"}
    candidates = [keys.get(device_type, device_type.upper()), "CompositeImplicitAutograd", "CompositeExplicitAutograd"]
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key) for key in candidates)


# User Triton kernel name -> plain-torch function with the kernel's arguments (tensors mutated in place),
# for targets without Triton (CPU).
TRITON_FALLBACKS: dict[str, Callable[..., None]] = {}


def triton_fallback(kernel_name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(**kernel_args)` as what the user Triton kernel `kernel_name` does, in plain torch."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        TRITON_FALLBACKS[kernel_name] = fn
        return fn

    return register


def kernel_name(kernel: object) -> str:
    """The Python name of a Triton kernel (JITFunction, Autotuner, or plain function)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", str(kernel))

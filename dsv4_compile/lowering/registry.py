"""The registry every op rewrite reads: CUDA-only op -> native lowering.

Adding the next CUDA-only op is one decorated function in its family's file (lowering/lowerings/):

    @native_lowering("_C::my_op", out="result", check=check_my_op)
    def my_op(input: torch.Tensor, scale: float) -> torch.Tensor: ...

The function takes the op's schema arguments by name (minus the out argument and the `ignores`); the
`lower_ops` pass (Dynamo level) and the vLLM post-grad pass both rewrite calls of the op through it, and the
residual-CUDA audit treats a registered op left in the graph as CUDA-only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import torch
import torch.fx

from dsv4_compile.errors import LoweringContractError


@dataclasses.dataclass(frozen=True)
class NativeLowering:
    """How one CUDA-only op becomes plain torch.

    qualname: "namespace::op" of the CUDA-only op.
    native:   the op's math in plain torch, functional: keyword arguments named as in the op's schema.
    family:   the report row this lowering counts under ("activation", "mhc", "attention", ...).
    out:      name of the mutated out argument, for out-style ops that return nothing; the native function
              then returns the value to write, which must match the buffer's shape and dtype exactly.
    check:    the kernel's contract on its arguments (out argument included), raising ValueError with what is
              wrong; run on the recorded values at rewrite time, or in the emitted code when there are none.
    ignores:  schema arguments the native math does not need (a CUDA work schedule, a split count): dropped,
              and their producers removed once nothing else reads them.
    mutates:  schema arguments the op writes in place (a KV cache, several out tensors, an optional out):
              the native function receives them, writes them itself with in-place torch ops (a scatter
              into a cache, `copy_` into an out) and returns what the op returns.
    paged:    mutated caches the native math reads as `[blocks, ...]` with the dims after the first flattened
              (a paged cache): a call on a reshape of a tensor that merges or splits only those dims gets the
              tensor itself. Inductor can write a graph input in place, not a view of a non-contiguous one
              (vLLM's `cache.view(cache.shape[0], -1)` of a padded cache), which it copies whole instead.
    """

    qualname: str
    native: Callable[..., object]
    family: str
    out: str | None = None
    check: Callable[..., object] | None = None
    ignores: tuple[str, ...] = ()
    mutates: tuple[str, ...] = ()
    paged: tuple[str, ...] = ()

    @property
    def namespace(self) -> str:
        return self.qualname.split("::", 1)[0]

    @functools.cached_property
    def native_params(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.native).parameters)

    def run_check(self, arguments: dict[str, object], where: str) -> None:
        """The contract check on concrete or fake values; LoweringContractError says which call broke it."""
        if self.check is None:
            return
        try:
            self.check(**arguments)
        except ValueError as exc:
            raise LoweringContractError(f"{self.qualname}: the call breaks the kernel's contract: {exc}\n  {where}") \
                from exc

    @functools.cached_property
    def checked(self) -> Callable[..., object]:
        """`native` preceded by the contract check: what a functional call becomes when its values are not
        known at rewrite time. Takes the op's arguments by name plus `_where` (the node, for the error)."""

        def checked(_where: str = "", **arguments: object) -> object:
            self.run_check(arguments, _where)
            return self.native(**self.native_arguments(arguments))

        function = _named(checked, self, "checked")
        if self.mutates:
            torch.fx.node.has_side_effect(function)
        return function

    @functools.cached_property
    def into(self) -> Callable[..., None]:
        """What an out-style call becomes when its buffer is kept: check, compute, then write the buffer,
        refusing (never broadcasting or casting) a value of another shape or dtype."""

        def into(_where: str = "", **arguments: object) -> None:
            self.run_check(arguments, _where)
            write_exactly(arguments[self.out], self.native(**self.native_arguments(arguments)), self.qualname,
                          _where)

        function = _named(into, self, "into")
        torch.fx.node.has_side_effect(function)
        return function

    def native_arguments(self, arguments: dict[str, object]) -> dict[str, object]:
        """The op's arguments minus the out argument and the ignored ones."""
        return {k: v for k, v in arguments.items() if k != self.out and k not in self.ignores}


def write_exactly(out: object, value: object, qualname: str, where: str) -> None:
    """`out.copy_(value)` only when shapes and dtypes agree: a fused kernel writes exactly its buffer."""
    if not isinstance(out, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise LoweringContractError(f"{qualname}: out argument and native result must be tensors\n  {where}")
    if out.shape != value.shape or out.dtype != value.dtype:
        raise LoweringContractError(
            f"{qualname}: the out buffer is {tuple(out.shape)} {out.dtype} but the op computes "
            f"{tuple(value.shape)} {value.dtype}; the kernel would not broadcast or cast\n  {where}"
        )
    out.copy_(value)


def _named(function: Callable[..., object], lowering: NativeLowering, suffix: str) -> Callable[..., object]:
    name = f"{lowering.native.__name__}_{suffix}"
    function.__name__ = function.__qualname__ = name
    function.__module__ = lowering.native.__module__
    return function


LOWERINGS: dict[str, NativeLowering] = {}


def native_lowering(
    qualname: str,
    *,
    family: str | None = None,
    out: str | None = None,
    check: Callable[..., object] | None = None,
    ignores: tuple[str, ...] = (),
    mutates: tuple[str, ...] = (),
    paged: tuple[str, ...] = (),
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Register the decorated function as the native lowering of the CUDA-only op `qualname`.

    `family` defaults to the name of the module the function is defined in ("mhc" for lowerings/mhc.py).
    See NativeLowering for `out`, `check`, `ignores`, `mutates` and `paged`. The op need not exist yet: its schema
    is read when a call of it is rewritten, and a call whose schema does not fit the function is refused there.
    """

    def register(fn: Callable[..., object]) -> Callable[..., object]:
        if "::" not in qualname:
            raise ValueError(f"native_lowering needs 'namespace::name', got {qualname!r}")
        if qualname in LOWERINGS and LOWERINGS[qualname].native is not fn:
            raise ValueError(f"{qualname} already has a native lowering: {LOWERINGS[qualname].native}")
        if out is not None and mutates:
            raise ValueError(f"{qualname}: give either out= (one buffer the op fills) or mutates=, not both")
        if not set(paged) <= set(mutates):
            raise ValueError(f"{qualname}: paged= names mutated caches; {sorted(set(paged) - set(mutates))} "
                             "are not in mutates=")
        name = family or fn.__module__.rsplit(".", 1)[-1]
        LOWERINGS[qualname] = NativeLowering(qualname, fn, name, out, check, tuple(ignores), tuple(mutates),
                                              tuple(paged))
        if mutates:
            torch.fx.node.has_side_effect(fn)
        return fn

    return register


def families() -> dict[str, list[str]]:
    """Family -> registered op names, in registration order."""
    grouped: dict[str, list[str]] = {}
    for qualname, lowering in LOWERINGS.items():
        grouped.setdefault(lowering.family, []).append(qualname)
    return grouped


def op_qualname(target: object) -> str | None:
    """'namespace::name' for an OpOverload or OpOverloadPacket target, else None."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


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

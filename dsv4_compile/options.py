"""Backend options: a validated, frozen dataclass."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from dsv4_compile.errors import DeviceError, OptionsError

KNOWN_DEVICE_TYPES = ("cpu", "cuda", "xpu")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Options of the dsv4_xpu backend.

    device:   target device; default: the device of the example inputs.
    strict:   the residual-CUDA audit raises (True) or warns (False).
    disable:  names of passes to skip (the audit cannot be skipped).
    inductor: lower through Inductor (True) or run the rewritten graph eagerly (False).
    dump_dir: folder for index.md and the per-pass stage files (graph before/after, diff); None: no dump.
    """

    device: str | None = None
    strict: bool = True
    disable: tuple[str, ...] = ()
    inductor: bool = True
    dump_dir: str | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            object.__setattr__(self, "device", str(parse_device(self.device)))
        if not isinstance(self.strict, bool) or not isinstance(self.inductor, bool):
            raise OptionsError("options 'strict' and 'inductor' must be bool")
        if self.dump_dir is not None:
            if not isinstance(self.dump_dir, (str, os.PathLike)):
                raise OptionsError(f"option 'dump_dir' must be a path, got {type(self.dump_dir).__name__}")
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))
        if isinstance(self.disable, str):
            object.__setattr__(self, "disable", (self.disable,))
        object.__setattr__(self, "disable", tuple(self.disable))
        from dsv4_compile.pipeline import pass_names  # late: pipeline imports the passes

        unknown = [name for name in self.disable if name not in pass_names()]
        if unknown:
            raise OptionsError(f"cannot disable unknown pass(es) {unknown}; passes are {list(pass_names())}")
        if "audit" in self.disable:
            raise OptionsError("the 'audit' pass cannot be disabled; use strict=False to only warn")

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
        return f"strict={self.strict};disable={','.join(sorted(self.disable))}"


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device of a known type, or DeviceError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r}: {exc}") from exc
    if parsed.type not in KNOWN_DEVICE_TYPES:
        raise DeviceError(f"unsupported target device {device!r}; supported types: {list(KNOWN_DEVICE_TYPES)}")
    return parsed


def device_available(device: torch.device) -> bool:
    """Whether tensors can be created on `device` in this process."""
    if device.type == "cpu":
        return True
    backend = getattr(torch, device.type, None)
    return bool(backend is not None and backend.is_available())


def is_cuda_device(value: object) -> bool:
    """A `cuda` device given as a torch.device or a string ('cuda', 'cuda:0')."""
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))

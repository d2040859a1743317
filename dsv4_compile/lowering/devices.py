"""Target devices: parsing, availability, and recognising `cuda` device constants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsv4_compile.errors import DeviceError

KNOWN_DEVICE_TYPES = ("cpu", "cuda", "xpu")
TRITON_DEVICE_TYPES = ("cuda", "xpu")


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


def input_devices(example_inputs: Sequence[Any]) -> set[torch.device]:
    """Devices of the tensor inputs, ignoring 0-dim CPU scalars (which mix with any device)."""
    return {
        t.device for t in example_inputs
        if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
    }

"""`dsv4_compile.compile`: torch.compile with the dsv4_xpu backend, traced under `cuda_compat`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dsv4_compile.frontend.cuda_compat import cuda_compat
from dsv4_compile.lowering.backend import dsv4_xpu
from dsv4_compile.lowering.devices import input_devices, parse_device
from dsv4_compile.lowering.options import BackendOptions


class CompiledModel:
    """A compiled CUDA-oriented callable; every call runs (and, on first use, traces) under cuda_compat."""

    def __init__(self, model: Callable[..., Any], device: str | None, compiled: Callable[..., Any]) -> None:
        self.model = model
        self.device = device
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = self.device or _device_of(args, kwargs)
        with cuda_compat(device):
            return self.compiled(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, backend='dsv4_xpu', device={self.device!r})"


def compile(  # noqa: A001 - mirrors torch.compile on purpose
    model: Callable[..., Any],
    *,
    device: str | torch.device | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    **options: Any,
) -> CompiledModel:
    """Compile CUDA-oriented `model` for `device` (default: its inputs' device) with the dsv4_xpu backend.

    `options` are the backend's (strict, disable, inductor, dump_dir, exact_rounding; see BackendOptions);
    `fullgraph` and `dynamic` go to torch.compile.
    """
    device_str = None if device is None else str(parse_device(device))  # DeviceError, not RuntimeError
    opts = BackendOptions.from_mapping({**options, "device": device_str})
    compiled = torch.compile(model, backend=dsv4_xpu, options={**options, "device": opts.device},
                             fullgraph=fullgraph, dynamic=dynamic)
    return CompiledModel(model, device_str, compiled)


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    devices = input_devices(tensors) or {torch.device("cpu")}
    return next(iter(devices))

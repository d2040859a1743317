"""vLLM general plugin: the NVIDIA DeepSeek-V4 model, compiled by dsv4_xpu, on a platform without CUDA.

vLLM 0.32/0.33 never torch.compiles the NVIDIA DeepSeek-V4 model (nvidia/model.py has no
`support_torch_compile`), and on a CPU or XPU platform its registry maps `DeepseekV4ForCausalLM` to the
CPU/XPU ports, so `CompilationConfig(backend="dsv4_xpu")` never reaches the NVIDIA code. This plugin, when
enabled, maps that architecture to a subclass of the NVIDIA class that
  - is built under `cuda_compat(<platform device>)` (CUDA streams/events, capability 9.0, kernel wrappers);
  - keeps every linear layer's raw weight on CPU (vLLM's `_cpu_skip_gemm_dispatch` opt-out), because the
    NVIDIA attention reads `.weight` directly;
  - runs `forward` through `torch.compile(backend="dsv4_xpu")` under the same `cuda_compat` block, whatever
    vLLM's compilation mode (it is the only backend that can run the model's CUDA-only ops there).

Opt-in, because vLLM runs every installed general plugin unless VLLM_PLUGINS restricts them: set
DSV4_COMPILE_NVIDIA_PATH=1, or list `dsv4_compile_nvidia_path` in VLLM_PLUGINS. On a CUDA platform it does
nothing. The class is registered lazily ("module:Class"), so loading the plugin imports no model code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

PLUGIN_NAME = "dsv4_compile_nvidia_path"
ENABLE_ENV = "DSV4_COMPILE_NVIDIA_PATH"
ARCHITECTURE = "DeepseekV4ForCausalLM"
CLASS_NAME = "DeepseekV4ForCausalLMNvidiaPath"
BACKEND_NAME = "dsv4_xpu"
_CLASSES: dict[str, type[torch.nn.Module]] = {}


def enabled() -> bool:
    """The env switch is on, or VLLM_PLUGINS names this plugin (an explicit choice, unlike an unset list)."""
    if os.environ.get(ENABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    listed = os.environ.get("VLLM_PLUGINS")
    return listed is not None and PLUGIN_NAME in [name.strip() for name in listed.split(",")]


def register() -> None:
    """The `vllm.general_plugins` entry point: maps DeepseekV4ForCausalLM to the compiled NVIDIA class."""
    if not enabled():
        return
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{CLASS_NAME}")


def compiled_under_cuda_compat(base: type[torch.nn.Module], device_type: str) -> type[torch.nn.Module]:
    """A subclass of `base` built under `cuda_compat(device_type)` whose forward runs through dsv4_xpu."""
    from dsv4_compile.frontend.cuda_compat import cuda_compat

    class CompiledUnderCudaCompat(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with cuda_compat(device_type):
                super().__init__(*args, **kwargs)
            if device_type == "cpu":
                keep_raw_linear_weights(self)
            self._dsv4_forward = torch.compile(super().forward, backend=BACKEND_NAME)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return super().forward(*args, **kwargs)
            with cuda_compat(device_type):
                return self._dsv4_forward(*args, **kwargs)

    CompiledUnderCudaCompat.__name__ = CompiledUnderCudaCompat.__qualname__ = f"{base.__name__}NvidiaPath"
    return CompiledUnderCudaCompat


def keep_raw_linear_weights(model: torch.nn.Module) -> None:
    """Set vLLM's CPU opt-out from weight packing on every linear layer: packing frees `.weight`."""
    from vllm.model_executor.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, LinearBase):
            module._cpu_skip_gemm_dispatch = True


def __getattr__(name: str) -> type[torch.nn.Module]:
    if name != CLASS_NAME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
        from vllm.platforms import current_platform

        _CLASSES[name] = compiled_under_cuda_compat(DeepseekV4ForCausalLM, current_platform.device_type)
    return _CLASSES[name]

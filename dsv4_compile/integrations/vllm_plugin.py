"""vLLM general plugin: the NVIDIA DeepSeek-V4 model, compiled by dsv4_xpu, on a platform without CUDA.

vLLM 0.32/0.33 never torch.compiles the NVIDIA DeepSeek-V4 model (nvidia/model.py has no
`support_torch_compile`), and on a CPU or XPU platform its registry maps `DeepseekV4ForCausalLM` to the
CPU/XPU ports, so `CompilationConfig(backend="dsv4_xpu")` never reaches the NVIDIA code. This plugin, when
enabled, maps that architecture to a subclass of the NVIDIA class (engine.py) that vLLM's engine builds and
runs as it would any model; the subclass supplies what vLLM's CUDA worker would have set up and compiles its
forward with dsv4_xpu.

Opt-in, because vLLM runs every installed general plugin unless VLLM_PLUGINS restricts them:
  - DSV4_COMPILE_NVIDIA_PATH=1, or `dsv4_compile_nvidia_path` in VLLM_PLUGINS: the NVIDIA model, compiled;
  - DSV4_COMPILE_CPU_PORT=1: vLLM's own CPU port, with the two things vLLM 0.32.0's CPU build lacks to run it
    in the engine (the metadata kernels without Triton, the tile-scheduler keys; engine.py names them), the
    reference the NVIDIA path is compared with.
On a CUDA platform, or for any other architecture, it does nothing. Classes are registered lazily
("module:Class"), so loading the plugin imports no model code.
"""

from __future__ import annotations

import os

PLUGIN_NAME = "dsv4_compile_nvidia_path"
ENABLE_ENV = "DSV4_COMPILE_NVIDIA_PATH"
CPU_PORT_ENV = "DSV4_COMPILE_CPU_PORT"
ARCHITECTURE = "DeepseekV4ForCausalLM"
CLASS_NAME = "DeepseekV4ForCausalLMNvidiaPath"
CPU_PORT_CLASS_NAME = "DeepseekV4ForCausalLMCpuPort"
BACKEND_NAME = "dsv4_xpu"
_ENGINE_MODULE = "dsv4_compile.integrations.vllm_engine"


def _switched_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def enabled() -> bool:
    """The env switch is on, or VLLM_PLUGINS names this plugin (an explicit choice, unlike an unset list)."""
    if _switched_on(ENABLE_ENV):
        return True
    listed = os.environ.get("VLLM_PLUGINS")
    return listed is not None and PLUGIN_NAME in [name.strip() for name in listed.split(",")]


def register() -> None:
    """The `vllm.general_plugins` entry point: maps DeepseekV4ForCausalLM to the compiled NVIDIA class (or, with
    DSV4_COMPILE_CPU_PORT, to vLLM's CPU port made runnable in the engine)."""
    cpu_port = _switched_on(CPU_PORT_ENV)
    if not (enabled() or cpu_port):
        return
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{_ENGINE_MODULE}:{CLASS_NAME if enabled() else CPU_PORT_CLASS_NAME}")


def __getattr__(name: str) -> object:
    # The classes live in vllm_engine (importing it imports vLLM's model code); kept reachable here by name.
    if name in (CLASS_NAME, CPU_PORT_CLASS_NAME, "compiled_under_cuda_compat", "keep_raw_linear_weights"):
        import importlib

        return getattr(importlib.import_module(_ENGINE_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

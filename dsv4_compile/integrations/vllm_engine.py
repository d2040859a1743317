"""The model classes the vLLM plugin registers, and what vLLM's engine needs around them off CUDA.

`DeepseekV4ForCausalLMNvidiaPath` is vLLM's NVIDIA `DeepseekV4ForCausalLM`, as vLLM's engine builds and runs
it on a platform without CUDA:
  - its `__init__` has the parent's signature (`vllm_config=`, `prefix=`): vLLM's `initialize_model` reads it
    (model_loader/utils.py:90-96) and calls a class without them with no arguments;
  - it is built under `cuda_compat(<platform device>)`; its linear layers keep their raw weights (the NVIDIA
    attention reads `.weight`);
  - vLLM's GPU worker creates the workspace manager (gpu_worker.py:551), its CPU worker does not: built here;
  - the model runner builds attention metadata outside the model's forward (gpu_model_runner.py
    `_build_attention_metadata`), with the builders of the backends the attention layers name: each layer names
    a subclass of its backend whose builder builds under the same `cuda_compat`;
  - metadata kernels that vLLM launches through Triton get plain-torch stand-ins where vLLM has no Triton
    (frontend/ops/vllm_metadata_kernels.py), through vLLM's own override registry;
  - `forward` runs through `torch.compile(backend="dsv4_xpu")` under `cuda_compat`, whatever vLLM's compilation
    mode, with the KV caches marked static (their sizes never change; symbolic sizes would defeat the backend's
    mixed-dtype alias handling).

`DeepseekV4ForCausalLMCpuPort` is vLLM's own CPU port, unchanged but for two vLLM 0.32.0 CPU-build gaps that
stop it in the engine: the metadata kernels above, and `DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler`
(models/deepseek_v4/cpu/cpu_mla.py:118-126), which returns swaonly/c4a/c128a entries while the shared
`build()` reads c1a and c2a too (v1/attention/backends/mla/sparse_swa.py:780-781): KeyError 'c1a' on every step.
The class's builder answers None for those (no tile scheduler, what the CPU builder means for the others).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from dsv4_compile.frontend.cuda_compat import cuda_compat
from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels
from dsv4_compile.integrations.vllm_model_support import check_supported

BACKEND_NAME = "dsv4_xpu"
# JSON of dsv4_xpu's options for the plugin's compile (vLLM passes no options to a named backend), e.g.
# '{"inductor": false}' to run the rewritten graphs without Inductor when bisecting a numerical difference.
OPTIONS_ENV = "DSV4_COMPILE_OPTIONS"


def backend_options() -> dict[str, Any] | None:
    """dsv4_xpu's options from DSV4_COMPILE_OPTIONS (validated by the backend), or None."""
    import json
    import os

    text = os.environ.get(OPTIONS_ENV, "").strip()
    return json.loads(text) if text else None


def compiled_under_cuda_compat(base: type[torch.nn.Module], device_type: str) -> type[torch.nn.Module]:
    """A subclass of `base` built under `cuda_compat(device_type)` whose forward runs through dsv4_xpu."""

    class CompiledUnderCudaCompat(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._dsv4_prepare(device_type, kwargs)
            with cuda_compat(device_type):
                super().__init__(*args, **kwargs)
            if device_type == "cpu":
                keep_raw_linear_weights(self)
            self._dsv4_finish(device_type)
            self._dsv4_forward = torch.compile(super().forward, backend=BACKEND_NAME, options=backend_options())

        def _dsv4_prepare(self, device_type: str, kwargs: dict[str, Any]) -> None:
            """Before construction, with the constructor's keyword arguments (a hook for subclasses)."""

        def _dsv4_finish(self, device_type: str) -> None:
            """After construction (a hook for subclasses)."""

        def _dsv4_before_call(self) -> None:
            """Before each compiled call (a hook for subclasses)."""

        def _dsv4_dynamo_config(self) -> dict[str, Any]:
            """Dynamo settings for the compiled calls (a hook for subclasses)."""
            return {}

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return super().forward(*args, **kwargs)
            self._dsv4_before_call()
            with cuda_compat(device_type), torch._dynamo.config.patch(self._dsv4_dynamo_config()):
                return self._dsv4_forward(*args, **kwargs)

    # vLLM's initialize_model reads the constructor's signature to decide how to call it.
    CompiledUnderCudaCompat.__init__.__signature__ = inspect.signature(base.__init__)
    CompiledUnderCudaCompat.__name__ = CompiledUnderCudaCompat.__qualname__ = f"{base.__name__}NvidiaPath"
    return CompiledUnderCudaCompat


def keep_raw_linear_weights(model: torch.nn.Module) -> None:
    """Set vLLM's CPU opt-out from weight packing on every linear layer: packing frees `.weight`."""
    from vllm.model_executor.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, LinearBase):
            module._cpu_skip_gemm_dispatch = True


def ensure_workspace_manager(device: torch.device) -> None:
    """vLLM's workspace manager, which its GPU worker creates and its CPU worker does not."""
    from vllm.v1.worker.workspace import init_workspace_manager, is_workspace_manager_initialized

    if not is_workspace_manager_initialized():
        init_workspace_manager(device)


def skip_cuda_jit_warmup(vllm_config: Any) -> None:
    """vLLM's JIT warm-up (on unless enforce_eager) builds the NVIDIA model's tilelang and DeepGEMM CUDA kernels
    at construction (nvidia/model.py:1143), importing tilelang; the backend replaces every one of those kernels, so
    there is nothing to warm up off CUDA. Turned off for this model, said in vLLM's log."""
    kernel_config = vllm_config.kernel_config
    if kernel_config.enable_jit_warmup:
        import logging

        logging.getLogger("vllm").info("dsv4_compile: vLLM's CUDA JIT warm-up (tilelang, DeepGEMM) is off for the "
                                       "NVIDIA DeepSeek-V4 model compiled by dsv4_xpu: it has no CUDA kernel to build")
        kernel_config.enable_jit_warmup = False


@functools.cache
def backend_building_under_cuda_compat(backend: type, device_type: str) -> type:
    """A subclass of the attention backend `backend` whose metadata builder builds under `cuda_compat`."""
    builder = backend.get_builder_cls()

    def build(self: Any, *args: Any, **kwargs: Any) -> Any:
        with cuda_compat(device_type):
            return builder.build(self, *args, **kwargs)

    compat_builder = type(builder.__name__, (builder,), {"build": build, "__module__": builder.__module__})
    return type(backend.__name__, (backend,), {"get_builder_cls": staticmethod(lambda: compat_builder),
                                               "__module__": backend.__module__})


def attention_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return (module for module in model.modules() if isinstance(module, AttentionLayerBase))


def build_metadata_under_cuda_compat(model: torch.nn.Module, device_type: str) -> None:
    """Each attention layer of `model` names its backend's cuda_compat subclass (see the module docstring)."""
    for layer in attention_layers(model):
        compat = backend_building_under_cuda_compat(layer.get_attn_backend(), device_type)
        layer.get_attn_backend = functools.partial(lambda backend: backend, compat)


def mark_kv_caches_static(model: torch.nn.Module) -> int:
    """Mark every bound KV-cache tensor of `model` static for Dynamo; returns how many were marked."""
    marked = 0
    for layer in attention_layers(model):
        caches = getattr(layer, "kv_cache", None)
        for cache in caches if isinstance(caches, (list, tuple)) else [caches]:
            if isinstance(cache, torch.Tensor) and cache.numel() > 0:
                torch._dynamo.mark_static(cache)
                marked += 1
    return marked


# Python bodies of vLLM custom ops that eager code between graph breaks reaches through the dispatcher: Dynamo would
# compile each as a frame of its own, with its opaque `LayerName` argument faked, and fail reading it
# (moe_runner.py:106 `_resolve_layer_name`). Traced code never inlines them (it records the op), so skipping their
# frames loses nothing.
OP_BODIES_NOT_FRAMES = {
    "vllm.model_executor.layers.fused_moe.runner.moe_runner": ("_moe_forward", "_moe_forward_shared"),
}


def skip_op_bodies_as_frames() -> list[str]:
    """Tell Dynamo not to compile the OP_BODIES_NOT_FRAMES functions as frames; returns the names done."""
    import importlib

    skip_code = getattr(importlib.import_module("torch._dynamo.eval_frame"), "skip_code", None)
    done = []
    for module_name, names in OP_BODIES_NOT_FRAMES.items():
        module = importlib.import_module(module_name)
        for name in names:
            function = getattr(module, name, None)
            if skip_code is not None and function is not None:
                skip_code(function.__code__)
                done.append(f"{module_name}.{name}")
    return done


RECOMPILES_PER_LAYER = 8


def dynamo_limits(num_layers: int) -> dict[str, Any]:
    """Recompile limits for the NVIDIA model, and a recompile limit that fails the call, naming itself.

    The model's graph breaks leave each layer's attention code as frames of their own, and Dynamo keys a frame's
    compiled variants by code object, not by module: every layer (its prefix, its compressor and indexer)
    specialises the same `forward`, so the default 8 variants per code object run out after a few layers and
    prefill/decode shapes. Dynamo would then run the frame eagerly, where the first CUDA-only op fails with an
    error naming that op, not the cause; `fail_on_recompile_limit_hit` makes the error say what happened."""
    per_code = RECOMPILES_PER_LAYER * (num_layers + 1)
    return {"recompile_limit": per_code, "accumulated_recompile_limit": max(256, 16 * per_code),
            "fail_on_recompile_limit_hit": True}


def nvidia_path_class() -> type[torch.nn.Module]:
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
    from vllm.platforms import current_platform

    base = compiled_under_cuda_compat(DeepseekV4ForCausalLM, current_platform.device_type)

    class DeepseekV4ForCausalLMNvidiaPath(base):
        def _dsv4_prepare(self, device_type: str, kwargs: dict[str, Any]) -> None:
            check_supported(kwargs["vllm_config"])
            skip_cuda_jit_warmup(kwargs["vllm_config"])
            ensure_workspace_manager(torch.device(device_type))
            register_metadata_kernels()
            skip_op_bodies_as_frames()

        def _dsv4_finish(self, device_type: str) -> None:
            build_metadata_under_cuda_compat(self, device_type)
            self._dsv4_caches_marked = False

        def _dsv4_before_call(self) -> None:
            if not self._dsv4_caches_marked:
                self._dsv4_caches_marked = mark_kv_caches_static(self) > 0

        def _dsv4_dynamo_config(self) -> dict[str, Any]:
            return dynamo_limits(len(self.model.layers))

    DeepseekV4ForCausalLMNvidiaPath.__init__.__signature__ = inspect.signature(DeepseekV4ForCausalLM.__init__)
    return DeepseekV4ForCausalLMNvidiaPath


def cpu_port_class() -> type[torch.nn.Module]:
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM

    register_metadata_kernels()
    builder = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder
    plan = builder.build_tile_scheduler
    if "c1a" not in plan(None, 0):
        builder.build_tile_scheduler = lambda self, num_decode_tokens: {
            "c1a": None, "c2a": None, **plan(self, num_decode_tokens)}
    return DeepseekV4ForCausalLM


_CLASS_FACTORIES = {"DeepseekV4ForCausalLMNvidiaPath": nvidia_path_class,
                    "DeepseekV4ForCausalLMCpuPort": cpu_port_class}


@functools.cache
def _class(name: str) -> type[torch.nn.Module]:
    return _CLASS_FACTORIES[name]()


def __getattr__(name: str) -> type[torch.nn.Module]:
    # Built on first use (vLLM's registry loads "module:Class" lazily): importing this module imports no model.
    if name in _CLASS_FACTORIES:
        return _class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

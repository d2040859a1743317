"""The CUDA-only ops that vLLM's NVIDIA DeepSeek-V4 path calls, with vLLM's exact schemas, defined where the
loaded vLLM build lacks them (its CPU build has no `_moe_C`, no `_flashmla_C` and none of the
`_C::fused_deepseek_v4_*` ops), so that Dynamo can trace the real code on any machine.

vLLM's own kernel libraries are loaded first, when vLLM is installed: a library loaded after our definition
could not define the same op, and where it has the op its definition is the one used. One module per op
family (vllm_<family>.py) lists `DEFINITIONS = [(qualname, schema, fake), ...]`, an entry optionally with a
fourth item, a CUDA kernel (for ops that stand for a Python entry point: it calls that entry point).

`CPU_DEFINITIONS = [(qualname, schema, fake, cpu_kernel), ...]` lists vLLM CPU ops that some of its CPU libraries
lack: vLLM 0.32.0 builds its DeepSeek-V4 CPU kernels only into its AVX-512 BF16 library, and the NVIDIA path
reaches a few of them eagerly, inside vLLM's opaque ops (the MoE router, inside `vllm::moe_forward_shared`),
where no lowering applies. Those get a CPU kernel of native torch (the lowering's math) where they are missing.
"""

from __future__ import annotations

import importlib

from dsv4_compile.frontend.ops.define import define_if_missing

FAMILY_MODULES = ("vllm_kv_cache", "vllm_routing", "vllm_attention", "vllm_o_proj")
# vLLM modules that load its kernel libraries (`_C` through the platform, `_moe_C`, `_flashmla_C`).
VLLM_KERNEL_MODULES = ("vllm._custom_ops", "vllm._moe_C", "vllm._flashmla_C")

_DEFINED: list[str] | None = None


def load_vllm_kernel_libraries() -> list[str]:
    """Import whichever of vLLM's kernel libraries this install has; the names imported."""
    loaded = []
    for name in VLLM_KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        loaded.append(name)
    return loaded


def define_missing_ops() -> list[str]:
    """Define every op of FAMILY_MODULES that no loaded library provides; the qualnames defined now. Without
    loading vLLM: for a process that must not import it (ensure_vllm_ops is the one to call alongside vLLM)."""
    defined = []
    for module_name in FAMILY_MODULES:
        module = importlib.import_module(f"dsv4_compile.frontend.ops.{module_name}")
        for qualname, schema, fake, *cuda in module.DEFINITIONS:
            if define_if_missing(qualname, schema, fake, *cuda):
                defined.append(qualname)
        for qualname, schema, fake, cpu in getattr(module, "CPU_DEFINITIONS", ()):
            if define_if_missing(qualname, schema, fake, cpu=cpu):
                defined.append(qualname)
    return defined


def ensure_vllm_ops() -> list[str]:
    """Load vLLM's kernel libraries, then define every op of vLLM's NVIDIA DeepSeek-V4 path they lack; the
    qualnames defined here (idempotent)."""
    global _DEFINED
    if _DEFINED is None:
        load_vllm_kernel_libraries()
        _DEFINED = define_missing_ops()
    return list(_DEFINED)

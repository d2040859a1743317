"""Kernel providers by library: one file per library whose kernels can stand in for a lowering's native math
(lowering/kernel_providers.py). Importing this package registers them all."""

from dsv4_compile.lowering.providers import vllm_cpu, vllm_xpu

__all__ = ["vllm_cpu", "vllm_xpu"]

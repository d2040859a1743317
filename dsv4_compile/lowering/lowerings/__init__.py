"""Native lowerings of CUDA-only ops, one file per op family, one decorated function per op.

Importing this package registers them all (dsv4_compile.lowering.registry.LOWERINGS).
"""

from dsv4_compile.lowering.lowerings import activation, attention, flashmla, kv_cache, mhc, mhc_vllm, o_proj, routing

__all__ = ["activation", "attention", "flashmla", "kv_cache", "mhc", "mhc_vllm", "o_proj", "routing"]

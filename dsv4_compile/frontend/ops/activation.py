"""`_C::silu_and_mul_with_clamp`, defined here when no library (vLLM's `_C`) provides it, so that CUDA-oriented
code calling it traces on any machine: a fake impl and, on CUDA with Triton, the fused Triton kernel
(triton_swiglu.py). Like vLLM's op it has no CPU kernel: off CUDA it runs only once the backend has lowered it
(dsv4_compile.lowering.lowerings.activation).
"""

from __future__ import annotations

import torch

from dsv4_compile.frontend.ops.define import define_if_missing
from dsv4_compile.lowering.lowerings.activation import check_silu_and_mul_buffers

QUALNAME = "_C::silu_and_mul_with_clamp"
SCHEMA = "silu_and_mul_with_clamp(Tensor(a!) result, Tensor input, float limit, float alpha=1.0, float beta=0.0) -> ()"


def _fake(result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> None:
    check_silu_and_mul_buffers(result, input)


def _cuda(result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> None:
    from dsv4_compile.frontend.ops.triton_swiglu import silu_and_mul_with_clamp_triton

    check_silu_and_mul_buffers(result, input)
    silu_and_mul_with_clamp_triton(result, input, limit, alpha, beta)


def _triton_usable() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return torch.cuda.is_available() and has_triton()


define_if_missing(QUALNAME, SCHEMA, _fake, _cuda if _triton_usable() else None)

"""`_C::silu_and_mul_with_clamp`: the clamped SwiGLU of DeepSeek-V4's experts.

vLLM's C++ library declares it as
    silu_and_mul_with_clamp(Tensor(a!) result, Tensor input, float limit, float alpha=1.0, float beta=0.0) -> ()
(an older version had no alpha/beta). When no library provides it, it is defined here, from Python, with a
fake impl, a CPU impl and, where CUDA and Triton are present, a fused Triton kernel.
"""

from __future__ import annotations

import torch

from dsv4_compile.registry import native_lowering

QUALNAME = "_C::silu_and_mul_with_clamp"
SCHEMA = "silu_and_mul_with_clamp(Tensor(a!) result, Tensor input, float limit, float alpha=1.0, float beta=0.0) -> ()"


def check_buffers(result: torch.Tensor, input: torch.Tensor) -> None:
    """The fused kernel's contract on its operands; raises ValueError with what is wrong."""
    if input.shape[-1] % 2:
        raise ValueError(f"silu_and_mul_with_clamp: input's last dim must be even, got shape {tuple(input.shape)}")
    expected = (*input.shape[:-1], input.shape[-1] // 2)
    if tuple(result.shape) != expected:
        raise ValueError(
            f"silu_and_mul_with_clamp: result has shape {tuple(result.shape)}, expected {expected} "
            f"for input of shape {tuple(input.shape)}"
        )
    if result.dtype != input.dtype:
        raise ValueError(f"silu_and_mul_with_clamp: result dtype {result.dtype} != input dtype {input.dtype}")
    if result.device != input.device:
        raise ValueError(f"silu_and_mul_with_clamp: result on {result.device}, input on {input.device}")


def _fake(result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> None:
    check_buffers(result, input)


@native_lowering(QUALNAME, params=("result", "input", "limit", ("alpha", 1.0), ("beta", 0.0)), out_arg="result",
                 check=_fake)
def silu_and_mul_with_clamp_native(
    input: torch.Tensor,
    limit: float,
    alpha: float = 1.0,
    beta: float = 0.0,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """gate * sigmoid(alpha * gate) * (up + beta), gate = clamp(x[..., :d], max=limit), up = clamp(x[..., d:], +-limit).

    Math in fp32; rounded to the output dtype after the activation and after the product, which is where
    the fused kernel (and eager `F.silu(gate) * up` in bf16) rounds.
    """
    dtype = out_dtype or input.dtype
    d = input.shape[-1] // 2
    gate = input[..., :d].float().clamp(max=limit)
    up = input[..., d:].float().clamp(min=-limit, max=limit)
    act = torch.nn.functional.silu(gate) if alpha == 1.0 else gate * torch.sigmoid(alpha * gate)
    act = act.to(dtype)
    return (act.float() * (up + beta)).to(dtype)


def _cpu(result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> None:
    check_buffers(result, input)
    result.copy_(silu_and_mul_with_clamp_native(input, limit, alpha, beta, out_dtype=result.dtype))


def _cuda(result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> None:
    from dsv4_compile.ops.triton_swiglu import silu_and_mul_with_clamp_triton

    check_buffers(result, input)
    silu_and_mul_with_clamp_triton(result, input, limit, alpha, beta)


def _op_exists(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _triton_usable() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return torch.cuda.is_available() and has_triton()


# FRAGMENT, never DEF: vLLM's C++ library owns the `_C` namespace when it is loaded.
_lib = torch.library.Library("_C", "FRAGMENT")
if not _op_exists(QUALNAME):
    _lib.define(SCHEMA)
    _lib.impl("silu_and_mul_with_clamp", _cpu, "CPU")
    if _triton_usable():
        _lib.impl("silu_and_mul_with_clamp", _cuda, "CUDA")
    torch.library.register_fake(QUALNAME, _fake, lib=_lib)

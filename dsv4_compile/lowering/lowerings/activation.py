"""Activation family: the clamped SwiGLU of DeepSeek-V4's experts.

`_C::silu_and_mul_with_clamp(Tensor(a!) result, Tensor input, float limit, float alpha=1.0, float beta=0.0)`
(vLLM's schema; an older one has no alpha/beta, whose defaults then apply).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering


def check_silu_and_mul_buffers(result: torch.Tensor, input: torch.Tensor, **_: object) -> None:
    """The fused kernel's contract on its operands; raises ValueError with what is wrong."""
    if input.shape[-1] % 2:
        raise ValueError(f"input's last dim must be even, got shape {tuple(input.shape)}")
    expected = (*input.shape[:-1], input.shape[-1] // 2)
    if tuple(result.shape) != expected:
        raise ValueError(f"result has shape {tuple(result.shape)}, expected {expected} "
                         f"for input of shape {tuple(input.shape)}")
    if result.dtype != input.dtype:
        raise ValueError(f"result dtype {result.dtype} != input dtype {input.dtype}")
    if result.device != input.device:
        raise ValueError(f"result on {result.device}, input on {input.device}")


@native_lowering("_C::silu_and_mul_with_clamp", out="result", check=check_silu_and_mul_buffers)
def silu_and_mul_with_clamp_native(
    input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0
) -> torch.Tensor:
    """`gate * sigmoid(alpha * gate) * (up + beta)` with `gate = min(x[..., :d], limit)` and
    `up = clamp(x[..., d:], -limit, limit)`, in `input.dtype`.

    Computed in fp32 and rounded to `input.dtype` twice, after the activation and after the product, where
    the fused kernel rounds (see the README on how far compiled code keeps these rounding points).
    The default `alpha = 1` and `beta = 0` are left out of the graph (the same values, but for the sign of a
    zero: `-0.0 + 0.0` is `+0.0`): under exact rounding Inductor builds
    kernels without FMA contraction, and the two no-op operations made this memory-bound kernel 10-40%
    slower on an H200 (benchmarks/results/swiglu.json).
    """
    half = input.shape[-1] // 2
    gate = torch.clamp_max(input[..., :half].float(), limit)
    up = torch.clamp(input[..., half:].float(), -limit, limit)
    activated = (gate * torch.sigmoid(gate if _is(alpha, 1.0) else gate * alpha)).to(input.dtype)
    return (activated.float() * (up if _is(beta, 0.0) else up + beta)).to(input.dtype)


def _is(value: object, constant: float) -> bool:
    """`value` is the plain number `constant` (a symbolic or tensor value is never taken for one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == constant

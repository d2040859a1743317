"""Fused Triton kernel for `_C::silu_and_mul_with_clamp` on CUDA (the CUDA-side reference kernel)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_with_clamp_kernel(
    out_ptr, in_ptr, d, in_row_stride, out_row_stride, limit, alpha, beta, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(in_ptr + row * in_row_stride + cols, mask=mask).to(tl.float32)
    up = tl.load(in_ptr + row * in_row_stride + d + cols, mask=mask).to(tl.float32)
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.minimum(up, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL)
    act = (gate * tl.sigmoid(alpha * gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (act * (up + beta)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_with_clamp_triton(
    result: torch.Tensor, input: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0
) -> None:
    """Write the clamped SwiGLU of `input` into `result` with one fused kernel."""
    d = input.shape[-1] // 2
    rows_in = input.reshape(-1, 2 * d)
    if rows_in.stride(-1) != 1:
        rows_in = rows_in.contiguous()
    target = result if result.is_contiguous() else torch.empty_like(result, memory_format=torch.contiguous_format)
    rows_out = target.view(-1, d)
    n_rows = rows_in.shape[0]
    if n_rows == 0 or d == 0:
        return
    block = min(1024, triton.next_power_of_2(d))
    grid = (n_rows, triton.cdiv(d, block))
    _silu_and_mul_with_clamp_kernel[grid](
        rows_out, rows_in, d, rows_in.stride(0), rows_out.stride(0),
        float(limit), float(alpha), float(beta), BLOCK=block,
    )
    if target is not result:
        result.copy_(target)

"""Pass `silu_and_mul_with_clamp`.

Matches: calls of `_C::silu_and_mul_with_clamp(result, input, limit[, alpha, beta])`, the out-parameter
CUDA kernel (as an OpOverloadPacket or `.default`, with the 3- or 5-argument schema).
Emits:   `silu_and_mul_with_clamp_native(input, limit, alpha, beta, out_dtype=...)` (clamp + SiLU + mul in
         plain torch, same rounding points); a fresh `torch.empty` result buffer is replaced by that value,
         a caller-owned buffer is filled with `aten.copy_`.
"""

from __future__ import annotations

import torch.fx

import dsv4_compile.ops.activation as activation
from dsv4_compile.passes._op_lowering import lower_registered_op
from dsv4_compile.passes.base import PassContext, PassResult


def rewrite_silu_and_mul_with_clamp(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Lower every `_C::silu_and_mul_with_clamp` call in `gm` to native torch."""
    return lower_registered_op(gm, activation.QUALNAME)

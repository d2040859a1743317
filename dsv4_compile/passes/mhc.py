"""Pass `mhc`.

Matches: calls of the fused mHC (manifold-constrained hyper-connection) ops `dsv4_cuda::mhc_pre`,
`mhc_post`, `mhc_fused_post_pre` and `hc_head` (tilelang kernels on CUDA).
Emits:   calls of their torch math (RMS-normalised mixing projection, sigmoid gates, Sinkhorn-normalised
         combination, weighted stream sums; fp32), which Inductor fuses with their neighbours.
"""

from __future__ import annotations

import torch.fx

from dsv4_compile.models.deepseek_v4 import cuda_ops
from dsv4_compile.passes._op_lowering import lower_registered_op
from dsv4_compile.passes.base import PassContext, PassResult

MHC_OPS = tuple(f"{cuda_ops.NAMESPACE}::{name}" for name in ("mhc_pre", "mhc_post", "mhc_fused_post_pre", "hc_head"))


def rewrite_mhc(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Lower every fused mHC op call in `gm` to its torch math."""
    result = PassResult()
    for qualname in MHC_OPS:
        result += lower_registered_op(gm, qualname)
    return result

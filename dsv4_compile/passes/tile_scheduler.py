"""Pass `tile_scheduler`.

Matches: the FlashMLA-style decode scheduler `dsv4_cuda::get_mla_metadata(...)` (tile-scheduler metadata and
split counts for the CUDA sparse decode kernel) and its consumer `dsv4_cuda::sparse_decode`.
Emits:   the consumer becomes native sparse decode (gather the candidate keys, softmax with the per-head
         sink, weighted sum) that needs no schedule; the scheduler call and its getitems are removed, so
         no node of it is left. A scheduler whose outputs feed anything else is left for the audit.
"""

from __future__ import annotations

import operator

import torch.fx

from dsv4_compile.models.deepseek_v4 import cuda_ops
from dsv4_compile.passes._op_lowering import lower_registered_op
from dsv4_compile.passes.base import PassContext, PassResult
from dsv4_compile.registry import op_qualname

SCHEDULER = f"{cuda_ops.NAMESPACE}::get_mla_metadata"
SPARSE_DECODE = f"{cuda_ops.NAMESPACE}::sparse_decode"


def short_circuit_tile_scheduler(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Make sparse decode native and drop the tile scheduler it no longer needs."""
    result = lower_registered_op(gm, SPARSE_DECODE, overrides={"tile_scheduler_metadata": None, "num_splits": None})
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_qualname(node.target) != SCHEDULER:
            continue
        result.matched += 1
        for user in list(node.users):
            if user.target is operator.getitem and not user.users:
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
            result.changed += 1
    return result

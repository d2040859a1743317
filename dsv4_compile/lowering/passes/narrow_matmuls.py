"""Post-grad pass `narrow_matmuls`: a matmul of bf16/fp16 values widened to fp32 (`mm(a.float(), b.float())`,
`einsum` of `.float()` operands) becomes the narrow matmul with an fp32 result (`aten.mm.dtype(a, b,
out_dtype=torch.float32)`, likewise `bmm`).

Why it is exact: a product of two bf16 (or two fp16) values is exact in fp32, so both forms sum the same exact
products in fp32; only the order of the fp32 additions is the GEMM library's either way. The narrow form reads
half the bytes, needs no fp32 copy of the operands, and runs on the matrix units instead of fp32 FMA: DeepSeek-V4
computes its attention scores, compressor and gate projections this way, and on the Flash-shaped layer these fp32
GEMMs were two thirds of the prefill time.

Matches: `aten.mm` / `aten.bmm` whose two operands are, through view-like ops only, the fp32 conversion of
tensors of one narrow dtype. Applies only where the target has a kernel for `aten.mm.dtype` / `aten.bmm.dtype`
(CUDA builds of torch; elsewhere the graph is left as it is). Runs as Inductor's `post_grad_custom_pre_pass`.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils import _pytree as pytree

from dsv4_compile.lowering.passes.audit import has_kernel_for
from dsv4_compile.lowering.passes.base import example_value

log = logging.getLogger(__name__)
aten, prims = torch.ops.aten, torch.ops.prims

SUMMARY = ("(inside Inductor, post-grad) fp32 mm/bmm of bf16/fp16 values widened to fp32 -> the narrow matmul "
           "with an fp32 result (exact products), where the target has aten::mm.dtype / bmm.dtype")
NARROW_DTYPES = (torch.bfloat16, torch.float16)
VIEW_LIKE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.clone.default, aten.alias.default, aten.slice.Tensor, aten.select.int,
}
_NARROW_FORM = {aten.mm.default: "mm", aten.bmm.default: "bmm"}


def _narrow_overload(target: object) -> torch._ops.OpOverload | None:
    name = _NARROW_FORM.get(target)
    packet = getattr(aten, name) if name else None
    return getattr(packet, "dtype", None) if packet is not None else None


def _widened_source(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(the narrow tensor, the view-like ops from it to `node`) when `node` is a widened narrow tensor."""
    chain = []
    while node.op == "call_function" and node.target in VIEW_LIKE:
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function":
        return None
    if node.target is prims.convert_element_type.default:
        to_fp32 = node.args[1] == torch.float32
    elif node.target is aten._to_copy.default:
        to_fp32 = set(node.kwargs) == {"dtype"} and node.kwargs["dtype"] == torch.float32
    else:
        return None
    source = node.args[0]
    value = example_value(source)
    if not to_fp32 or not isinstance(value, torch.Tensor) or value.dtype not in NARROW_DTYPES:
        return None
    return source, chain[::-1]


def _replay(graph: torch.fx.Graph, source: torch.fx.Node, chain: list[torch.fx.Node]) -> torch.fx.Node:
    """The view-like ops of `chain` applied to `source` (they do not depend on the dtype)."""
    current = source
    for op in chain:
        args = (current, *op.args[1:])
        current = graph.call_function(op.target, args, dict(op.kwargs))
        vals = pytree.tree_map(example_value, (args, dict(op.kwargs)))
        current.meta["val"] = op.target(*vals[0], **vals[1])
    return current


def narrow_widened_matmuls(graph: torch.fx.Graph, device_type: str) -> int:
    """Rewrite every matching matmul of `graph`; the number rewritten."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _NARROW_FORM:
            continue
        narrow = _narrow_overload(node.target)
        if narrow is None or not has_kernel_for(narrow, device_type):
            continue
        operands = [_widened_source(arg) for arg in node.args[:2]]
        if None in operands or example_value(operands[0][0]).dtype != example_value(operands[1][0]).dtype:
            continue
        with graph.inserting_before(node):
            a, b = (_replay(graph, source, chain) for source, chain in operands)
            replacement = graph.call_function(narrow, (a, b, torch.float32))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        log.info("narrow_matmuls: %d fp32 matmul(s) of widened narrow values -> narrow matmul, fp32 out", rewritten)
    return rewritten


class NarrowWidenedMatmuls(CustomGraphPass):
    """The pass as Inductor's `post_grad_custom_pre_pass` for one target device type (cache key included)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewritten += narrow_widened_matmuls(graph, self.device_type)

    def uuid(self) -> bytes:
        with open(__file__, "rb") as source:
            return hashlib.sha256(source.read() + self.device_type.encode()).digest()

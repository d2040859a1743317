"""Pass `aux_streams`.

Matches: everything that orders work across CUDA streams, in both Dynamo spellings:
  - torch >= 2.12: `torch.ops.streams.*` nodes (wait_stream, record_event, wait_event, fork, join, ...) and
    the `meta["custom"]["stream"]` tags that `with torch.cuda.stream(s):` puts on the nodes it encloses;
  - torch 2.11: `wait_stream` / `wait_event` / `record_event` / ... as call_method nodes on stream objects;
  - `tensor.record_stream(s)`, and the `get_external_object_by_index` lookups that fetch stream/event objects.
Emits:   nothing: the nodes are removed and the tags stripped, so all work runs in program order on the
         current stream, which is what the fork/join computed (the join waited for the aux stream).
"""

from __future__ import annotations

import torch
import torch.fx

from dsv4_compile.lowering.passes.base import PassContext, PassResult, example_value, graph_scopes
from dsv4_compile.lowering.registry import op_qualname

STREAM_METHODS = frozenset(
    {"wait_stream", "wait_event", "record_event", "record", "synchronize", "query", "elapsed_time",
     "__enter__", "__exit__"}
)
STREAM_OBJECT_FUNCTIONS = frozenset(
    {"get_external_object_by_index", "current_stream", "default_stream", "Stream", "Event", "set_stream"}
)


def is_stream_object(node: object) -> bool:
    """A node that yields a stream or event object."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function" and getattr(node.target, "__name__", None) in STREAM_OBJECT_FUNCTIONS:
        return True
    return isinstance(example_value(node), (torch.Stream, torch.Event))


def is_stream_node(node: torch.fx.Node) -> bool:
    """A node whose only job is stream/event ordering (removable on a serial target)."""
    if node.op == "call_function":
        qualname = op_qualname(node.target)
        return (qualname is not None and qualname.startswith("streams::")) or is_stream_object(node)
    if node.op == "call_method":
        if node.target == "record_stream":
            return True
        return node.target in STREAM_METHODS and bool(node.args) and is_stream_object(node.args[0])
    return False


def stream_tag(node: torch.fx.Node) -> object:
    """The stream index `with torch.cuda.stream(s):` attached to the node, or None."""
    custom = node.meta.get("custom")
    return custom.get("stream") if isinstance(custom, dict) else None


def remove_aux_streams(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove stream/event nodes and stream tags from `gm`; returns the counts."""
    result = PassResult()
    for scope in graph_scopes(gm):
        doomed = [node for node in scope.gm.graph.nodes if is_stream_node(node)]
        for node in reversed(doomed):  # users before their inputs; a node still used elsewhere stays for the audit
            scope.require_rewritable(node, "a stream operation")
            result.count("stream ops", matched=1)
            if not node.users:
                scope.gm.graph.erase_node(node)
                result.count("stream ops", changed=1)
        for node in scope.gm.graph.nodes:
            if stream_tag(node) is not None:
                scope.require_rewritable(node, "a stream-tagged node")
                result.count("stream tags", matched=1, changed=1)
                del node.meta["custom"]["stream"]
                if not node.meta["custom"]:
                    del node.meta["custom"]
    return result


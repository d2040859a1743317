"""What every pass takes and returns, and small graph helpers they share."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass knows besides the graph: the target device and how strict to be."""

    device: torch.device
    strict: bool = True


@dataclasses.dataclass
class PassResult:
    """Counts of one pass over one graph: nodes it matched, and nodes it changed (added, rewired or removed)."""

    matched: int = 0
    changed: int = 0

    def __iadd__(self, other: PassResult) -> PassResult:
        self.matched += other.matched
        self.changed += other.changed
        return self


# Meta keys that describe where a node came from; copied onto nodes that replace it.
PROVENANCE_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr")


def copy_provenance(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    """Give `dst` the source location of `src`, so errors and diffs point at the user's line."""
    for key in PROVENANCE_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def example_value(node: object) -> object:
    """The fake/real value recorded for a node by Dynamo ('example_value') or make_fx ('val')."""
    if not isinstance(node, torch.fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def erase_if_unused(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """Erase `node` when nothing uses it; returns whether it was erased."""
    if node.users:
        return False
    graph.erase_node(node)
    return True

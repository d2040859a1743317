"""What every pass takes and returns, the graphs it visits (the top graph and every higher-order-op
subgraph), and small node helpers the passes share."""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from torch.utils import _pytree as pytree

from dsv4_compile.errors import UnsupportedNodeError


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass knows besides the graph: the target device, how strict to be, which op families are off, and
    which kernel providers the user prefers (option `providers`, lowering/kernel_providers.py)."""

    device: torch.device
    strict: bool = True
    disabled_families: frozenset[str] = frozenset()
    providers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class PassResult:
    """Counts of one pass over one graph: nodes it matched, and nodes it changed (added, rewired or removed);
    `detail` splits them by op family or construct, for the report; `kernels`: op -> the implementation its
    calls got (native math or a library kernel)."""

    matched: int = 0
    changed: int = 0
    detail: dict[str, PassResult] = dataclasses.field(default_factory=dict)
    skipped: bool = False
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)

    def count(self, key: str | None = None, *, matched: int = 0, changed: int = 0) -> None:
        self.matched += matched
        self.changed += changed
        if key is not None:
            self.detail.setdefault(key, PassResult()).count(matched=matched, changed=changed)

    def __iadd__(self, other: PassResult) -> PassResult:
        self.count(matched=other.matched, changed=other.changed)
        for key, sub in other.detail.items():
            self.detail.setdefault(key, PassResult()).__iadd__(sub)
        self.kernels.update(other.kernels)
        return self


# Higher-order ops whose subgraphs the passes rewrite: each calls its subgraphs as plain functions of their
# operands, so a rewrite that keeps a subgraph's inputs and outputs keeps the op's meaning.
REWRITABLE_HOPS = frozenset({
    "cond", "while_loop", "invoke_subgraph", "map_impl", "scan",
    "wrap", "tag_activation_checkpoint", "wrap_with_set_grad_enabled", "wrap_with_autocast",
})


@dataclasses.dataclass(frozen=True)
class GraphScope:
    """One graph a pass visits: the top graph (`hop` None) or a subgraph called by the higher-order op `hop`."""

    gm: torch.fx.GraphModule
    path: str
    hop: str | None = None

    @property
    def rewritable(self) -> bool:
        return self.hop is None or self.hop in REWRITABLE_HOPS

    def require_rewritable(self, node: torch.fx.Node, what: str) -> None:
        """Refuse to rewrite `node` inside a subgraph of a higher-order op the passes do not support."""
        if not self.rewritable:
            raise UnsupportedNodeError(
                node, f"{what} sits in subgraph '{self.path}' of the higher-order op '{self.hop}', whose subgraphs "
                f"dsv4_xpu does not rewrite (supported: {', '.join(sorted(REWRITABLE_HOPS))})")


def hop_name(node: torch.fx.Node) -> str | None:
    """The name of the higher-order op a node calls, else None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.__name__
    return None


def graph_scopes(gm: torch.fx.GraphModule) -> list[GraphScope]:
    """`gm` and every subgraph reachable through higher-order ops, outermost first (each once)."""
    scopes = [GraphScope(gm, "")]
    seen = {id(gm)}
    for scope in scopes:  # grows while iterating: breadth-first over nested subgraphs
        for node in scope.gm.graph.nodes:
            hop = hop_name(node)
            if hop is None:
                continue
            for arg in pytree.tree_leaves((node.args, node.kwargs)):
                sub = _subgraph_of(scope.gm, arg)
                if sub is not None and id(sub) not in seen:
                    seen.add(id(sub))
                    path = f"{scope.path}.{arg.target}" if scope.path else str(arg.target)
                    outer = scope.hop if scope.hop is not None and not scope.rewritable else hop
                    scopes.append(GraphScope(sub, path, outer))
    return scopes


def _subgraph_of(gm: torch.fx.GraphModule, arg: object) -> torch.fx.GraphModule | None:
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    try:
        value = gm.get_submodule(arg.target)
    except AttributeError:
        return None
    return value if isinstance(value, torch.fx.GraphModule) else None


def tidy(gm: torch.fx.GraphModule) -> None:
    """Lint and recompile `gm` and every subgraph: the step after each pass."""
    for scope in reversed(graph_scopes(gm)):
        scope.gm.graph.lint()
        scope.gm.recompile()


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


def erase_dead_producers(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> int:
    """Erase `nodes` that nothing uses and that have no side effect, then their inputs that become so;
    returns how many calls went (not counting the getitems of their results)."""
    gone: set[torch.fx.Node] = set()
    pending = [n for n in nodes if isinstance(n, torch.fx.Node)]
    while pending:
        node = pending.pop()
        if node in gone or node.graph is not graph or node.users or node.op != "call_function" or node.is_impure():
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        gone.add(node)
        pending.extend(inputs)
    return sum(node.target is not operator.getitem for node in gone)

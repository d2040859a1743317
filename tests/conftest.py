"""Shared test helpers: capture the Dynamo graph a backend receives, and reset Dynamo between tests."""

from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import torch
from torch.torch_version import TorchVersion

os.environ.setdefault("PYTHONBREAKPOINT", "0")

import dsv4_compile

# torch 2.11's Dynamo does not route factory calls (torch.arange(..., device="cuda")) through a
# TorchFunctionMode, so cuda_compat cannot retarget them while tracing there; torch 2.13 does.
needs_trace_time_retarget = pytest.mark.skipif(
    TorchVersion(torch.__version__) < (2, 13),
    reason="cuda_compat retargets device='cuda' factory calls under Dynamo only on torch >= 2.13 (README)",
)

# torch 2.13's Dynamo refuses a graph input mutated on an aux stream before an event is recorded; 2.11's lets
# the graph through (seen on the 2.11 CUDA build), where the backend then runs it in program order.
needs_stream_aware_dynamo = pytest.mark.skipif(
    TorchVersion(torch.__version__) < (2, 13),
    reason="torch 2.11's Dynamo does not check graph-input mutations against stream events (2.13's does)",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Captured(Exception):
    def __init__(self, gm, inputs):
        super().__init__("graph captured")
        self.gm, self.inputs = gm, inputs


def _capturing_backend(gm, example_inputs, **_):
    # Stop before anything runs: the raw graph may hold stream ops that CPU cannot execute.
    raise _Captured(gm, list(example_inputs))


def capture_graph(fn, *args, device: str = "cpu") -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo graph of `fn(*args)`, as a backend receives it, traced under cuda_compat(device)."""
    with dsv4_compile.cuda_compat(device):
        try:
            torch.compile(fn, backend=_capturing_backend, fullgraph=True)(*args)
        except Exception as exc:  # Dynamo wraps backend errors; find ours in the chain
            while exc is not None and not isinstance(exc, _Captured):
                exc = exc.__cause__ or exc.__context__
            if exc is None:
                raise
            return exc.gm, exc.inputs
    raise AssertionError("the backend was never called")


def targets(gm: torch.fx.GraphModule) -> list[str]:
    """Readable call targets of a graph, for before/after assertions."""
    from dsv4_compile.errors import node_target_name

    return [node_target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def reports_since(snapshot: list) -> list:
    """The rewrite reports made after `snapshot = dsv4_compile.all_reports()` (the process keeps only the latest
    64, so counting them would not do; the snapshot holds the old ones, so no new one can reuse their id)."""
    old = {id(report) for report in snapshot}
    return [report for report in dsv4_compile.all_reports() if id(report) not in old]


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter[str]:
    """Call targets of `gm` and all its subgraphs, counted."""
    from dsv4_compile.errors import node_target_name
    from dsv4_compile.lowering.passes.base import graph_scopes

    return collections.Counter(node_target_name(n) for scope in graph_scopes(gm) for n in scope.gm.graph.nodes
                               if n.op in ("call_function", "call_method"))


@dataclasses.dataclass
class Lowered:
    gm: torch.fx.GraphModule
    inputs: list
    before: collections.Counter[str]
    after: collections.Counter[str]
    report: object

    def run(self):
        return self.gm(*self.inputs)


def lower_graph_testing(fn, *args, expected_before=(), expected_after=(), unexpected_after=(), device="cpu",
                        **pipeline_options) -> Lowered:
    """Capture `fn(*args)` as Dynamo hands it to a backend, run the whole dsv4_xpu pipeline on it (no Inductor),
    and assert which ops were there before and which are (not) there after (names as `targets` gives them;
    a substring match counts, so 'empty' matches 'torch.empty')."""
    from dsv4_compile.lowering.pipeline import run_pipeline

    gm, inputs = capture_graph(fn, *args, device=device)
    before = op_counts(gm)
    report = run_pipeline(gm, torch.device(device), **pipeline_options)
    after = op_counts(gm)

    def present(name, counts):
        return any(name in op for op in counts)

    for name in expected_before:
        assert present(name, before), f"{name} not in the captured graph: {sorted(before)}"
    for name in expected_after:
        assert present(name, after), f"{name} not in the rewritten graph: {sorted(after)}"
    for name in unexpected_after:
        assert not present(name, after), f"{name} still in the rewritten graph: {sorted(after)}"
    return Lowered(gm, inputs, before, after, report)

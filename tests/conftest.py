"""Shared test helpers: capture the Dynamo graph a backend receives, and reset Dynamo between tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PYTHONBREAKPOINT", "0")

import dsv4_compile

# torch 2.11's Dynamo does not route factory calls (torch.arange(..., device="cuda")) through a
# TorchFunctionMode, so cuda_compat cannot retarget them while tracing there; torch 2.13 does.
needs_trace_time_retarget = pytest.mark.skipif(
    torch.__version__ < "2.13",
    reason="cuda_compat retargets device='cuda' factory calls under Dynamo only on torch >= 2.13 (README)",
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

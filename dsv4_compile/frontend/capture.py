"""Capture a model's graph with CUDA semantics on any machine, and rewrite a copy of it.

`capture(model, *inputs)` runs Dynamo (the graph a torch.compile backend receives) on fake `cuda:0`
parameters and inputs, under a FakeTensorMode, so no GPU and no CUDA build are needed: custom ops, stream
ops and tags, and `device="cuda"` constants all stay in the graph, as on an NVIDIA machine.
`rewrite(gm, device=...)` runs the dsv4_xpu pass pipeline over a copy of such a graph.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv4_compile.errors import Dsv4CompileError
from dsv4_compile.frontend import cuda_compat as compat
from dsv4_compile.lowering.devices import parse_device
from dsv4_compile.lowering.pipeline import run_pipeline
from dsv4_compile.lowering.report import PassStats, RewriteReport
from dsv4_compile.tools.diff import DiffRecorder
from dsv4_compile.tools.fake_devices import fake_device_support

EXAMPLE_INPUTS = "dsv4_example_inputs"  # gm.meta key: the (fake) inputs the captured graph was traced with


class CaptureError(Dsv4CompileError):
    """Dynamo could not capture the model as one graph with the requested device semantics."""


def capture(model: Callable[..., Any], *inputs: Any, as_device: str | torch.device = "cuda") -> torch.fx.GraphModule:
    """The Dynamo graph of `model(*inputs)` as a backend would receive it on `as_device` (default `cuda:0`).

    `model` is a module, a bound method of one (e.g. `model.prefill`) or a function. Its parameters,
    buffers and tensor attributes, and the tensor inputs (also inside lists, tuples, dicts, dataclasses and
    plain state objects such as caches), are replaced for the trace by fake tensors of the same shape,
    stride and dtype on `as_device`; values are never read. Without CUDA,
    `torch.cuda.Stream/Event/stream/current_stream` are the `cuda_compat` stand-ins while tracing (build
    the model under `dsv4_compile.cuda_compat("cpu")`), so stream ops are recorded as on CUDA. One
    `fullgraph=True`, static-shape capture; the example inputs are kept in `gm.meta["dsv4_example_inputs"]`.
    """
    device = _indexed(parse_device(as_device))
    fake_mode = FakeTensorMode()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(fake_device_support())
        fakes = _Fakes(fake_mode, device)
        owner = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
        if isinstance(owner, torch.nn.Module):  # a module, or a bound method of one (model.prefill)
            stack.enter_context(fakes.swapped_state(owner))
        fake_inputs = fakes.convert(inputs)
        stack.enter_context(_cuda_stream_semantics())
        return _dynamo_graph(model, fake_inputs, device)


def rewrite(
    gm: torch.fx.GraphModule,
    device: str | torch.device = "xpu",
    *,
    strict: bool = True,
    disable: Sequence[str] = (),
    observer: Callable[[int, str, torch.fx.GraphModule, PassStats | None], None] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> tuple[torch.fx.GraphModule, RewriteReport]:
    """Run the pass pipeline over a copy of `gm` for `device`; `gm` itself is left as it was.

    `observer` sees every pass (a `DiffRecorder` collects the per-pass diffs; use one per graph);
    `dump_dir` writes index.md and the stage files; `name` names the graph in the report and the dump.
    Every pass's graph before/after also goes to torch's structured log, as in the backend.
    """
    target = parse_device(device)
    new = copy_graph_module(gm)
    if isinstance(observer, DiffRecorder):
        recorder = observer
        recorder.device = recorder.device or str(target)
    else:
        recorder = DiffRecorder(name or type(gm).__name__, str(target), record=dump_dir is not None)

    def observe(index: int, pass_name: str, graph: torch.fx.GraphModule, stats: PassStats | None) -> None:
        recorder(index, pass_name, graph, stats)
        if observer is not None and observer is not recorder:
            observer(index, pass_name, graph, stats)

    try:
        report = run_pipeline(new, target, strict=strict, disable=tuple(disable), name=name or recorder.graph,
                              observer=observe)
    except Dsv4CompileError as exc:
        if dump_dir is not None:
            recorder.write(dump_dir, error=str(exc))
        raise
    if dump_dir is not None:
        recorder.write(dump_dir)
    return new, report


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph, nodes and node annotations can be rewritten without touching `gm`.

    Node meta dicts are copied one level deep (plus `meta["custom"]`); fake values are shared.
    """
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if isinstance(node.meta.get("custom"), dict):
            node.meta["custom"] = dict(node.meta["custom"])
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def example_inputs(gm: torch.fx.GraphModule) -> list[Any]:
    """The inputs a captured graph was traced with, else its placeholders' recorded example values."""
    recorded = getattr(gm, "meta", {}).get(EXAMPLE_INPUTS)
    if recorded is not None:
        return list(recorded)
    values = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    if any(v is None for v in values):
        raise CaptureError("the graph's placeholders carry no example values; pass its inputs explicitly")
    return values


class _Captured(Exception):
    def __init__(self, gm: torch.fx.GraphModule, inputs: list[Any]) -> None:
        super().__init__("graph captured")
        self.gm, self.inputs = gm, inputs


def _capturing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
    raise _Captured(gm, list(example_inputs))  # stop here: nothing of the fake graph is ever run


def _dynamo_graph(model: Callable[..., Any], inputs: tuple[Any, ...], device: torch.device) -> torch.fx.GraphModule:
    name = type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")
    try:
        torch.compile(model, backend=_capturing_backend, fullgraph=True, dynamic=False)(*inputs)
    except Exception as exc:  # Dynamo wraps backend errors; find ours in the chain
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, _Captured):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise CaptureError(f"could not capture {name} as one graph on {device}: {exc}") from exc
        cause.gm.meta[EXAMPLE_INPUTS] = cause.inputs
        return cause.gm
    raise CaptureError(f"{name} ran without producing a graph (nothing for Dynamo to capture?)")


def _indexed(device: torch.device) -> torch.device:
    """Fake tensors of a device with no runtime need an explicit index."""
    return device if device.type == "cpu" or device.index is not None else torch.device(device.type, 0)


@contextlib.contextmanager
def _cuda_stream_semantics() -> Iterator[None]:
    """Without CUDA: torch.cuda's stream API as cuda_compat's recording stand-ins, devices left alone."""
    if torch.cuda.is_available():
        yield
        return
    with compat.cuda_stream_api(torch.device("cpu")):
        yield


class _Fakes:
    """Fake stand-ins on one device for real tensors, parameters and buffers (values never read)."""

    def __init__(self, mode: FakeTensorMode, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.memo: dict[int, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.memo:
            with self.mode:
                fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=self.device)
            self.memo[id(t)] = torch.nn.Parameter(fake, requires_grad=False) if isinstance(
                t, torch.nn.Parameter) else fake
        return self.memo[id(t)]

    def convert(self, value: Any) -> Any:
        """Tensors (also in lists, tuples, dicts, dataclasses) -> fakes; everything else unchanged."""
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, (list, tuple)):
            items = [self.convert(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, dict):
            return type(value)((k, self.convert(v)) for k, v in value.items())
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            clone = copy.copy(value)
            for field in dataclasses.fields(value):
                object.__setattr__(clone, field.name, self.convert(getattr(value, field.name)))
            return clone
        if _holds_tensors(value):  # a plain state object such as a cache: copy it with fake tensors inside
            clone = copy.copy(value)
            clone.__dict__.update({k: self.convert(v) for k, v in vars(value).items()})
            return clone
        return value

    @contextlib.contextmanager
    def swapped_state(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block, every module's parameters, buffers and tensor attributes are fakes."""
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for module in model.modules():
                tensors = [(module._parameters, k, v) for k, v in module._parameters.items() if v is not None]
                tensors += [(module._buffers, k, v) for k, v in module._buffers.items() if v is not None]
                tensors += [(module.__dict__, k, v) for k, v in module.__dict__.items()
                            if isinstance(v, torch.Tensor)]
                for table, key, value in tensors:
                    saved.append((table, key, value))
                    table[key] = self.tensor(value)
            yield
        finally:
            for table, key, value in reversed(saved):
                table[key] = value


def _holds_tensors(value: Any) -> bool:
    """A plain (non-module) object with tensors among its attributes, directly or in lists/tuples."""
    if isinstance(value, (torch.nn.Module, type)) or not hasattr(value, "__dict__"):
        return False
    for attr in vars(value).values():
        items = attr if isinstance(attr, (list, tuple)) else (attr,)
        if any(isinstance(item, torch.Tensor) for item in items):
            return True
    return False

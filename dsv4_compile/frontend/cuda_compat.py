"""Trace-time compatibility: CUDA-oriented Python running against another device.

`cuda_compat(device)` lets code written for CUDA run, eagerly and while Dynamo traces it, on `device`:
  - `torch.cuda.Stream/Event/current_stream/default_stream/stream/synchronize` give the target's streams
    and events (on CPU, which has no stream runtime, eager calls are no-ops, and under Dynamo they still
    record the stream nodes that the `aux_streams` pass then removes);
  - `torch.cuda.is_current_stream_capturing()` is False (no CUDA graph is ever captured on `device`);
  - `device="cuda"`, `.to("cuda")`, `.cuda()` land on `device`; `.is_cuda` is True for tensors on `device`;
  - `torch.mm/bmm(a, b, out_dtype=dt)`, where `device` has no kernel for it, multiply in `dt`;
  - where vLLM is loaded, its platform answers the CUDA capability of the path lowered (vllm_platform.py);
  - where vLLM is loaded, Dynamo traces the per-step counts of its attention metadata as symbolic ints, so
    decode steps and batch sizes do not recompile (vllm_step_metadata.py);
  - where vLLM is loaded, its CUDA-only kernel wrappers (tilelang, DeepGEMM, FlashMLA entry points) become
    calls of registered ops (kernel_wrappers.py).
It changes what Python computes at trace time only; the CUDA-only ops, streams and kernels that reach the
graph are the backend passes' job. On a `cuda` target it changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dsv4_compile.frontend.kernel_wrappers import vllm_kernel_wrappers
from dsv4_compile.frontend.vllm_platform import cuda_capability_of_lowered_path
from dsv4_compile.frontend.vllm_step_metadata import dynamic_step_metadata
from dsv4_compile.lowering.devices import is_cuda_device, parse_device


class CompatStream:
    """A stand-in for `torch.cuda.Stream` on a device without a stream runtime (CPU).

    Eagerly its ordering calls do nothing (one serial queue needs no ordering); while Dynamo traces they
    reach a real `torch.Stream`, so the graph records them just as it would on CUDA.
    """

    def __init__(self, device: torch.device | str | int | None = None, priority: int = 0, **_: Any) -> None:
        self.device = _TARGET[-1] if _TARGET else torch.device("cpu")
        self.stream = torch.Stream(self.device.type)

    def wait_stream(self, other: CompatStream) -> None:
        if torch.compiler.is_compiling():
            self.stream.wait_stream(other.stream)

    def wait_event(self, event: CompatEvent) -> None:
        if torch.compiler.is_compiling():
            self.stream.wait_event(event.event)

    def record_event(self, event: CompatEvent | None = None) -> CompatEvent:
        event = event or CompatEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CompatEvent:
    """A stand-in for `torch.cuda.Event` on a device without a stream runtime; see CompatStream."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.event = torch.Event(_TARGET[-1].type if _TARGET else "cpu")

    def record(self, stream: CompatStream | None = None) -> None:
        if torch.compiler.is_compiling():
            self.event.record((stream or current_stream()).stream)

    def wait(self, stream: CompatStream | None = None) -> None:
        if torch.compiler.is_compiling():
            (stream or current_stream()).stream.wait_event(self.event)

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_TARGET: list[torch.device] = []
_CURRENT: list[CompatStream] = []


def current_stream(device: Any = None) -> CompatStream:
    return _CURRENT[-1]


def stream(s: CompatStream | None) -> contextlib.AbstractContextManager:
    if s is not None and torch.compiler.is_compiling():
        return s.stream
    return contextlib.nullcontext()


def synchronize(device: Any = None) -> None:
    pass


def not_capturing() -> bool:
    """`torch.cuda.is_current_stream_capturing` on a target that never captures CUDA graphs."""
    return False


def _native_stream_api(device: torch.device) -> dict[str, Any]:
    """Replacements for torch.cuda's stream API on a device whose streams exist (XPU)."""
    def make_stream(device_arg: Any = None, priority: int = 0, **_: Any) -> torch.Stream:
        return torch.Stream(device.type, priority=priority)

    def make_event(enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> torch.Event:
        return torch.Event(device.type, enable_timing=enable_timing)

    backend = getattr(torch, device.type)
    return {
        "Stream": make_stream,
        "Event": make_event,
        "current_stream": lambda device_arg=None: backend.current_stream(),
        "default_stream": lambda device_arg=None: backend.current_stream(),
        "stream": backend.stream,
        "synchronize": lambda device_arg=None: backend.synchronize(),
        "is_current_stream_capturing": not_capturing,
    }


def _serial_stream_api() -> dict[str, Any]:
    return {
        "Stream": CompatStream,
        "Event": CompatEvent,
        "current_stream": current_stream,
        "default_stream": current_stream,
        "stream": stream,
        "synchronize": synchronize,
        "is_current_stream_capturing": not_capturing,
    }


_OUT_DTYPE_MATMULS = (torch.mm, torch.bmm)


def has_out_dtype_matmul(device_type: str) -> bool:
    """Whether torch has a `device_type` kernel for `torch.mm(a, b, out_dtype=...)` (aten::mm.dtype)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", device_type.upper())


class RetargetCudaMode(TorchFunctionMode):
    """Maps `cuda` devices in torch calls to the target device (`device=`, `.to(...)`, `.cuda()`, `.is_cuda`),
    `torch.mm/bmm(..., out_dtype=)` to a matmul in `out_dtype` where the target has no kernel for it, and,
    while Dynamo traces, a call writing into a non-contiguous `out=` to the call plus a copy into `out`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.has_out_dtype_matmul = has_out_dtype_matmul(device.type)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        # Under Dynamo `.is_cuda` never reaches a mode (see _dynamo_is_cuda), and `func.__self__` of an
        # OpOverloadPacket is something torch 2.11's Dynamo cannot trace, so look only when eager.
        if not torch.compiler.is_compiling() and getattr(func, "__self__", None) is torch._C.TensorBase.is_cuda:
            return args[0].device.type in ("cuda", self.device.type)
        if func is torch.Tensor.cuda:
            return args[0].to(self.device, non_blocking=kwargs.get("non_blocking", False))
        if "device" in kwargs and is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": self.device}
        if func is torch.Tensor.to:
            args = tuple(self.device if is_cuda_device(a) else a for a in args)
        if func in _OUT_DTYPE_MATMULS and not self.has_out_dtype_matmul:
            kwargs = dict(kwargs)
            out_dtype = kwargs.pop("out_dtype", args[2] if len(args) > 2 else None)
            if out_dtype is not None:
                # What a kernel accumulating in `out_dtype` computes; CPU has no such kernel (aten::mm.dtype)
                # and Inductor accepts out_dtype only for CUDA and XPU.
                return func(args[0].to(out_dtype), args[1].to(out_dtype), **kwargs)
        if torch.compiler.is_compiling() and _non_contiguous(kwargs.get("out")):
            return _into_non_contiguous_out(func, args, kwargs)
        return func(*args, **kwargs)


def _non_contiguous(out: Any) -> bool:
    return isinstance(out, torch.Tensor) and not out.is_contiguous()


def _into_non_contiguous_out(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`func(..., out=view)` with a non-contiguous view (vLLM's o_proj: `torch.bmm(..., out=z.transpose(0, 1))`)
    is a graph break for Dynamo; eager torch computes the result and copies it into `out`, and so does this.
    Anything that is not a plain same-shape, same-dtype result keeps the original call."""
    out = kwargs["out"]
    result = func(*args, **{k: v for k, v in kwargs.items() if k != "out"})
    if not isinstance(result, torch.Tensor) or result.shape != out.shape or result.dtype != out.dtype:
        return func(*args, **kwargs)
    return out.copy_(result)


# Eager code between graph breaks calls the mode for every torch function; Dynamo would try to compile that call
# as a frame of its own and, its arguments changing dtype from call to call, hit its recompile limit. Skip it as
# a top-level frame only: traced user code still inlines it (frame strategies do not apply to inlining).
_skip_code = getattr(importlib.import_module("torch._dynamo.eval_frame"), "skip_code", None)
if _skip_code is not None:
    _skip_code(RetargetCudaMode.__torch_function__.__code__)

@contextlib.contextmanager
def _dynamo_is_cuda(device_type: str) -> Iterator[None]:
    """Dynamo answers `.is_cuda` from the fake tensor without consulting modes; teach it the target."""
    from torch._dynamo.variables.base import VariableTracker
    from torch._dynamo.variables.tensor import TensorVariable

    original = TensorVariable.method_attr_is_cuda

    def method_attr_is_cuda(self, tx):  # noqa: ANN001 - Dynamo's own signature
        if self.device is None:
            return None
        return VariableTracker.build(tx, self.device.type in ("cuda", device_type))

    TensorVariable.method_attr_is_cuda = method_attr_is_cuda
    try:
        yield
    finally:
        TensorVariable.method_attr_is_cuda = original


@contextlib.contextmanager
def _dynamo_subclass_getattr_without_redispatch() -> Iterator[None]:
    """Stop Dynamo from re-dispatching a base-tensor attribute read to a subclass that has disabled dispatch.

    A tensor subclass whose `__torch_function__` defers to `super().__torch_function__` (vLLM's parameters do)
    makes Dynamo recurse forever on `w.T`, `w.shape`, ... while any torch function mode is active:
      1. TensorWithTFOverrideVariable.var_getattr dispatches the read to the subclass's `__torch_function__`
         whenever `can_dispatch_torch_function` holds, which is "subclass dispatch enabled OR a mode active";
      2. `super().__torch_function__` (Tensor.__torch_function__) disables subclass dispatch and calls the
         attribute getter, which Dynamo turns into `var_getattr` on the same variable again;
      3. subclass dispatch is off, but the mode half of the test still holds, so step 1 dispatches to the
         subclass again.
    Eagerly, inside DisableTorchFunctionSubclass a getter never reaches the subclass's `__torch_function__`:
    it reads the base tensor's attribute. The patch does exactly that: with subclass dispatch disabled, a
    base `torch.Tensor` attribute the subclass does not override is read as on a plain tensor. Everything
    else goes to Dynamo's own method. (Dynamo's var_getattr hands a getter to the subclass, never to a mode,
    with or without the patch; `.is_cuda` goes through _dynamo_is_cuda.) Torch 2.11 and 2.13 share this
    code; where its pieces are missing the patch is skipped.
    """
    try:
        from torch._dynamo.variables import torch_function
        from torch._dynamo.variables.tensor import TensorVariable
    except ImportError:
        yield
        return
    subclass_variable = getattr(torch_function, "TensorWithTFOverrideVariable", None)
    is_overridden = getattr(torch_function, "_is_attr_overridden", None)
    if subclass_variable is None or is_overridden is None or "var_getattr" not in vars(subclass_variable):
        yield
        return
    original = subclass_variable.var_getattr

    def var_getattr(self, tx, name):  # noqa: ANN001 - Dynamo's own signature
        state = tx.symbolic_torch_function_state
        if (not getattr(state, "torch_function_subclass_enabled", True) and hasattr(torch.Tensor, name)
                and not is_overridden(tx, self, name)):
            return TensorVariable.var_getattr(self, tx, name)
        return original(self, tx, name)

    subclass_variable.var_getattr = var_getattr
    try:
        yield
    finally:
        subclass_variable.var_getattr = original


def _warm_dynamo_rule_caches() -> None:
    """Dynamo builds its torch-function tables lazily, from whatever `torch.cuda.*` is at that moment.

    Built while our stand-ins are installed, the tables would key them as torch builtins (and forget the
    real ones for the rest of the process), so build them first.
    """
    from torch._dynamo import trace_rules
    from torch._dynamo.variables.torch import TorchInGraphFunctionVariable

    trace_rules.get_torch_obj_rule_map()
    TorchInGraphFunctionVariable._get_handlers()


@contextlib.contextmanager
def cuda_stream_api(target: torch.device) -> Iterator[None]:
    """Inside the block `torch.cuda`'s stream API (Stream, Event, current_stream, stream, ...) gives
    `target`'s streams, or on CPU the recording stand-ins; devices are left alone (see cuda_compat)."""
    api = _native_stream_api(target) if target.type != "cpu" else _serial_stream_api()
    _warm_dynamo_rule_caches()
    with contextlib.ExitStack() as stack:
        _TARGET.append(target)
        stack.callback(_TARGET.pop)
        saved = {name: getattr(torch.cuda, name) for name in api}
        for name, replacement in api.items():
            setattr(torch.cuda, name, replacement)
        stack.callback(lambda: [setattr(torch.cuda, n, v) for n, v in saved.items()])
        if target.type == "cpu":
            _CURRENT.append(CompatStream())
            stack.callback(_CURRENT.pop)
        yield


@contextlib.contextmanager
def cuda_compat(device: str | torch.device) -> Iterator[torch.device]:
    """Run CUDA-oriented Python against `device` (eagerly and under Dynamo) inside this block."""
    target = parse_device(device)
    if target.type == "cuda":
        yield target
        return
    with (cuda_stream_api(target), _dynamo_is_cuda(target.type), _dynamo_subclass_getattr_without_redispatch(),
          vllm_kernel_wrappers(target), cuda_capability_of_lowered_path(), dynamic_step_metadata(),
          RetargetCudaMode(target)):
        yield target

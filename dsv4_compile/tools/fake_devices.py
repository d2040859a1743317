"""Fake tensors on devices this torch build has no runtime for (cuda on a CPU build, xpu without XPU).

Fake tensors of such devices run every dispatcher op, but some hand-written Python bindings of
`torch.Tensor` open a device guard first and fail with "PyTorch is not linked with support for <device>
devices": `t[index]`, `t[index] = v`, `.contiguous()` (when it copies), `.copy_`, `~t`, `.nonzero()`,
`.new_tensor`, and `.to("cuda")` / `.cuda()` without a device index. Within `fake_device_support()` these
methods of the fake tensor classes (FakeTensor, which Dynamo and capture trace with, and FunctionalTensor,
which aot_autograd traces with) retry such a failure with guard-free aten ops (indexing applied the way
torch applies it: ints select first, then slices / None / Ellipsis, then tensor indices) or with device
index 0. Real tensors and every call that does not fail that way are untouched. Dynamo still records the
usual `getitem` / `setitem` / method nodes; only their fake evaluation takes the detour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

_NOT_LINKED = "is not linked with support for"
Fallback = Callable[..., Any]


def _guarded(original: Callable[..., Any], fallback: Fallback) -> Callable[..., Any]:
    """`original`, retried through `fallback(original, self, ...)` when a device guard is missing."""

    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except RuntimeError as exc:
            if _NOT_LINKED not in str(exc):
                raise
        return fallback(original, self, *args, **kwargs)

    method.__name__ = getattr(original, "__name__", "method")
    method.__doc__ = getattr(original, "__doc__", None)
    return method


def _getitem(original: Callable[..., Any], self: torch.Tensor, index: Any) -> torch.Tensor:
    view, advanced = _basic_index(self, index)
    if any(a is not None for a in advanced):
        return torch.ops.aten.index.Tensor(view, _trim(advanced))
    return view


def _setitem(original: Callable[..., Any], self: torch.Tensor, index: Any, value: Any) -> None:
    view, advanced = _basic_index(self, index)
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=view.dtype, device=view.device)
    while value.dim() > view.dim() and value.shape[0] == 1:  # torch drops leading 1-dims of the value
        value = value.squeeze(0)
    if any(a is not None for a in advanced):
        torch.ops.aten.index_put_.default(view, _trim(advanced), value)
    else:
        torch.ops.aten.copy_.default(view, value)


def _contiguous(original: Callable[..., Any], self: torch.Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    return torch.ops.aten.clone.default(self, memory_format=memory_format)


def _copy(original: Callable[..., Any], self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
    return torch.ops.aten.copy_.default(self, src, non_blocking)


def _invert(original: Callable[..., Any], self: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.bitwise_not.default(self)


def _nonzero(original: Callable[..., Any], self: torch.Tensor, *, as_tuple: bool = False) -> Any:
    if as_tuple:
        return tuple(torch.ops.aten.nonzero_numpy.default(self))
    return torch.ops.aten.nonzero.default(self)


def _new_tensor(original: Callable[..., Any], self: torch.Tensor, data: Any, dtype: torch.dtype | None = None,
                device: Any = None, requires_grad: bool = False, **_: Any) -> torch.Tensor:
    return torch.tensor(data, dtype=dtype or self.dtype, device=_indexed(device or self.device),
                        requires_grad=requires_grad)


def _to(original: Callable[..., Any], self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    args = tuple(_indexed(a) for a in args)
    kwargs = {k: _indexed(v) if k == "device" else v for k, v in kwargs.items()}
    return original(self, *args, **kwargs)


def _cuda(original: Callable[..., Any], self: torch.Tensor, device: Any = None, non_blocking: bool = False,
          **kwargs: Any) -> torch.Tensor:
    index = device if isinstance(device, int) else torch.device(device or "cuda").index or 0
    return self.to(torch.device("cuda", index), non_blocking=non_blocking, **kwargs)


def _indexed(value: Any) -> Any:
    """A `cuda` / `xpu` device without an index -> index 0; any other value unchanged."""
    if isinstance(value, str) and value in ("cuda", "xpu"):
        return torch.device(value, 0)
    if isinstance(value, torch.device) and value.type in ("cuda", "xpu") and value.index is None:
        return torch.device(value.type, 0)
    return value


FALLBACKS: dict[str, Fallback] = {
    "__getitem__": _getitem, "__setitem__": _setitem, "contiguous": _contiguous, "copy_": _copy,
    "__invert__": _invert, "nonzero": _nonzero, "new_tensor": _new_tensor, "to": _to, "cuda": _cuda,
}
FAKE_CLASSES = (FakeTensor, FunctionalTensor)


@contextlib.contextmanager
def fake_device_support() -> Iterator[None]:
    """Within the block, the guarded methods work on fake tensors of devices without a runtime."""
    with contextlib.ExitStack() as stack:
        for cls in FAKE_CLASSES:
            for name, fallback in FALLBACKS.items():
                stack.enter_context(mock.patch.object(cls, name, _guarded(getattr(cls, name), fallback)))
        init = getattr(fake_tensor, "init_gpu_context", None)
        if init is not None:  # torch 2.11 makes a real tensor on the fake's device if cuda OR xpu exists
            stack.enter_context(mock.patch.object(fake_tensor, "init_gpu_context", _init_if_present(init)))
        yield


def _init_if_present(init: Callable[[torch.device], None]) -> Callable[[torch.device], None]:
    def init_gpu_context(device: torch.device) -> None:
        backend = getattr(torch, device.type, None)
        if backend is not None and backend.is_available():
            init(device)

    return init_gpu_context


def _consumed_dims(item: Any) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8):
        return item.dim()
    return 1


def _basic_index(t: torch.Tensor, index: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Apply ints, slices, None and Ellipsis as torch does; collect the tensor indices.

    Returns the view and, per dim of the view, the advanced index tensor (or None) aten.index expects.
    """
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() == 0)
           for i in items):
        raise IndexError("indexing a fake tensor with a scalar bool is not supported here")
    if sum(i is Ellipsis for i in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    view, dim, advanced = t, 0, []
    for item in items:
        if item is Ellipsis:
            fill = t.dim() - sum(_consumed_dims(i) for i in items)
            advanced += [None] * fill
            dim += fill
        elif item is None:
            view = torch.ops.aten.unsqueeze.default(view, dim)
            advanced.append(None)
            dim += 1
        elif isinstance(item, slice):
            view = _slice(view, dim, item)
            advanced.append(None)
            dim += 1
        elif isinstance(item, (int, torch.SymInt)):
            view = torch.ops.aten.select.int(view, dim, item)
        else:
            tensor = item if isinstance(item, torch.Tensor) else torch.tensor(item, device=t.device)
            advanced.append(tensor)  # aten.index expands a k-dim mask into k index tensors itself
            dim += _consumed_dims(tensor)
    return view, advanced


def _slice(view: torch.Tensor, dim: int, item: slice) -> torch.Tensor:
    start, stop, step = item.start, item.stop, 1 if item.step is None else item.step
    if start is None and stop is None and step == 1:
        return view
    return torch.ops.aten.slice.Tensor(view, dim, start, stop, step)


def _trim(advanced: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    last = max(i for i, a in enumerate(advanced) if a is not None)
    return advanced[: last + 1]

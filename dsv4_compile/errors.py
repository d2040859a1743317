"""Errors raised by the backend, and how they name the graph node at fault."""

from __future__ import annotations

import torch
import torch.fx


class Dsv4CompileError(RuntimeError):
    """Base class of every error the dsv4_xpu backend raises on purpose."""


class OptionsError(Dsv4CompileError, ValueError):
    """Backend options that are unknown, mistyped or inconsistent."""


class DeviceError(Dsv4CompileError):
    """A target device that is unknown, unavailable, or at odds with the inputs."""


class UnsupportedNodeError(Dsv4CompileError):
    """A graph node the passes cannot rewrite safely (wrong schema, bad buffer, ...)."""

    def __init__(self, node: torch.fx.Node, reason: str) -> None:
        self.node = node
        self.reason = reason
        super().__init__(f"{reason}\n  {describe_node(node)}")


class LoweringContractError(UnsupportedNodeError):
    """A call that the CUDA kernel would reject (wrong buffer shape or dtype, ...), found at rewrite time or by
    the guard emitted where the values were not known then. The message names the node and its source line."""

    def __init__(self, message: str, node: torch.fx.Node | None = None) -> None:
        self.node = node
        self.reason = message
        Dsv4CompileError.__init__(self, message if node is None else f"{message}\n  {describe_node(node)}")


class CudaOnlyNodesError(Dsv4CompileError):
    """The residual-CUDA audit found CUDA-only nodes after all rewrites."""

    def __init__(self, findings: list[tuple[torch.fx.Node, str]], device: str) -> None:
        self.findings = findings
        lines = [f"{len(findings)} CUDA-only node(s) left in the graph for target device '{device}':"]
        lines += [f"  - {describe_node(node)}\n      why: {why}" for node, why in findings]
        lines.append("Register a native lowering (dsv4_compile.native_lowering) or pass strict=False.")
        super().__init__("\n".join(lines))


def node_target_name(node: torch.fx.Node) -> str:
    """A short readable name for what a node calls."""
    from dsv4_compile.lowering.registry import op_qualname

    target = node.target
    if node.op == "call_method":
        return f".{target}()"
    qualname = op_qualname(target)
    if qualname:
        return qualname
    resolved = torch.overrides.resolve_name(target) if callable(target) else None
    return resolved or getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


_NOT_USER_CODE = ("/torch/", "dsv4_compile/frontend/cuda_compat.py")


def user_source_line(node: torch.fx.Node) -> str:
    """The innermost user frame of the node's stack trace, as 'file", line N, in fn: code'.

    Frames of torch itself and of the cuda_compat layer (which Dynamo inlines) are not the user's.
    """
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").strip().splitlines() if ln.strip()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((line.replace("File ", "", 1), code))
    user = [f for f in frames if not any(marker in f[0] for marker in _NOT_USER_CODE)] or frames
    if not user:
        return "<no source line recorded>"
    location, code = user[-1]
    return f"{location}: {code}" if code else location


def describe_node(node: torch.fx.Node) -> str:
    """'name = target(...)  at file:line: code' for error messages."""
    return f"node '{node.name}' ({node.op} {node_target_name(node)}) at {user_source_line(node)}"

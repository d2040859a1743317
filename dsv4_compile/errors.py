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


class CudaOnlyNodesError(Dsv4CompileError):
    """The residual-CUDA audit found CUDA-only nodes after all rewrites."""

    def __init__(self, findings: list[tuple[torch.fx.Node, str]], device: str) -> None:
        self.findings = findings
        lines = [f"{len(findings)} CUDA-only node(s) left in the graph for target device '{device}':"]
        lines += [f"  - {describe_node(node)}\n      why: {why}" for node, why in findings]
        lines.append("Register a native lowering (dsv4_compile.registry.native_lowering) or pass strict=False.")
        super().__init__("\n".join(lines))


def node_target_name(node: torch.fx.Node) -> str:
    """A short readable name for what a node calls."""
    from dsv4_compile.registry import op_qualname

    target = node.target
    if node.op == "call_method":
        return f".{target}()"
    qualname = op_qualname(target)
    if qualname:
        return qualname
    resolved = torch.overrides.resolve_name(target) if callable(target) else None
    return resolved or getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def user_source_line(node: torch.fx.Node) -> str:
    """The innermost user frame of the node's stack trace, as 'file:line: code'."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # Dynamo stack traces alternate 'File "...", line N, in fn' and the code line.
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].startswith("File "):
            code = frames[i + 1] if i + 1 < len(frames) and not frames[i + 1].startswith("File ") else ""
            location = frames[i].replace("File ", "", 1)
            return f"{location}: {code}" if code else location
    return "<no source line recorded>"


def describe_node(node: torch.fx.Node) -> str:
    """'name = target(...)  at file:line: code' for error messages."""
    return f"node '{node.name}' ({node.op} {node_target_name(node)}) at {user_source_line(node)}"

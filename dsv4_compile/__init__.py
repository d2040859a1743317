"""dsv4_compile: a torch.compile backend that rewrites CUDA-oriented DeepSeek-V4 graphs for XPU (or CPU).

    model = dsv4_compile.compile(model, device="xpu")         # or torch.compile(model, backend="dsv4_xpu")
    print(dsv4_compile.last_report())

The flow, as the folders show it: frontend/ (before the graph exists: cuda_compat, capture, compile) ->
lowering/ (backend, pipeline, registry + lowerings, passes, audit) -> Inductor; tools/ around it.
"""

from dsv4_compile.errors import (
    CudaOnlyNodesError,
    DeviceError,
    Dsv4CompileError,
    LoweringContractError,
    OptionsError,
    UnsupportedNodeError,
)
from dsv4_compile.frontend import ops as _ops  # noqa: F401 - defines _C::silu_and_mul_with_clamp when missing
from dsv4_compile.frontend.api import CompiledModel, compile
from dsv4_compile.frontend.capture import CaptureError, capture, rewrite
from dsv4_compile.frontend.cuda_compat import cuda_compat
from dsv4_compile.lowering.backend import dsv4_xpu
from dsv4_compile.lowering.kernel_providers import kernel_provider
from dsv4_compile.lowering.options import BackendOptions
from dsv4_compile.lowering.pipeline import PASSES, run_pipeline
from dsv4_compile.lowering.registry import native_lowering, triton_fallback
from dsv4_compile.lowering.report import RewriteReport, all_reports, last_report
from dsv4_compile.tools.codegen import CodegenResult, CudaOnlyCodeError, codegen
from dsv4_compile.tools.diff import DiffRecorder, PassDiff


def _register_backend_name() -> None:
    """`backend="dsv4_xpu"` from a source checkout: an installed package names the backend through its
    torch_dynamo_backends entry point, which torch loads itself (registering here as well would make torch's
    own registration of the entry point a duplicate), so the name is registered here only when no entry point
    offers it."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "dsv4_xpu" in _COMPILER_FNS or entry_points(group="torch_dynamo_backends", name="dsv4_xpu"):
        return
    register_backend(dsv4_xpu, name="dsv4_xpu")


_register_backend_name()

__all__ = [
    "PASSES",
    "BackendOptions",
    "CaptureError",
    "CodegenResult",
    "CompiledModel",
    "CudaOnlyCodeError",
    "CudaOnlyNodesError",
    "DeviceError",
    "DiffRecorder",
    "Dsv4CompileError",
    "LoweringContractError",
    "OptionsError",
    "PassDiff",
    "RewriteReport",
    "UnsupportedNodeError",
    "all_reports",
    "capture",
    "codegen",
    "compile",
    "cuda_compat",
    "dsv4_xpu",
    "kernel_provider",
    "last_report",
    "native_lowering",
    "rewrite",
    "run_pipeline",
    "triton_fallback",
]

"""dsv4_compile: a torch.compile backend that rewrites CUDA-oriented DeepSeek-V4 graphs for XPU (or CPU).

    model = dsv4_compile.compile(model, device="xpu")         # or torch.compile(model, backend="dsv4_xpu")
    print(dsv4_compile.last_report())
"""

from dsv4_compile import ops as _ops  # noqa: F401 - defines _C::silu_and_mul_with_clamp when missing
from dsv4_compile.api import CompiledModel, compile
from dsv4_compile.backend import dsv4_xpu
from dsv4_compile.capture import CaptureError, capture, rewrite
from dsv4_compile.codegen import CodegenResult, CudaOnlyCodeError, codegen
from dsv4_compile.compat import cuda_compat
from dsv4_compile.diff import DiffRecorder, PassDiff
from dsv4_compile.errors import (
    CudaOnlyNodesError,
    DeviceError,
    Dsv4CompileError,
    OptionsError,
    UnsupportedNodeError,
)
from dsv4_compile.options import BackendOptions
from dsv4_compile.pipeline import PASSES, RewriteReport, all_reports, last_report, run_pipeline

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
    "last_report",
    "rewrite",
    "run_pipeline",
]

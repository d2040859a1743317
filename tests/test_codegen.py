"""codegen(): Inductor's wrapper and Triton kernels for XPU (and CUDA) on a machine with neither, with every
patch undone afterwards, and loud failure when the code for a non-CUDA device still calls CUDA-only code."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.device_interface import CudaInterface, XpuInterface

import dsv4_compile
from dsv4_compile import CudaOnlyCodeError, capture, codegen
from dsv4_compile.tools.codegen import find_cuda_only_code
from tests.blocks import CudaOrientedBlock


def _block() -> CudaOrientedBlock:
    with dsv4_compile.cuda_compat("cuda" if torch.cuda.is_available() else "cpu"):  # real streams on CUDA
        return CudaOrientedBlock(hidden=32, intermediate=64, seed=0)


def _patchable_state() -> dict[str, object]:
    from torch._inductor import scheduler
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    state = {f"{cls.__name__}.{name}": cls.__dict__.get(name) for cls in (XpuInterface, CudaInterface)
             for name in ("is_available", "get_device_properties", "get_compute_capability", "current_device")}
    state |= {f"Worker.{cls.__name__}.{name}": cls.Worker.__dict__.get(name)
              for cls in (XpuInterface, CudaInterface) for name in ("get_device_properties", "current_device")}
    state |= {f"torch.{m}.{name}": getattr(getattr(torch, m), name) for m in ("xpu", "cuda")
              for name in ("get_device_properties", "get_device_capability", "current_device", "is_available")}
    state |= {f"{cls.__name__}.{name}": cls.__dict__.get(name) for cls in (FakeTensor, FunctionalTensor)
              for name in ("__getitem__", "__setitem__", "contiguous", "copy_", "to")}
    state["init_gpu_context"] = torch._subclasses.fake_tensor.init_gpu_context
    state["has_triton"] = scheduler.has_triton
    state["triton_hash_with_backend"] = torch.utils._triton.triton_hash_with_backend
    return state


def test_xpu_codegen_of_the_demo_block_without_xpu():
    before = _patchable_state()
    result = codegen(_block(), (torch.randn(5, 32),), device="xpu")
    assert result.device == "xpu:0"
    assert result.kernel_count > 0
    assert all("@triton.jit" in src and "def " + name in src for name, src in result.kernels.items())
    assert find_cuda_only_code(result.source) == [] and result.findings == ()
    assert "torch.xpu._DeviceGuard" in result.wrapper and "device_str='xpu'" in result.wrapper
    assert "empty_strided_xpu(" in result.wrapper
    assert result.report["activation"].changed == 1 and result.report["audit"].matched == 0
    assert "silu_and_mul_with_clamp_native" in result.graph and "xpu" in result.aten_graph
    # every patch is undone
    assert _patchable_state() == before
    assert XpuInterface.is_available() is torch.xpu.is_available() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks codegen for cuda on a machine without a GPU")
def test_cuda_codegen_without_gpu():
    before = _patchable_state()
    result = codegen(_block(), (torch.randn(5, 32),), device="cuda")
    assert result.device == "cuda:0" and result.kernel_count > 0
    assert "empty_strided_cuda(" in result.wrapper and "device_str='cuda'" in result.wrapper
    # CUDA mentions are expected (and reported) for cuda; the rewritten CUDA-only constructs are gone
    assert result.findings and {f.why for f in result.findings} <= {
        "torch.cuda API", "CUDA stream handle", "CUDA allocation", "cuda device"}
    assert _patchable_state() == before
    assert CudaInterface.is_available() is False


def test_codegen_of_a_captured_graph_uses_its_inputs(tmp_path):
    gm = capture(_block(), torch.randn(7, 32))
    code = gm.code
    result = codegen(gm, device="xpu")
    assert gm.code == code
    assert "(7, 32)" in result.wrapper
    files = {p.relative_to(tmp_path).as_posix() for p in result.write(tmp_path)}
    assert {"wrapper.py", "graph.py", "aten_graph.py", "report.txt"} <= files
    assert {f"kernels/{name}.py" for name in result.kernels} <= files


def test_code_still_calling_cuda_only_things_is_rejected():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the audit's own warning (strict=False)
        with pytest.raises(CudaOnlyCodeError, match=r"streams\.record_event.*stream op"):
            codegen(_block(), (torch.randn(5, 32),), device="xpu", strict=False, disable=("aux_streams",))


@pytest.mark.parametrize(("line", "why"), [
    ("    torch.cuda.synchronize()", "torch.cuda API"),
    ("    triton_meta={'device': 0, 'launch_pdl': True},", "programmatic dependent launch"),
    ("    torch.ops._C.silu_and_mul_with_clamp.default(buf1, buf0, 10.0)",
     "CUDA-only custom op _C::silu_and_mul_with_clamp (it has a native lowering)"),
    ("    _C.silu_and_mul_with_clamp(buf1, buf0, 10.0)",
     "CUDA-only custom op _C::silu_and_mul_with_clamp (it has a native lowering)"),
    ("    torch.ops.dsv4_cuda.mhc_pre.default(buf2, buf3)",
     "CUDA-only custom op dsv4_cuda::mhc_pre (it has a native lowering)"),
    ("    torch.ops.no_such_ns.op.default(buf0)", "custom op no_such_ns::op has no xpu kernel"),
    ("    torch.ops.streams.fork.default(0, 1)", "stream op"),
    ("    buf0 = empty_strided_cuda((4, ), (1, ), torch.float32)", "CUDA allocation"),
    ("''', device_str='cuda')", "cuda device"),
    ("    y = tl.inline_asm_elementwise(asm='cvt.rn.bf16x2.f32 $0, $2, $1;', constraints='=r,r,r', args=[a, b],",
     "inline assembly (PTX)"),
])
def test_cuda_only_patterns(line, why):
    assert [f.why for f in find_cuda_only_code(line)] == [why]


def test_cuda_only_patterns_ignore_comments_and_xpu_code():
    code = "\n".join([
        "# torch.cuda.synchronize() in a comment",
        "empty_strided_cuda = torch._C._dynamo.guards._empty_strided_cuda",
        "from torch._C import _xpu_getCurrentRawStream as get_raw_stream",
        "triton_meta={'launch_pdl': False}",
        "with torch.xpu._DeviceGuard(0):",
    ])
    assert find_cuda_only_code(code) == []


def test_codegen_rejects_other_devices():
    with pytest.raises(dsv4_compile.DeviceError, match="codegen supports"):
        codegen(_block(), (torch.randn(5, 32),), device="cpu")

"""The residual-CUDA audit and the trace-time kernel-wrapper substitution on vLLM's real modules.

vLLM registers its Python kernel wrappers as `vllm::` ops under the platform's dispatch key, so on this CPU build
`vllm::mhc_pre_aiter` reports a CPU kernel (one that needs ROCm's AITER): the audit must still refuse it. The
NVIDIA model imports its tilelang wrappers by name; inside `cuda_compat` they must be the registered ops, and
outside exactly vLLM's functions again.
"""

from __future__ import annotations

import pytest
import torch

import dsv4_compile
from dsv4_compile import CudaOnlyNodesError
from dsv4_compile.frontend.cuda_compat import cuda_compat
from tests.test_hardening import cause

M, H = 4, 32


def mhc_pre_aiter_call(residual, fn, scale, base):
    post, comb, x = torch.ops.vllm.mhc_pre_aiter(residual, fn, scale, base, 1e-6, 1e-6, 1e-6, 2.0, 3)
    return x + 1, post, comb


def mhc_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(5, M, H, generator=gen, dtype=torch.bfloat16), torch.randn(M * (M + 2), M * H, generator=gen),
            torch.rand(3, generator=gen), torch.randn(M * (M + 2), generator=gen))


def test_a_vllm_op_left_without_a_lowering_fails_the_strict_audit():
    import vllm.model_executor.kernels.mhc.aiter  # noqa: F401 - registers vllm::mhc_pre_aiter

    from dsv4_compile.lowering.registry import LOWERINGS

    assert "vllm::mhc_pre_aiter" not in LOWERINGS  # deliberately uncovered: AMD's variant
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vllm::mhc_pre_aiter", "CPU")  # it claims a CPU kernel
    compiled = torch.compile(mhc_pre_aiter_call, backend="dsv4_xpu", options={"strict": True})
    with pytest.raises(Exception) as caught:
        compiled(*mhc_inputs())
    message = str(cause(caught.value, CudaOnlyNodesError))
    assert "vllm::mhc_pre_aiter" in message and "AITER" in message
    assert "test_vllm_audit_and_wrappers.py" in message  # the user's line


def test_the_nvidia_models_tilelang_wrappers_are_ops_inside_cuda_compat_only():
    import vllm.model_executor.kernels.mhc.tilelang as tilelang
    import vllm.models.deepseek_v4.nvidia.model as nvidia_model

    original = nvidia_model.mhc_pre_tilelang
    assert original is tilelang.mhc_pre_tilelang
    with cuda_compat("cpu"):
        swapped = nvidia_model.mhc_pre_tilelang
        assert swapped is not original and tilelang.mhc_pre_tilelang is swapped
        assert swapped.__name__ == "mhc_pre_tilelang_as_op"
    assert nvidia_model.mhc_pre_tilelang is original and tilelang.mhc_pre_tilelang is original


def test_cuda_compat_changes_nothing_for_a_cuda_target():
    import vllm.models.deepseek_v4.nvidia.model as nvidia_model

    original = nvidia_model.mhc_pre_tilelang
    with cuda_compat("cuda"):
        assert nvidia_model.mhc_pre_tilelang is original


def test_the_missing_cuda_ops_are_defined_with_vllms_schemas():
    from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops

    defined = ensure_vllm_ops()
    assert "vllm::mhc_pre_tilelang" not in defined  # vLLM registers it itself
    for qualname in defined:
        namespace, name = qualname.split("::")
        assert hasattr(getattr(torch.ops, namespace), name)
    assert dsv4_compile.native_lowering  # the registry is importable alongside


def test_a_call_of_the_nvidia_models_wrapper_compiles_through_the_backend():
    """The NVIDIA model calls `mhc_pre_tilelang` as a Python function (tilelang on CPU: ImportError); under
    cuda_compat the trace records the op, which the backend lowers. Oracle: vLLM's torch reference."""
    import vllm.models.deepseek_v4.nvidia.model as nvidia_model
    from vllm.model_executor.kernels.mhc.torch import mhc_pre_torch

    def pre(residual, fn, scale, base):
        return nvidia_model.mhc_pre_tilelang(residual, fn, scale, base, 1e-6, 1e-3, 1e-2, 2.0, 3)

    args = mhc_inputs()
    with pytest.raises(ImportError):
        pre(*args)
    compiled = torch.compile(pre, backend="dsv4_xpu", fullgraph=True)
    with cuda_compat("cpu"):
        post, comb, x = compiled(*args)
    want_post, want_comb, want_x = mhc_pre_torch(*args, 1e-6, 1e-3, 1e-2, 2.0, 3)
    torch.testing.assert_close(post, want_post, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comb, want_comb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.float(), want_x.float(), rtol=2 ** -7, atol=1e-2)
    report = dsv4_compile.last_report()
    assert report["mhc"].changed == 1 and report["audit"].matched == 0

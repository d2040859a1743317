"""cuda_compat without vLLM: Parameter subclasses under Dynamo and the mode, stream capture, mm out_dtype."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsv4_compile.frontend.cuda_compat import cuda_compat, has_out_dtype_matmul


class DeferringParameter(torch.nn.Parameter):
    """Like vLLM's BasevLLMParameter: a __torch_function__ that only defers to Tensor's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def weight_reads(x, w):
    return torch.mm(x, w.T) * w.shape[0] + w.data.sum() + w.T.contiguous().sum(0)[: x.shape[1]].sum()


def subclass_variable_getattr():
    from torch._dynamo.variables.torch_function import TensorWithTFOverrideVariable

    return TensorWithTFOverrideVariable.var_getattr


def test_parameter_subclass_attribute_reads_compile_under_cuda_compat():
    w = DeferringParameter(torch.randn(4, 3), requires_grad=False)
    x = torch.randn(2, 3)
    eager = weight_reads(x, w)
    with cuda_compat("cpu"):
        compiled = torch.compile(weight_reads, backend="eager", fullgraph=True)(x, w)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_reproducer_recurses_in_dynamo_without_the_patch():
    """The bug the patch works around; when torch fixes it this skips and the patch can go."""
    w = DeferringParameter(torch.randn(4, 3), requires_grad=False)
    try:
        with PassThrough():
            torch.compile(lambda x: torch.mm(x, w.T), backend="eager", fullgraph=True)(torch.randn(2, 3))
    except Exception as exc:  # Dynamo wraps it in InternalTorchDynamoError
        assert "RecursionError" in f"{type(exc).__name__} {exc}" or isinstance(exc.__cause__, RecursionError)
    else:
        pytest.skip("this torch's Dynamo no longer recurses: the subclass getattr patch is no longer needed")


def test_subclass_getattr_patch_is_installed_only_inside_the_block():
    original = subclass_variable_getattr()
    with cuda_compat("cpu"):
        assert subclass_variable_getattr() is not original
    assert subclass_variable_getattr() is original


def test_custom_subclass_attributes_still_trace():
    class Tagged(DeferringParameter):
        scale = 3.0

    w = Tagged(torch.randn(4, 3), requires_grad=False)
    x = torch.randn(2, 3)
    with cuda_compat("cpu"):
        compiled = torch.compile(lambda x: torch.mm(x, w.T) * w.scale, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, (x @ w.detach().T) * 3.0, rtol=0, atol=0)


def capture_flag(x):
    return x + 1 if torch.cuda.is_current_stream_capturing() else x - 1


def test_no_stream_is_ever_capturing_eagerly_and_compiled():
    original = torch.cuda.is_current_stream_capturing
    x = torch.randn(3)
    with cuda_compat("cpu"):
        assert torch.cuda.is_current_stream_capturing() is False
        compiled = torch.compile(capture_flag, backend="dsv4_xpu", fullgraph=True)(x)
    torch.testing.assert_close(compiled, x - 1, rtol=0, atol=0)
    assert torch.cuda.is_current_stream_capturing is original


def fp64_matmul(a, b):
    return torch.matmul(a.double(), b.double())


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_mm_out_dtype_multiplies_in_out_dtype_eagerly(input_dtype):
    a = torch.randn(5, 64).to(input_dtype)
    b = torch.randn(64, 7).to(input_dtype)
    with cuda_compat("cpu"):
        keyword = torch.mm(a, b, out_dtype=torch.float32)
        positional = torch.mm(a, b, torch.float32)
        batched = torch.bmm(a[None], b[None], out_dtype=torch.float32)
    for out in (keyword, positional, batched[0]):
        assert out.dtype == torch.float32
        # fp32 accumulation of 64 exact products: far below one bf16 ulp of the result (~3e-2 here)
        torch.testing.assert_close(out.double(), fp64_matmul(a, b), rtol=1e-5, atol=1e-4)


def mm_fp32(x, w):
    return torch.mm(x, w.T, out_dtype=torch.float32)


@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_mm_out_dtype_compiles_for_cpu(tokens):
    x = torch.randn(tokens, 128).bfloat16()
    w = DeferringParameter(torch.randn(16, 128).bfloat16(), requires_grad=False)
    with cuda_compat("cpu"):
        out = torch.compile(mm_fp32, backend="dsv4_xpu", fullgraph=True)(x, w)
    assert out.dtype == torch.float32 and out.shape == (tokens, 16)
    torch.testing.assert_close(out.double(), fp64_matmul(x, w.detach().T), rtol=1e-5, atol=2e-4)


@pytest.mark.skipif(has_out_dtype_matmul("cpu"), reason="this torch has a CPU kernel for aten::mm.dtype")
def test_mm_out_dtype_has_no_cpu_kernel_outside_the_block():
    with pytest.raises(NotImplementedError):
        torch.mm(torch.randn(2, 3).bfloat16(), torch.randn(3, 2).bfloat16(), out_dtype=torch.float32)


def bmm_into_transposed_view(a, b):
    # vLLM's o_proj (nvidia/ops/o_proj.py): the grouped GEMM writes through a transposed view of its output
    z = torch.empty(a.shape[1], a.shape[0], b.shape[2], dtype=a.dtype)
    torch.bmm(a, b, out=z.transpose(0, 1))
    return z * 2


def test_non_contiguous_out_traces_as_one_graph_with_the_eager_result():
    a, b = torch.randn(3, 5, 8), torch.randn(3, 8, 4)
    expected = torch.einsum("gtk,gkn->tgn", a.double(), b.double()) * 2  # z[t, g] = a[g, t] @ b[g]
    explained = torch._dynamo.explain(bmm_into_transposed_view)(a, b)
    assert explained.graph_break_count == 1, "without the mode, Dynamo breaks at the non-contiguous out="
    torch._dynamo.reset()
    with cuda_compat("cpu"):
        explained = torch._dynamo.explain(bmm_into_transposed_view)(a, b)
        out = torch.compile(bmm_into_transposed_view, backend="dsv4_xpu", fullgraph=True)(a, b)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)

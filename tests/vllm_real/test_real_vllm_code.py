"""dsv4_xpu on vLLM's real code: its layers, its stream helpers and its ops, imported from the installed vLLM.

Each result is checked against something the backend does not produce: vLLM's own torch reference
(`forward_native`), the same functions run one after the other, or the dispatcher's kernel table.
vLLM is imported inside the tests (conftest.py imports it first and skips or fails the tests without it).
"""

from __future__ import annotations

import pytest
import torch

import dsv4_compile
from dsv4_compile.lowering.passes.audit import find_cuda_only_nodes
from dsv4_compile.lowering.registry import LOWERINGS, op_qualname
from tests.conftest import reports_since

# --- a. SiluAndMulWithClamp.forward_cuda ----------------------------------------------------------------------

SILU_CLAMP = "_C::silu_and_mul_with_clamp"
# The schema of vLLM's CUDA build (0.32.0, _C_stable_libtorch), which its forward_cuda calls positionally.
SILU_CLAMP_CUDA_SCHEMA = ("_C::silu_and_mul_with_clamp(Tensor! result, Tensor input, float limit, "
                          "float alpha=1.0, float beta=0.0) -> ()")
LIMIT = 7.0


def _signature(schema: torch._C.FunctionSchema) -> list[tuple]:
    """Names, types, defaults and mutation of a schema's arguments and returns (alias set names aside)."""
    return [(a.name, str(a.type), a.default_value, bool(a.alias_info and a.alias_info.is_write))
            for a in (*schema.arguments, *schema.returns)]


@pytest.fixture
def silu_clamp_cuda_layer(vllm_config, monkeypatch):
    """vLLM's SiluAndMulWithClamp as it is built on CUDA: its __init__ binds `self.op` (the fused CUDA op) only
    where the platform is CUDA-alike, so the CPU platform answers yes while the layer is made."""
    from vllm.model_executor.layers.activation import SiluAndMulWithClamp
    from vllm.platforms import current_platform

    def make(alpha: float, beta: float):
        with monkeypatch.context() as patch:
            patch.setattr(current_platform, "is_cuda_alike", lambda: True)
            layer = SiluAndMulWithClamp(LIMIT, alpha=alpha, beta=beta)
        assert layer.op is torch.ops._C.silu_and_mul_with_clamp
        return layer

    return make


def test_silu_and_mul_with_clamp_is_defined_with_the_cuda_schema_and_no_cpu_kernel():
    # vLLM 0.32.0's CPU `_C` does not define the op; dsv4_compile.frontend.ops defines it then. Either way the
    # schema must be the CUDA build's (forward_cuda passes its arguments by position) and there is no CPU
    # kernel, so nothing but the backend's lowering can make forward_cuda run here.
    op = torch.ops._C.silu_and_mul_with_clamp.default
    assert _signature(op._schema) == _signature(torch._C.parse_schema(SILU_CLAMP_CUDA_SCHEMA))
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(SILU_CLAMP, "CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (1.702, 1.0)], ids=["silu", "swiglu_oai"])
def test_silu_and_mul_with_clamp_forward_cuda_matches_forward_native(silu_clamp_cuda_layer, dtype, alpha, beta):
    layer = silu_clamp_cuda_layer(alpha, beta)
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    d = x.shape[-1] // 2
    assert (x[..., :d] > LIMIT).any() and (x[..., d:].abs() > LIMIT).any()  # both clamps are exercised

    with pytest.raises(NotImplementedError, match="silu_and_mul_with_clamp"):
        layer.forward_cuda(x)  # eagerly the CUDA path has no kernel on CPU

    before = dsv4_compile.all_reports()
    out = torch.compile(layer.forward_cuda, backend="dsv4_xpu", fullgraph=True)(x)
    (report,) = reports_since(before)
    assert report["activation"].changed == 1
    assert report["audit"].matched == 0

    # The oracle is vLLM's torch reference evaluated in float64: its own bf16 evaluation rounds every
    # intermediate (`up + beta` too) and is itself up to ~30 bf16 ulps off with beta=1, while the fused kernel
    # computes in float32 and rounds only after the activation and after the product: within 2 ulps.
    expected = layer.forward_native(x.double())
    assert out.shape == expected.shape == (2, 5, d) and out.dtype == dtype
    rtol = 2**-6 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-6)


# --- b. vllm.utils.multi_stream_utils ----------------------------------------------------------------------------


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 16, generator=generator), torch.randn(16, 16, generator=generator)


def _maybe_execute_in_parallel(streams):
    from vllm.utils.multi_stream_utils import maybe_execute_in_parallel

    aux, event0, event1 = streams.Stream(), streams.Event(), streams.Event()

    def fn(x, w):
        main, side = maybe_execute_in_parallel(lambda: x @ w, lambda: torch.sin(x) * 3, event0, event1, aux)
        return main + side

    def serial(x, w):
        return x @ w + torch.sin(x) * 3

    return fn, serial


def _execute_in_parallel(default_first: bool):
    def build(streams):
        from vllm.utils.multi_stream_utils import execute_in_parallel

        aux = [streams.Stream() for _ in range(3)]
        start, done = streams.Event(), [streams.Event() for _ in range(3)]

        def fn(x, w):
            main, (a, skipped, b) = execute_in_parallel(
                lambda: x @ w, [lambda: x.cos(), None, lambda: x.exp() - 1], start, done, aux,
                enable=True, default_first=default_first)
            assert skipped is None
            return main * a + b

        def serial(x, w):
            return (x @ w) * x.cos() + (x.exp() - 1)

        return fn, serial

    return build


@pytest.mark.parametrize(
    "build",
    [_maybe_execute_in_parallel, _execute_in_parallel(default_first=False), _execute_in_parallel(default_first=True)],
    ids=["maybe_execute_in_parallel", "execute_in_parallel", "execute_in_parallel_default_first"],
)
def test_vllm_stream_helpers_lose_every_stream_node_and_keep_the_numbers(build):
    x, w = _inputs()
    with dsv4_compile.cuda_compat("cpu"):
        fn, serial = build(torch.cuda)  # torch.cuda.Stream/Event here are cuda_compat's CPU stand-ins
        before = dsv4_compile.all_reports()
        out = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(x, w)
    (report,) = reports_since(before)
    # The traced graph held the helper's fork/join (event record/wait, work tagged to the aux streams) ...
    assert report["stream ops"].changed > 0 and report["stream tags"].changed > 0
    # ... and every node of it was removed: the strict audit, which flags any stream op or tag, found none.
    assert report["aux_streams"].changed == report["aux_streams"].matched > 0
    assert report["audit"].matched == 0
    torch.testing.assert_close(out, serial(x, w))


# --- c. the audit on vLLM's own ops --------------------------------------------------------------------------------


def _mhc_post_inputs() -> tuple[torch.Tensor, ...]:
    tokens, hc_mult, hidden = 3, 4, 64
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(tokens, hidden, generator=generator).bfloat16(),
            torch.randn(tokens, hc_mult, hidden, generator=generator).bfloat16(),
            torch.rand(tokens, hc_mult, 1, generator=generator),
            torch.rand(tokens, hc_mult, hc_mult, generator=generator))


def test_the_cuda_path_of_vllms_mhc_post_is_lowered_for_xpu(vllm_config):
    """MHCPostOp.forward_cuda calls `vllm::mhc_post_tilelang`, a Python op vLLM registers under the platform's
    key (so on this CPU build it "has" a CPU kernel, which needs TileLang): the backend lowers it for xpu and
    the result is vLLM's own `forward_native`."""
    from vllm.model_executor.layers.mhc import MHCPostOp

    layer = MHCPostOp()
    gm = dsv4_compile.capture(layer.forward_cuda, *_mhc_post_inputs(), as_device="cuda")
    before = [op_qualname(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert before.count("vllm::mhc_post_tilelang") == 1
    with pytest.raises(ImportError, match="tilelang"):
        torch.ops.vllm.mhc_post_tilelang(*_mhc_post_inputs())

    report = dsv4_compile.run_pipeline(gm, torch.device("xpu"))
    assert report["mhc"].changed == 1 and report["audit"].matched == 0
    assert "vllm::mhc_post_tilelang" not in [op_qualname(n.target) for n in gm.graph.nodes]
    # the rewritten graph still carries the capture's fake devices; run it on CPU tensors
    captured = dsv4_compile.capture(layer.forward_cuda, *_mhc_post_inputs(), as_device="cpu")
    dsv4_compile.run_pipeline(captured, torch.device("cpu"))
    (got,) = captured(*_mhc_post_inputs())  # a captured graph returns a tuple
    torch.testing.assert_close(got, layer.forward_native(*_mhc_post_inputs()), rtol=2 ** -7, atol=1e-2)


def test_audit_reports_vllms_cpu_kernel_for_an_xpu_target(vllm_config):
    """MHCPostOp.forward_cpu calls `_C::hc_post_fused_cpu`, a C++ kernel of vLLM's CPU build: right for cpu,
    no kernel for xpu, and no lowering (it is no CUDA op): the audit names it for xpu and passes it for cpu."""
    from vllm.model_executor.layers.mhc import MHCPostOp

    qualname = "_C::hc_post_fused_cpu"
    if not hasattr(torch.ops._C, "hc_post_fused_cpu"):
        # vLLM loads its full `_C` (with the DeepSeek-V4 CPU ops) only on CPUs with AVX512-BF16; elsewhere it
        # loads `_C_AVX512` or `_C_AVX2`, which lack them.
        pytest.skip(f"{qualname} is not in the kernel library vLLM loaded on this CPU")
    assert qualname not in LOWERINGS
    gm = dsv4_compile.capture(MHCPostOp().forward_cpu, *_mhc_post_inputs(), as_device="cpu")
    findings = find_cuda_only_nodes(gm, torch.device("xpu"))
    assert [why for _, why in findings] == [f"{qualname} has no xpu kernel and no native lowering is registered"]
    with pytest.raises(dsv4_compile.CudaOnlyNodesError, match=f"{qualname} has no xpu kernel"):
        dsv4_compile.run_pipeline(gm, torch.device("xpu"))
    assert find_cuda_only_nodes(gm, torch.device("cpu")) == []

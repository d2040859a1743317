"""Kernel providers (lowering/kernel_providers.py): which implementation a registered op's call gets.

The subject is the clamped SwiGLU, with providers registered here around kernels of a test library: a kernel
that counts its calls, so each test sees which implementation ran; results are checked against the fp64
formula of tests/lowerings/test_activation.py. vLLM's real CPU providers are compared with the native math where
vLLM's AVX-512 BF16 library loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch

import dsv4_compile
from dsv4_compile.errors import OptionsError
from dsv4_compile.lowering.kernel_providers import PROVIDERS, choose, kernel_loaded, kernel_provider
from dsv4_compile.lowering.options import BackendOptions
from dsv4_compile.lowering.registry import LOWERINGS
from tests.conftest import lower_graph_testing, op_counts
from tests.lowerings.test_activation import formula

OP = "_C::silu_and_mul_with_clamp"
CALLS = {"swiglu": 0}
_lib = torch.library.Library("dsv4_provider_test", "DEF")
_lib.define("swiglu(Tensor x, float limit) -> Tensor")
_lib.define("swiglu_xpu_only(Tensor x, float limit) -> Tensor")


def _swiglu_kernel(x: torch.Tensor, limit: float) -> torch.Tensor:
    CALLS["swiglu"] += 1
    return formula(x, limit, rounded_to=x.dtype)


_lib.impl("swiglu", _swiglu_kernel, "CPU")
_lib.impl("swiglu_xpu_only", _swiglu_kernel, "XPU")


def _library_swiglu(limit: float, alpha: float = 1.0, beta: float = 0.0, **tensors: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsv4_provider_test.swiglu(tensors["input"], limit)


def _lower_priority_ran(**_: object) -> torch.Tensor:
    raise RuntimeError("the lower priority ran")


def _refuse_beta(beta: float = 0.0, **_: object) -> str | None:
    return None if beta == 0.0 else "the test kernel has no beta"


@pytest.fixture
def providers(monkeypatch):
    """Register test providers of the SwiGLU for this test only: `providers(name, **kernel_provider kwargs)`."""
    monkeypatch.setitem(PROVIDERS, OP, [])

    def register(name: str = "test-lib", kernel: str = "dsv4_provider_test::swiglu", **kwargs):
        implementation = kwargs.pop("implementation", None) or (lambda **a: _library_swiglu(**a))
        kernel_provider(OP, name=name, device=kwargs.pop("device", "cpu"), kernel=kernel, **kwargs)(implementation)

    return register


def swiglu(x, limit):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops._C.silu_and_mul_with_clamp(out, x, limit)
    return out


def compiled_swiglu(x, limit=6.0, **options):
    CALLS["swiglu"] = 0
    torch._dynamo.reset()
    with dsv4_compile.cuda_compat("cpu"):
        out = torch.compile(swiglu, backend="dsv4_xpu", options={"inductor": False, **options})(x, limit)
    return out, CALLS["swiglu"], dsv4_compile.last_report()


X = torch.randn(8, 32) * 4


def test_a_loaded_tested_provider_is_the_default_and_the_report_names_it(providers):
    providers(priority=5)
    out, calls, report = compiled_swiglu(X)
    assert calls == 1 and report.kernels == {OP: "test-lib (dsv4_provider_test::swiglu)"}
    assert "kernels:\n  _C::silu_and_mul_with_clamp: test-lib" in str(report)
    torch.testing.assert_close(out.double(), formula(X, 6.0, rounded_to=X.dtype).double())


@pytest.mark.parametrize("key", [OP, "activation", "*"])
def test_the_option_keeps_the_native_math_by_op_family_or_everywhere(providers, key):
    providers()
    out, calls, report = compiled_swiglu(X, providers={key: "native"})
    assert calls == 0 and report.kernels == {OP: "native"}
    torch.testing.assert_close(out.double(), formula(X, 6.0, rounded_to=X.dtype).double(), atol=1e-5, rtol=1e-5)


def test_without_providers_the_native_math_runs_and_the_report_says_native():
    _, calls, report = compiled_swiglu(X)
    assert calls == 0 and report.kernels == {OP: "native"}
    lowered = lower_graph_testing(swiglu, X, 6.0, expected_after=["silu_and_mul_with_clamp_native"])
    assert lowered.report.kernels == {OP: "native"}


def test_highest_priority_wins_and_the_option_picks_another(providers):
    providers("slow-lib", priority=1, implementation=_lower_priority_ran)
    providers("fast-lib", priority=9)
    _, calls, report = compiled_swiglu(X)
    assert calls == 1 and report.kernels[OP].startswith("fast-lib")
    providers_order = [p.name for p in PROVIDERS[OP]]
    assert providers_order == ["fast-lib", "slow-lib"]
    with pytest.raises(Exception, match="the lower priority ran"):
        compiled_swiglu(X, providers={OP: "slow-lib"})


def test_a_kernel_not_loaded_leaves_the_native_math_and_cannot_be_forced(providers):
    providers(kernel="dsv4_provider_test::absent")
    _, calls, report = compiled_swiglu(X)
    assert calls == 0 and report.kernels == {OP: "native"}
    with pytest.raises(Exception, match=r"dsv4_provider_test::absent is not loaded[\s\S]*swiglu"):
        compiled_swiglu(X, providers={OP: "test-lib"})


def test_a_kernel_of_another_device_is_not_loaded_for_cpu(providers):
    assert kernel_loaded("dsv4_provider_test::swiglu_xpu_only", "xpu")
    assert not kernel_loaded("dsv4_provider_test::swiglu_xpu_only", "cpu")
    providers(kernel="dsv4_provider_test::swiglu_xpu_only")
    assert compiled_swiglu(X)[1] == 0


def test_a_call_outside_the_kernels_contract_gets_the_native_math_and_naming_it_fails(providers):
    providers(accepts=_refuse_beta)

    def with_beta(x, limit):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        torch.ops._C.silu_and_mul_with_clamp(out, x, limit, 1.0, 0.5)
        return out

    assert compiled_swiglu(X)[1] == 1  # beta 0: taken
    lowered = lower_graph_testing(with_beta, X, 6.0)
    assert lowered.report.kernels == {OP: "native"} and op_counts(lowered.gm)["dsv4_provider_test.swiglu"] == 0
    with pytest.raises(OptionsError, match="the test kernel has no beta"):
        lower_graph_testing(with_beta, X, 6.0, providers=((OP, "test-lib"),))


def test_an_untested_provider_is_used_only_by_name(providers):
    providers(untested="never run on its hardware")
    assert compiled_swiglu(X)[1] == 0
    choice = choose(LOWERINGS[OP], "cpu", {}, None)
    assert choice.provider is None and "untested" in choice.why
    assert compiled_swiglu(X, providers={"activation": "test-lib"})[1] == 1


def test_a_family_or_star_naming_a_provider_the_op_lacks_leaves_it_native(providers):
    providers("test-lib")
    _, calls, report = compiled_swiglu(X, providers={"*": "vllm-cpu"})
    assert calls == 0 and report.kernels == {OP: "native"}
    with pytest.raises(Exception, match="there is no 'vllm-cpu' provider for cpu"):
        compiled_swiglu(X, providers={OP: "vllm-cpu"})


@pytest.mark.parametrize("bad, message", [
    ({"no_such::op": "native"}, "not a registered op"),
    ({"activation": "no-such-lib"}, "not a provider"),
    ({"activation": 3}, "maps strings to strings"),
    (["activation"], "must be a dict"),
])
def test_bad_provider_options_are_refused(bad, message):
    with pytest.raises(OptionsError, match=message):
        BackendOptions.from_mapping({"providers": bad})


def test_provider_preferences_are_part_of_the_cache_key():
    keys = {BackendOptions.from_mapping({"providers": p}).cache_key() for p in ({}, {"*": "native"})}
    assert len(keys) == 2


def test_registration_refuses_bad_entries(providers):
    for kwargs in ({"name": "native"}, {"device": "tpu"}, {"kernel": "no_namespace"}, {"priority": 0}):
        with pytest.raises(ValueError, match="kernel_provider"):
            providers(**kwargs)
    providers("twice")
    with pytest.raises(ValueError, match="already has a 'twice' provider"):
        providers("twice")


def test_vllms_cpu_and_xpu_providers_are_declared_untested_for_the_mhc_ops():
    declared = {(op, p.name, p.device_type, p.kernel) for op, entries in PROVIDERS.items() for p in entries}
    assert declared >= {
        ("vllm::mhc_pre_tilelang", "vllm-cpu", "cpu", "_C::hc_pre_fused_cpu"),
        ("vllm::mhc_post_tilelang", "vllm-cpu", "cpu", "_C::hc_post_fused_cpu"),
        ("vllm::mhc_fused_post_pre_tilelang", "vllm-cpu", "cpu", "_C::hc_pre_fused_cpu"),
        ("vllm::hc_head_fused_kernel_tilelang", "vllm-cpu", "cpu", "_C::hc_head_fused_cpu"),
        ("vllm::mhc_post_tilelang", "vllm-xpu", "xpu", "_xpu_C::mhc_post"),
    }
    assert all(p.untested for entries in PROVIDERS.values() for p in entries if p.name.startswith("vllm-"))


def test_the_xpu_provider_is_chosen_by_name_where_its_kernel_is_registered():
    lib = torch.library.Library("_xpu_C", "FRAGMENT")
    lib.define("mhc_post(Tensor x, Tensor residual, Tensor post_layer_mix, Tensor comb_res_mix) -> Tensor")
    lib.impl("mhc_post", _lower_priority_ran, "XPU")
    lowering = LOWERINGS["vllm::mhc_post_tilelang"]
    assert choose(lowering, "xpu", {}, None).provider is None
    chosen = choose(lowering, "xpu", {"mhc": "vllm-xpu"}, None)
    assert chosen.label == "vllm-xpu (_xpu_C::mhc_post)"
    assert dataclasses.replace(lowering, native=chosen.provider.implementation).native.__name__ == \
        "mhc_post_vllm_xpu"
    assert chosen.lowering(lowering).qualname == lowering.qualname


def test_vllms_cpu_mhc_kernels_agree_with_the_native_math():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the vLLM tier installs it)")
    probe = "import vllm._custom_ops, torch; torch.ops._C.hc_pre_fused_cpu"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:  # SIGILL kills it
        pytest.skip("vLLM's CPU library with its DeepSeek-V4 kernels does not load on this CPU (needs AVX-512 BF16)")
    import vllm._custom_ops  # noqa: F401 - loads vLLM's CPU library

    torch.manual_seed(0)
    m, hidden, tokens = 4, 64, 5
    residual = torch.randn(tokens, m, hidden).bfloat16()
    fn = torch.randn(m * (m + 2), m * hidden) * 0.05
    scale, base = torch.rand(3) + 0.5, torch.randn(m * (m + 2)) * 0.1
    norm_weight = torch.rand(hidden).bfloat16() + 0.5
    pre = ("vllm::mhc_pre_tilelang", dict(residual=residual, fn=fn, hc_scale=scale, hc_base=base, rms_eps=1e-6,
                                          hc_pre_eps=1e-6, hc_sinkhorn_eps=1e-6, hc_post_mult_value=2.0,
                                          sinkhorn_repeat=20, norm_weight=norm_weight, norm_eps=1e-6))
    post = ("vllm::mhc_post_tilelang", dict(x=torch.randn(tokens, hidden).bfloat16(), residual=residual,
                                            post_layer_mix=torch.rand(tokens, m, 1),
                                            comb_res_mix=torch.rand(tokens, m, m)))
    head = ("vllm::hc_head_fused_kernel_tilelang", dict(hs_flat=residual, fn=fn[:m], hc_scale=scale[:1],
                                                        hc_base=base[:m], rms_eps=1e-6, hc_eps=1e-6))
    for op, arguments in (pre, post, head):
        provider = next(p for p in PROVIDERS[op] if p.name == "vllm-cpu")
        expected = LOWERINGS[op].native(**arguments)
        got = provider.implementation(**arguments)
        for e, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (expected, got)), strict=True):
            torch.testing.assert_close(g.float(), e.float(), atol=2e-2, rtol=2e-2, msg=op)

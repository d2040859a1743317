"""The mHC Triton kernels (lowerings/mhc_triton.py) on CPU, through Triton's interpreter, against the same fp64
math as the plain-torch path: the tests of test_mhc.py and test_mhc_vllm.py run again here with the lowerings
routed to the kernels. Runs where Triton is installed, in a process started with TRITON_INTERPRET=1 (Triton
reads it when the kernels are defined): `make test-triton` does so. On the GPU the same kernels run compiled
(tests/test_gpu_mhc_kernels.py).
"""

import os

import pytest
import torch
from torch.utils._triton import has_triton_package

from dsv4_compile.lowering.lowerings import mhc

pytestmark = pytest.mark.skipif(
    not has_triton_package() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels through Triton's interpreter: needs the triton package and TRITON_INTERPRET=1 "
           "from the start of the process (`make test-triton` runs it so)")

from tests.lowerings.test_mhc import (  # noqa: E402 - collected again here, with the kernels in use
    test_a_chain_of_sublayers_matches_the_oracle_and_lowers_once,
    test_each_op_matches_the_math_and_the_model_oracle,
    test_fused_post_pre_equals_post_then_pre,
)
from tests.lowerings.test_mhc_vllm import (  # noqa: E402
    test_fused_post_pre_delayed_matches_the_math,
    test_fused_post_pre_is_post_then_pre_on_the_rounded_stream,
    test_head_matches_the_math,
    test_pre_delayed_matches_the_math,
    test_pre_matches_the_math,
)

__all__ = [
    "test_a_chain_of_sublayers_matches_the_oracle_and_lowers_once",
    "test_each_op_matches_the_math_and_the_model_oracle",
    "test_fused_post_pre_delayed_matches_the_math",
    "test_fused_post_pre_equals_post_then_pre",
    "test_fused_post_pre_is_post_then_pre_on_the_rounded_stream",
    "test_head_matches_the_math",
    "test_pre_delayed_matches_the_math",
    "test_pre_matches_the_math",
]


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """Route the lowerings to the Triton kernels on CPU tensors, and check that every test with tokens used them."""
    calls = []
    fused = mhc.fused_gates_and_collapse

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(mhc, "TRITON_DEVICES", ("cpu",))
    monkeypatch.setattr(mhc, "fused_gates_and_collapse", counted)
    monkeypatch.setattr("dsv4_compile.lowering.lowerings.mhc_vllm.fused_gates_and_collapse", counted)
    yield
    params = getattr(request.node, "callspec", None)
    tokens = params.params.get("t", params.params.get("shape", 1)) if params else 1
    imported = request.node.function.__module__ != __name__
    if imported and tokens not in (0, (0,)) and "post_then_pre" not in request.node.name:
        assert calls, "the Triton kernels were not used"


def test_the_kernels_take_the_pre_and_its_projection_on_cpu_here():
    h = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    fn = torch.randn(24, 256) / 16
    assert mhc.triton_kernels_for(h, fn) is not None
    partials = torch.ops.dsv4_triton.mhc_project(h.flatten(1), fn)
    flat = h.flatten(1).double()
    expected = torch.cat([flat @ fn.double().T, flat.square().sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(partials.sum(0)[:, :25].double(), expected, rtol=1e-6, atol=1e-5)


def test_a_projection_of_the_wrong_width_is_refused_not_read_past():
    h = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    fn, scale, base = torch.randn(24, 200), torch.rand(3), torch.randn(24)
    with pytest.raises(ValueError, match=r"fn has shape \(24, 200\): its width must be the projected rows' 256"):
        mhc.mhc_pre_native(h, fn, scale, base, 1e-6, 1e-6, 20)

"""`dsv4-compile coverage` on the installed vLLM (0.32.0's CPU build): every layer kind of the NVIDIA path is
built by vLLM, run through a prefill and a decode step, and every op it calls has a row in the constructs table
with the handling the backend applies. The oracle is what the layers must call (read from vLLM's source: the
kv-cache insert at attention.py, FlashMLA decode at nvidia/flashmla.py, the tilelang mHC ops at nvidia/model.py)."""

from __future__ import annotations

import pytest

from dsv4_compile.tools.vllm_coverage import LAYER_KINDS, Coverage, Met, report_lines, scan
from dsv4_compile.vllm_constructs import Handling, find


@pytest.fixture(scope="module")
def coverage() -> Coverage:
    return scan()


def test_every_op_the_nvidia_layers_call_is_in_the_table_and_every_layer_is_accepted(coverage):
    assert coverage.ok, "\n".join(report_lines(coverage))
    assert {kind for met in coverage.met.values() for kind in met.kinds} == set(LAYER_KINDS)


@pytest.mark.parametrize(("op", "kinds", "line"), [
    ("_C::fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert", set(LAYER_KINDS), "models/deepseek_v4/attention.py"),
    ("_flashmla_C::sparse_decode_fwd", set(LAYER_KINDS), "models/deepseek_v4/nvidia/flashmla.py"),
    ("vllm::mhc_pre_tilelang", set(LAYER_KINDS), "models/deepseek_v4/nvidia/model.py"),
    ("_C::hash_topk_cpu", {"window-hash"}, "_custom_ops.py"),
])
def test_the_ops_each_layer_must_call_are_met_where_vllm_calls_them(coverage, op, kinds, line):
    met = coverage.met[op]
    assert met.kinds == kinds
    assert any(line in where for where in met.where), met.where
    if op.startswith(("_flashmla_C", "vllm::mhc", "_C::fused_deepseek")):
        assert met.construct.handling("xpu") is Handling.LOWERED


def test_the_entry_points_swapped_include_flashmla_and_deepgemm(coverage):
    assert {"vllm.v1.attention.ops.flashmla.flash_mla_with_kvcache", "vllm.utils.deep_gemm.fp8_einsum",
            "vllm.models.deepseek_v4.compressor.compress_norm_rope_store_triton"} <= coverage.swapped


def test_an_op_without_a_row_is_reported_with_vllms_line_and_fails():
    unknown = Coverage(met={"vllm::new_kernel": Met("vllm::new_kernel", find("vllm::new_kernel"),
                                                    {"vllm/models/deepseek_v4/attention.py:900"}, {"ratio4"})})
    lines = report_lines(unknown)
    assert not unknown.ok
    assert any(line.startswith("UNKNOWN vllm::new_kernel") and "attention.py:900" in line for line in lines)
    refused = Coverage(failures={"ratio4/decode": "CudaOnlyNodesError: ..."})
    assert not refused.ok and report_lines(refused)[-1] == "coverage: 0 unknown, 1 refused"


def test_unknown_layer_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown layer kind"):
        scan(["window-hash", "megamoe"])

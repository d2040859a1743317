"""Routing family on vLLM: `_moe_C::topk_softplus_sqrt` (defined by ensure_vllm_ops: the CPU build has no
`_moe_C`) compiled with dsv4_xpu, alone and inside vLLM's own router (`fused_topk_bias`), checked against vLLM's
CPU routing kernels `_C::biased_topk_cpu` and `_C::hash_topk_cpu` with scoring_func "sqrtsoftplus".

Tolerances: expert ids exact (distinct scores, no ties); weights fp32 against fp32, rtol 1e-5 and atol 1e-6 (the
kernels sum and divide in other orders). The CPU kernel applies routed_scaling_factor only when renormalising
(the CUDA kernel always does), so the raw-weight case compares with a factor of 1.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from dsv4_compile.lowering.lowerings import routing  # registers the lowering
from dsv4_compile.lowering.registry import LOWERINGS
from tests.conftest import lower_graph_testing, reports_since
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

OP, NATIVE = "_moe_C::topk_softplus_sqrt", "topk_softplus_sqrt_native"
E, K = 256, 6


@pytest.fixture(autouse=True)
def _ops() -> None:
    ensure_vllm_ops()


def make_logits(t, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(E, generator=gen) for _ in range(t)]) if t else torch.zeros(0, E)
    return (ranks.float() * 0.04 - 5.0).to(dtype)  # distinct scores, in bf16 too


def make_bias(seed=1):
    return torch.randperm(E, generator=torch.Generator().manual_seed(seed)).float() * 1e-3


def route(logits, renormalize, scale, bias, input_ids, tid2eid):
    weights = torch.empty(logits.shape[0], K, dtype=torch.float32)
    experts = torch.empty(logits.shape[0], K, dtype=torch.int32)
    source = torch.empty(logits.shape[0], K, dtype=torch.int32)
    torch.ops._moe_C.topk_softplus_sqrt(weights, experts, source, logits, renormalize, scale, bias, input_ids,
                                        tid2eid, None)
    return weights, experts


def lowered(fn, *args):
    lo = lower_graph_testing(fn, *args, expected_before=[OP], expected_after=[NATIVE], unexpected_after=[OP])
    assert lo.report["routing"].matched == 1 and lo.report["audit"].matched == 0
    return lo.run()


def close(actual, expected):
    (weights, experts), (e_weights, e_experts) = actual, expected
    assert torch.equal(experts.int(), e_experts)
    torch.testing.assert_close(weights, e_weights, rtol=1e-5, atol=1e-6)


def test_native_takes_the_ops_schema():
    schema = torch.ops._moe_C.topk_softplus_sqrt.default._schema
    assert [a.name for a in schema.arguments] == list(inspect.signature(routing.topk_softplus_sqrt_native).parameters)
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == list(
        LOWERINGS[OP].mutates)


@needs_vllm_cpu_kernels
@pytest.mark.parametrize(("renormalize", "scale"), [(True, 2.5), (False, 1.0)], ids=["renorm", "raw"])
@pytest.mark.parametrize("t", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bias_routing_matches_biased_topk_cpu(dtype, t, renormalize, scale):
    logits, bias = make_logits(t, dtype), make_bias()
    actual = lowered(route, logits, renormalize, scale, bias, None, None)
    gating = logits.float()  # bf16 logits are exact in fp32, the only dtype the CPU kernel reads
    close(actual, torch.ops._C.biased_topk_cpu(gating, gating, bias, K, renormalize, "sqrtsoftplus", 0, scale, True))


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("t", [0, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_hash_routing_matches_hash_topk_cpu(dtype, t):
    gen = torch.Generator().manual_seed(2)
    logits = make_logits(t, dtype, seed=3)
    tid2eid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(40)]).int()
    ids = torch.randint(0, 40, (t,), generator=gen, dtype=torch.int32)
    actual = lowered(route, logits, True, 1.5, None, ids, tid2eid)
    close(actual, torch.ops._C.hash_topk_cpu(logits.float(), tid2eid[ids.long()], K, "sqrtsoftplus", 0, E, 1.5))


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("hashed", [False, True], ids=["bias", "hash"])
def test_vllms_router_compiles_to_the_cpu_kernels_result(hashed):
    from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import fused_topk_bias

    gen = torch.Generator().manual_seed(4)
    t = 6
    hidden, logits, bias = torch.randn(t, 32, generator=gen), make_logits(t, torch.float32, seed=5), make_bias()
    tid2eid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(30)])  # int64, as ids
    ids = torch.randint(0, 30, (t,), generator=gen)

    def router(hidden, logits, bias, ids, tid2eid):
        return fused_topk_bias(hidden, logits, "sqrtsoftplus", bias, K, True, input_tokens=ids,
                               hash_indices_table=tid2eid if hashed else None, routed_scaling_factor=2.0)

    args = (hidden, logits, bias, ids, tid2eid)
    lowered(router, *args)
    torch._dynamo.reset()
    before = dsv4_compile.all_reports()
    with dsv4_compile.cuda_compat("cpu"):
        actual = torch.compile(router, backend="dsv4_xpu", fullgraph=True)(*args)
    assert reports_since(before)[0]["routing"].matched == 1
    if hashed:
        expected = torch.ops._C.hash_topk_cpu(logits, tid2eid[ids].int(), K, "sqrtsoftplus", 0, E, 2.0)
    else:
        expected = torch.ops._C.biased_topk_cpu(logits, logits, bias, K, True, "sqrtsoftplus", 0, 2.0, True)
    close(actual, expected)

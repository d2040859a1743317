"""End to end on CPU: the CUDA-oriented DeepSeek-V4 model (tiny(), every layer kind) compiled with the
dsv4_xpu backend through Inductor, prefill and batched decode, against the native oracle.

Tolerance: 2e-4 absolute/relative on fp32 logits. The oracle and the rewritten graph compute the same
math in fp32; Inductor reorders and fuses reductions (RMS norms, softmaxes, matmul epilogues), which moves
results by a few fp32 ulps per op, amplified through 4 layers (seen: about 1e-5).
"""

import pytest
import torch

import dsv4_compile
from dsv4_compile.lowering.pipeline import pass_names
from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill
from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
from dsv4_compile.models.deepseek_v4.static_cache import (
    StaticCache,
    decode_inputs,
    mark_tokens_dynamic,
    prefill_inputs,
)
from tests.conftest import needs_trace_time_retarget

TOL = dict(atol=2e-4, rtol=2e-4)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    model = DeepseekV4Model(DeepseekV4Config.tiny(), dtype=torch.float32)
    with dsv4_compile.cuda_compat("cpu"):
        cuda_model = CudaDeepseekV4(model)
    return model, cuda_model


@needs_trace_time_retarget
def test_prefill_and_decode_through_inductor_match_the_oracle(setup):
    model, cm = setup
    cache = StaticCache(model, max_seq_len=64, num_slots=2)
    prefill = dsv4_compile.compile(cm.prefill_static, fullgraph=True)
    decode = dsv4_compile.compile(cm.decode_static, fullgraph=True)
    oracle_caches = []
    for slot, n in enumerate((40, 23)):  # two prefill lengths: one graph
        tokens = ids(n, slot)
        expected, oc = oracle_prefill(model, tokens)
        oracle_caches.append(oc)
        got = prefill(*mark_tokens_dynamic(tokens, *prefill_inputs(cache, slot, n)), cache)
        torch.testing.assert_close(got, expected, **TOL)
        if slot == 0:
            report = dsv4_compile.last_report()
            assert [s.name for s in report.passes] == list(pass_names())
            for name in ("activation", "mhc", "aux_streams"):
                assert report[name].changed > 0, name
            assert report["audit"].matched == 0
    for step in range(3):  # batched decode crossing the ratio-4 compression boundary
        tokens = ids(2, 100 + step)
        expected = oracle_decode(model, tokens, oracle_caches)
        got = decode(*mark_tokens_dynamic(tokens, *decode_inputs(cache, torch.tensor([0, 1]))), cache)
        torch.testing.assert_close(got, expected, **TOL)
        if step == 0:
            report = dsv4_compile.last_report()
            assert report["attention"].changed > 0 and report["audit"].matched == 0


@needs_trace_time_retarget
def test_backend_by_name_under_cuda_compat(setup):
    model, cm = setup
    cache = StaticCache(model, max_seq_len=64, num_slots=1)
    tokens = ids(12, 7)
    compiled = torch.compile(cm.prefill_static, backend="dsv4_xpu", options={"inductor": False}, fullgraph=True)
    with dsv4_compile.cuda_compat("cpu"):
        got = compiled(tokens, *prefill_inputs(cache, 0, 12), cache)
    torch.testing.assert_close(got, oracle_prefill(model, tokens)[0], **TOL)
    assert dsv4_compile.last_report()["audit"].matched == 0

"""vLLM's KV insert, FlashMLA decode and routing ops lowered for a `cuda` target: Inductor's Triton code for the
native math writes the same caches and outputs as the CPU path, whose numerics tests/lowerings checks against
fp64 formulas. The ops are defined here without a CUDA kernel, so only the lowering can run them."""

from __future__ import annotations

import pytest
import torch

from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from tests.lowerings import test_flashmla, test_kv_cache, test_routing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for Inductor's Triton code"),
]


def on(device, values):
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


def compiled_both_ways(fn, args):
    """(CPU results, CUDA results moved to CPU, CPU inputs after, CUDA inputs after) of fn compiled with dsv4_xpu."""
    ensure_vllm_ops()
    cpu_args, cuda_args = on("cpu", args), on("cuda", args)
    cpu = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(*cpu_args)
    torch._dynamo.reset()
    gpu = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(*cuda_args)
    return cpu, on("cpu", gpu if isinstance(gpu, (tuple, list)) else [gpu]), cpu_args, on("cpu", cuda_args)


def test_quant_insert_writes_the_same_cache_bytes_on_cuda():
    q, kv, pos, slots, cache = test_kv_cache.make(torch.bfloat16)
    table = test_kv_cache.cos_sin_table()
    cpu, (gpu_q,), cpu_args, gpu_args = compiled_both_ways(test_kv_cache.quant_insert_call,
                                                           (q, kv, cache, slots, pos, table))
    assert torch.equal(gpu_args[2], cpu_args[2])  # the fp8_ds_mla cache, byte for byte
    torch.testing.assert_close(gpu_q, cpu, rtol=2 ** -7, atol=1e-2)


def test_sparse_decode_matches_the_cpu_path_on_cuda():
    args, _ = test_flashmla.decode_case(torch.bfloat16)
    scheduler, splits = torch.zeros(16, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    out = torch.full((3, 2, 4, 512), 7.0, dtype=torch.bfloat16)
    cpu, gpu, cpu_args, gpu_args = compiled_both_ways(test_flashmla.decode_with_scheduler,
                                                      (*args, scheduler, splits, out))
    torch.testing.assert_close(gpu_args[-1], cpu_args[-1], rtol=2 ** -7, atol=2e-3)  # `out_` written
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-4, atol=1e-4)  # lse (+inf where nothing is valid)


def test_routing_writes_the_same_experts_on_cuda():
    logits = test_routing.make_logits(7, 64, torch.bfloat16, seed=3)
    bias = torch.linspace(-0.2, 0.2, 64)
    padding = torch.tensor([False, True, False, False, False, False, False])

    def router(weights, experts, source, logits, bias, padding):
        torch.ops._moe_C.topk_softplus_sqrt(weights, experts, source, logits, True, 2.5, bias, None, None, padding)
        return weights.sum()

    buffers = (torch.zeros(7, 6), torch.zeros(7, 6, dtype=torch.int32), torch.zeros(7, 6, dtype=torch.int32))
    _, _, cpu_args, gpu_args = compiled_both_ways(router, (*buffers, logits, bias, padding))
    assert torch.equal(gpu_args[1], cpu_args[1]) and torch.equal(gpu_args[2], cpu_args[2])
    torch.testing.assert_close(gpu_args[0], cpu_args[0], rtol=1e-5, atol=1e-6)

"""On a CUDA GPU: the CUDA-oriented DeepSeek-V4 model compiled with dsv4_xpu for target `cuda` (Inductor's
Triton path, the same codegen XPU uses), prefill and decode, against the native oracle; every rewrite,
PDL included, does work there (real streams, Triton launches with launch_pdl=True in the graph)."""

import pytest
import torch

import dsv4_compile
from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (target cuda through Triton)"),
]


def ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def compile_and_compare(cfg: DeepseekV4Config, lens: tuple[int, ...], steps: int, tol: float) -> list:
    from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
    from dsv4_compile.models.deepseek_v4.static_cache import (
        StaticCache,
        decode_inputs,
        mark_tokens_dynamic,
        prefill_inputs,
    )

    torch.backends.cuda.matmul.allow_tf32 = False
    model = DeepseekV4Model(cfg, dtype=torch.float32, device="cuda")
    cm = CudaDeepseekV4(model)
    cache = StaticCache(model, max_seq_len=max(lens) + steps + 1, num_slots=len(lens))
    prefill = dsv4_compile.compile(cm.prefill_static, device="cuda", fullgraph=True)
    decode = dsv4_compile.compile(cm.decode_static, device="cuda", fullgraph=True)
    reports, oracle_caches = [], []
    for slot, n in enumerate(lens):
        tokens = ids(n, cfg.vocab_size, slot)
        expected, oc = oracle_prefill(model, tokens)
        oracle_caches.append(oc)
        got = prefill(*mark_tokens_dynamic(tokens, *prefill_inputs(cache, slot, n)), cache)
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        reports.append(dsv4_compile.last_report())
    slots = torch.arange(len(lens))
    for step in range(steps):
        tokens = ids(len(lens), cfg.vocab_size, 100 + step)
        expected = oracle_decode(model, tokens, oracle_caches)
        got = decode(*mark_tokens_dynamic(tokens, *decode_inputs(cache, slots)), cache)
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        reports.append(dsv4_compile.last_report())
    return reports


def test_tiny_model_target_cuda():
    reports = compile_and_compare(DeepseekV4Config.tiny(), (40, 23), steps=4, tol=2e-4)
    prefill, decode = reports[0], reports[-1]
    for name in ("activation", "mhc", "aux_streams", "pdl"):
        assert prefill[name].changed > 0, name
    assert decode["attention"].changed > 0 and decode["pdl"].changed > 0
    assert all(r["audit"].matched == 0 for r in reports)


def test_flash_shaped_layers_target_cuda():
    cfg = DeepseekV4Config.flash().with_(
        num_hidden_layers=2, compress_ratios=[4, 128], n_routed_experts=4, num_experts_per_tok=2,
        vocab_size=1024, num_hash_layers=0,
    )
    reports = compile_and_compare(cfg, (300,), steps=2, tol=2e-3)
    assert all(r["audit"].matched == 0 for r in reports)

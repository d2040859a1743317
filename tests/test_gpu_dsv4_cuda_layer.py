"""The CUDA-oriented DeepSeek-V4 forward run eagerly on a GPU (real streams, CUDA impls of the dsv4_cuda
ops, PDL Triton kernels) against the native oracle."""

from __future__ import annotations

import pytest
import torch

from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (eager CUDA-oriented path)"),
]


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def _compare(cfg: DeepseekV4Config, lens: tuple[int, int], steps: int, tol: float) -> None:
    from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4

    model = DeepseekV4Model(cfg, dtype=torch.float32, device="cuda")
    cm = CudaDeepseekV4(model)
    ocs, ccs = [], []
    for seed, n in enumerate(lens):
        ids = _ids(n, cfg.vocab_size, seed)
        ref, oc = oracle_prefill(model, ids)
        got, cc = cm.prefill(ids)
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        ocs.append(oc)
        ccs.append(cc)
    for step in range(steps):
        tok = _ids(len(lens), cfg.vocab_size, 100 + step)
        torch.testing.assert_close(cm.decode(tok, ccs), oracle_decode(model, tok, ocs), atol=tol, rtol=tol)
    torch.cuda.synchronize()


def test_tiny_matches_oracle():
    _compare(DeepseekV4Config.tiny(), (40, 23), steps=9, tol=1e-4)


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_flash_shaped_layer_matches_oracle(ratio):
    cfg = DeepseekV4Config.flash().with_(
        num_hidden_layers=1, compress_ratios=[ratio], n_routed_experts=4, num_experts_per_tok=2,
        vocab_size=1024, num_hash_layers=0,
    )
    _compare(cfg, (260, 131), steps=5, tol=2e-3)


def test_triton_launchers_match_fallback():
    from dsv4_compile.models.deepseek_v4 import triton_kernels as tk

    if not tk.HAS_TRITON:
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    kv, sc = torch.randn(7, 96, device="cuda", generator=g), torch.randn(7, 96, device="cuda", generator=g)
    new_kv, new_sc = tk.save_partial_states(kv, sc)
    assert torch.equal(new_kv, kv) and torch.equal(new_sc, sc)
    x = torch.randn(5, 4, 48, device="cuda", generator=g, dtype=torch.bfloat16)
    ang = torch.randn(5, 8, device="cuda", generator=g)
    got = tk.inv_rope(x, ang.cos(), ang.sin())
    ref = tk.inv_rope(x.cpu(), ang.cos().cpu(), ang.sin().cpu())
    torch.testing.assert_close(got.cpu(), ref, atol=1e-2, rtol=1e-2)

"""FlashMLA sparse decode (`_flashmla_C::sparse_decode_fwd`, which vLLM's CPU build lacks) lowered by dsv4_xpu,
against vLLM's own CPU kernel for the same attention, `_C::flash_mla_with_kvcache_cpu`, on the same cache bytes.

The caches are written by vLLM's CPU insert kernel (`_C::fused_qnorm_rope_kv_insert_cpu`: RoPE, UE8M0 FP8
quantisation, paged insert), so the bytes both sides read are vLLM's. vLLM's kernel has no topk lengths: where
the lowered call cuts with `topk_length`, the oracle gets -1 in the cut slots.
"""

from __future__ import annotations

import pytest
import torch

import dsv4_compile.lowering.lowerings.flashmla  # noqa: F401 - registers the lowerings
from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from tests.conftest import lower_graph_testing
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

HEADS, SCALE = 8, 512 ** -0.5


def vllm_written_cache(num_blocks: int, block_size: int, gen: torch.Generator) -> torch.Tensor:
    """`[num_blocks, block_size * 584]` uint8, every slot written by vLLM's CPU insert kernel."""
    slots = num_blocks * block_size
    cache = torch.zeros(num_blocks, block_size * 584, dtype=torch.uint8)
    latent = torch.randn(slots, 512, generator=gen).to(torch.bfloat16)
    q = torch.zeros(slots, HEADS, 512, dtype=torch.bfloat16)
    positions = torch.randint(0, 64, (slots,), generator=gen)
    cos_sin = torch.randn(64, 64, generator=gen)
    torch.ops._C.fused_qnorm_rope_kv_insert_cpu(q, latent, positions, cache, torch.randperm(slots, generator=gen),
                                                cos_sin, HEADS, 1e-6, block_size)
    return cache


def decode(q, window, window_slots, window_lengths, sink, compressed, compressed_slots, scheduler, splits, out):
    tokens = q.shape[0]
    torch.ops._flashmla_C.sparse_decode_fwd(
        q.unsqueeze(1), window, window_slots.view(tokens, 1, -1), window_lengths, sink, scheduler, splits,
        compressed, None if compressed is None else compressed_slots.view(tokens, 1, -1), None, 512, SCALE,
        out.unsqueeze(1))
    return out


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("with_compressed", [True, False], ids=["window+compressed", "window_only"])
def test_decode_matches_vllm_cpu_kernel(with_compressed):
    import vllm._custom_ops  # noqa: F401 - vLLM's CPU kernels

    ensure_vllm_ops()  # vLLM's CPU build has no _flashmla_C: its ops are defined from ours
    gen = torch.Generator().manual_seed(0)
    tokens, window_bs, compressed_bs = 5, 8, 4
    window = vllm_written_cache(3, window_bs, gen)
    compressed = vllm_written_cache(4, compressed_bs, gen)
    q = torch.randn(tokens, HEADS, 512, generator=gen).to(torch.bfloat16)
    sink = torch.randn(HEADS, generator=gen)
    window_slots = torch.randint(0, 3 * window_bs, (tokens, 6), generator=gen)
    window_slots[0, 1] = -1
    window_lengths = torch.tensor([6, 2, 6, 0, 5], dtype=torch.int32)
    compressed_slots = torch.randint(0, 4 * compressed_bs, (tokens, 7), generator=gen)
    compressed_slots[1, 3:] = -1
    compressed_slots[3] = -1  # token 3: no window slot (length 0) and no compressed one
    if not with_compressed:
        compressed_slots = compressed_slots[:, :0]

    expected = torch.zeros(tokens, HEADS, 512, dtype=torch.bfloat16)
    cut = torch.arange(6) >= window_lengths.unsqueeze(-1)
    torch.ops._C.flash_mla_with_kvcache_cpu(
        expected, q, window, window_slots.masked_fill(cut, -1), window_bs, compressed if with_compressed else window,
        compressed_slots, compressed_bs if with_compressed else 1, sink, SCALE)

    args = (q, window.view(3, window_bs, 1, 584), window_slots, window_lengths, sink,
            compressed.view(4, compressed_bs, 1, 584) if with_compressed else None, compressed_slots,
            torch.zeros(8, 16, dtype=torch.int32), torch.zeros(tokens + 1, dtype=torch.int32))
    out = torch.full((tokens, HEADS, 512), 5.0, dtype=torch.bfloat16)
    lower_graph_testing(decode, *args, out, expected_before=["_flashmla_C::sparse_decode_fwd"],
                        unexpected_after=["_flashmla_C"])
    torch.compile(decode, backend="dsv4_xpu")(*args, out)

    assert torch.equal(expected[3], torch.zeros_like(expected[3]))  # the oracle's lonely token is zero too
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    # Both compute in fp32 and round once to bf16; their summation orders differ.
    torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=2e-3)

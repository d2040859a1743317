"""KV-cache family against vLLM's own CPU kernels: `_C::fused_qnorm_rope_kv_insert_cpu` (the CPU port of
`_C::fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert`; arguments (q, kv, positions, cache, slot_mapping,
cos_sin_cache, q_head_padded, eps, block_size)) writes the same fp8_ds_mla bytes as our lowering, and
`_C::flash_mla_with_kvcache_cpu` reads a cache written by our lowering as it reads its own.

The one layout difference: vLLM's CPU kernel floors a block's UE8M0 scale at 2**-13 (the scale of an amax of
448 * 2**-13); the CUDA kernel (and our lowering) floors the amax at 1e-4 instead, so blocks whose amax is below
448 * 2**-13 get a finer scale from us. Those blocks are checked separately.
"""

import pytest
import torch

from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from dsv4_compile.lowering.lowerings import fp8_ds_mla as codec
from dsv4_compile.lowering.lowerings import kv_cache
from tests.conftest import lower_graph_testing
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

H, PADDED, EPS, BLOCK, BLOCKS, MAX_POS = 3, 4, 1e-6, 8, 4, 64
CPU_SCALE_FLOOR_BYTE = 127 - 13
CPU_FLOOR_AMAX = 448 * 2.0 ** -13


def cos_sin_table():
    freqs = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    angles = torch.arange(MAX_POS, dtype=torch.float32)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


def make(tokens=12, small_blocks=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(tokens, H, 512, generator=gen) * 2).bfloat16()
    kv = torch.randn(tokens, 512, generator=gen) * 2
    kv[:, 256:320] *= 40.0  # a block whose scale is above 1
    if small_blocks:
        kv[:, 64:128] *= 1e-3
        kv[:, 128:192] *= 1e-7
    pos = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    slots = torch.randperm(BLOCKS * BLOCK, generator=gen)[:tokens]
    slots[::5] = -1
    cache = torch.randint(0, 256, (BLOCKS, BLOCK * codec.BYTES_PER_TOKEN), generator=gen, dtype=torch.uint8)
    return q, kv.bfloat16(), pos, slots, cache


def both_inserts(q, kv, pos, slots, cache):
    """(q, cache) from vLLM's CPU kernel and from our lowering, on copies of `cache`."""
    ours_cache, theirs_cache = cache.clone(), cache.clone()
    table = cos_sin_table()
    theirs = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(q, kv, pos, theirs_cache, slots, table, PADDED, EPS, BLOCK)
    ours = kv_cache.qnorm_rope_kv_rope_quant_insert_native(q, kv, ours_cache, slots, pos, table, PADDED, EPS, BLOCK)
    return (theirs, theirs_cache), (ours, ours_cache)


@needs_vllm_cpu_kernels
def test_quant_insert_matches_vllm_cpu_byte_for_byte():
    (q_theirs, theirs), (q_ours, ours) = both_inserts(*make())
    assert q_ours.shape == q_theirs.shape and q_ours.dtype == q_theirs.dtype
    # Both round fp32 math to bf16 once; the order of the fp32 sums differs, so allow one bf16 step.
    torch.testing.assert_close(q_ours.float(), q_theirs.float(), atol=1e-2, rtol=2 ** -7)
    assert torch.equal(ours, theirs)


@needs_vllm_cpu_kernels
def test_small_blocks_differ_only_by_the_scale_floor():
    q, kv, pos, slots, cache = make(small_blocks=True)
    (_, theirs), (_, ours) = both_inserts(q, kv, pos, slots, cache)
    valid = slots >= 0
    amax = kv[valid, :448].float().abs().unflatten(-1, (7, 64)).amax(-1)
    floored = amax < CPU_FLOOR_AMAX
    assert floored.any() and (~floored).any()
    ours_data, ours_scales = codec.paged_regions(ours, BLOCK)
    theirs_data, theirs_scales = codec.paged_regions(theirs, BLOCK)
    block, offset = slots[valid] // BLOCK, slots[valid] % BLOCK
    ours_bytes, theirs_bytes = ours_scales[block, offset, :7], theirs_scales[block, offset, :7]
    assert torch.equal(ours_bytes[~floored], theirs_bytes[~floored])
    assert torch.all(theirs_bytes[floored] == CPU_SCALE_FLOOR_BYTE) and torch.all(ours_bytes[floored] < 114)
    same_values = (~floored).repeat_interleave(64, dim=1)
    assert torch.equal(ours_data[block, offset, :448][same_values], theirs_data[block, offset, :448][same_values])
    assert torch.equal(ours_data[block, offset, 448:], theirs_data[block, offset, 448:])  # rope bytes
    decoded_ours = codec.read_fp8_ds_mla_slots(ours, slots[valid], BLOCK)
    decoded_theirs = codec.read_fp8_ds_mla_slots(theirs, slots[valid], BLOCK)
    # vLLM's coarser scale 2**-13 rounds to e4m3 steps of at most 2**-13 * 2**-9 below its floor amax.
    torch.testing.assert_close(decoded_ours, decoded_theirs, atol=2.0 ** -13 * 16, rtol=2 ** -3)
    skipped = torch.ones_like(ours, dtype=torch.bool)
    for slot in slots[valid].tolist():
        b, o = divmod(slot, BLOCK)
        skipped[b, o * 576:(o + 1) * 576] = False
        skipped[b, BLOCK * 576 + o * 8:BLOCK * 576 + (o + 1) * 8] = False
    assert torch.equal(ours[skipped], cache[skipped]) and torch.equal(theirs[skipped], cache[skipped])


def cpu_attention(q, cache, window_slots):
    out = torch.empty(q.shape, dtype=q.dtype)
    no_compressed = window_slots.new_full((q.shape[0], 0), -1)
    sink = torch.linspace(-1.0, 1.0, q.shape[1])
    torch.ops._C.flash_mla_with_kvcache_cpu(out, q, cache, window_slots, BLOCK, cache, no_compressed, 1, sink,
                                            512 ** -0.5)
    return out


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("small_blocks", [False, True])
def test_vllm_cpu_attention_reads_our_cache_as_its_own(small_blocks):
    q, kv, pos, slots, cache = make(small_blocks=small_blocks)
    (q_theirs, theirs), (_, ours) = both_inserts(q, kv, pos, slots, cache)
    written = slots[slots >= 0]
    window_slots = torch.stack([written.roll(i)[:6] for i in range(q.shape[0])])
    window_slots[::3, 4:] = -1
    on_theirs = cpu_attention(q_theirs, theirs, window_slots)
    on_ours = cpu_attention(q_theirs, ours, window_slots)
    assert on_theirs.float().abs().max() > 0.1
    if small_blocks:
        torch.testing.assert_close(on_ours.float(), on_theirs.float(), atol=2e-2, rtol=2e-2)
    else:
        assert torch.equal(on_ours, on_theirs)


@needs_vllm_cpu_kernels
def test_compiled_quant_insert_matches_vllm_cpu():
    ensure_vllm_ops()
    assert torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert.default._schema.arguments[2].alias_info

    def insert(q, kv, cache, slots, pos, table):
        return torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert(q, kv, cache, slots, pos, table,
                                                                              PADDED, EPS, BLOCK)

    q, kv, pos, slots, cache = make()
    theirs_cache, ours_cache = cache.clone(), cache.clone()
    table = cos_sin_table()
    q_theirs = torch.ops._C.fused_qnorm_rope_kv_insert_cpu(q, kv, pos, theirs_cache, slots, table, PADDED, EPS, BLOCK)
    name = "fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert"
    lower_graph_testing(insert, q, kv, cache.clone(), slots, pos, table, expected_before=[name],
                        unexpected_after=[name])
    compiled = torch.compile(insert, backend="dsv4_xpu", fullgraph=True)
    q_ours = compiled(q, kv, ours_cache, slots, pos, table)
    torch.testing.assert_close(q_ours.float(), q_theirs.float(), atol=1e-2, rtol=2 ** -7)
    assert torch.equal(ours_cache, theirs_cache)

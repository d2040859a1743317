"""The plain-torch stand-ins for DeepSeek-V4's compressor/indexer Triton entry points
(dsv4_compile.frontend.ops.vllm_triton_compressor) against vLLM's own CPU kernels, which implement the same
contracts in C++ (`_C::save_partial_states_cpu`, `_C::compress_norm_rope_store_cpu`,
`_C::compress_norm_rope_store_indexer_cpu`, `_C::fused_indexer_q_rope_quant_cpu`), and the index bookkeeping
against loops written here from the kernels' contracts.
"""

from types import SimpleNamespace

import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.kernel_wrappers import vllm_substitutes
from dsv4_compile.frontend.ops import vllm_triton_attention
from dsv4_compile.frontend.ops import vllm_triton_compressor as standins
from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops
from dsv4_compile.lowering.lowerings import fp8_ds_mla as codec
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

NO_TRITON = vllm_substitutes(torch.device("cpu"))  # what cuda_compat swaps in on a target without Triton

ROPE, MAX_POS, EPS = 64, 512, 1e-6


def cos_sin_table(rope: int = ROPE) -> torch.Tensor:
    freqs = 1.0 / 10000 ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope)
    angles = torch.arange(MAX_POS, dtype=torch.float32)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


def paged_request(tokens: int, block_size: int, blocks: int, gen: torch.Generator):
    """One request at positions 0 .. tokens-1: its block-table row (a permutation) and the slot of each token."""
    table = torch.randperm(blocks, generator=gen).to(torch.int32).unsqueeze(0)
    pos = torch.arange(tokens)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    return table, pos, slots


# ----------------------------------------------------------------------------- save_partial_states
@needs_vllm_cpu_kernels
@pytest.mark.parametrize("ratio,head", [(4, 1024), (128, 512)])
def test_save_partial_states_matches_vllm_cpu(ratio, head):
    gen = torch.Generator().manual_seed(ratio)
    tokens, block_size = 19, (4 if ratio == 4 else 8)
    blocks = tokens // block_size + 3
    _, pos, slots = paged_request(tokens, block_size, blocks, gen)
    slots[[3, 11]] = -1  # padding tokens: their rows keep their bytes
    kv_score = torch.randn(tokens + 2, 2 * head, generator=gen)  # rows past the slot mapping are padding
    kv, score = kv_score.split([head, head], dim=-1)
    ape = torch.randn(ratio, head, generator=gen)
    cache = torch.randn(blocks, block_size, 2 * head, generator=gen)
    ours, theirs = cache.clone(), cache.clone()
    torch.ops._C.save_partial_states_cpu(kv[:tokens], score[:tokens], ape, pos, theirs, slots)
    standins.save_partial_states(kv, score, ape, pos, ours, slots, block_size, head, ratio)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, cache)


# ----------------------------------------------------------------------------- compress -> norm -> rope -> store
def compressor_case(ratio: int, head: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    overlap = ratio == 4
    width = (1 + overlap) * head
    state_block = 4 if ratio == 4 else 8
    state_blocks = tokens // state_block + 2
    state_table, pos, state_slots = paged_request(tokens, state_block, state_blocks, gen)
    state = torch.randn(state_blocks, state_block, 2 * width, generator=gen)
    state[..., width:] *= 3  # scores spread enough that the softmax is not flat
    kv_block = 64 if head == 128 or ratio == 4 else 2
    kv_blocks = tokens // ratio // kv_block + 2
    kv_table = torch.randperm(kv_blocks, generator=gen)
    compressed = pos // ratio
    kv_slots = kv_table[compressed // kv_block] * kv_block + compressed % kv_block
    kv_slots = torch.where((pos + 1) % ratio == 0, kv_slots, -1)
    row = codec.BYTES_PER_TOKEN if head == 512 else head + standins.INDEXER_SCALE_BYTES
    kv_cache = torch.randint(0, 256, (kv_blocks, kv_block, row), generator=gen, dtype=torch.uint8)
    weight = (1 + 0.3 * torch.randn(head, generator=gen)).bfloat16()
    return SimpleNamespace(ratio=ratio, head=head, overlap=overlap, width=width, state=state,
                           state_table=state_table, state_block=state_block, pos=pos, state_slots=state_slots,
                           kv_slots=kv_slots, kv_cache=kv_cache, weight=weight, tokens=tokens)


def vllm_compress(case):
    """vLLM's CPU kernel on a copy of the cache (its gather slots built by vLLM's own CPU helper)."""
    from vllm.models.deepseek_v4.cpu.cpu_utils import map_local_to_global_slots_cpu

    window = (1 + case.overlap) * case.ratio
    local = case.pos.unsqueeze(-1) - window + 1 + torch.arange(window)
    gather = map_local_to_global_slots_cpu(local, torch.zeros(case.tokens, dtype=torch.int32), case.state_table,
                                           case.state_block)
    cache = case.kv_cache.clone()
    kernel = torch.ops._C.compress_norm_rope_store_cpu if case.head == 512 else \
        torch.ops._C.compress_norm_rope_store_indexer_cpu
    kernel(case.state, gather, case.pos, case.kv_slots, case.weight.float(), EPS, cos_sin_table(),
           cache.view(cache.shape[0], -1), cache.shape[1], case.ratio)
    return cache


def standin_kwargs(case, cache):
    quant_block, token_stride, scale_dim = (64, 576, 8) if case.head == 512 else (128, 128, 4)
    return dict(
        state_cache=case.state, num_actual=case.tokens,
        token_to_req_indices=torch.zeros(case.tokens, dtype=torch.int32),
        positions=case.pos, slot_mapping=case.state_slots, block_table=case.state_table, block_size=case.state_block,
        state_width=case.width, cos_sin_cache=cos_sin_table(), kv_cache=cache,
        k_cache_metadata=SimpleNamespace(slot_mapping=case.kv_slots), pdl_kwargs={}, head_dim=case.head,
        rope_head_dim=ROPE, compress_ratio=case.ratio, overlap=case.overlap, use_fp4_cache=False,
        rms_norm_weight=case.weight, rms_norm_eps=EPS, quant_block=quant_block, token_stride=token_stride,
        scale_dim=scale_dim,
    )


def written_bytes(cache: torch.Tensor, slots: torch.Tensor, head: int) -> torch.Tensor:
    """A uint8 mask of the cache's shape: 1 on the data and scale bytes of `slots`."""
    mask = torch.zeros_like(cache)
    block_size = cache.shape[1]
    if head == 512:
        regions = codec.paged_regions(mask, block_size)
    else:
        blocks = mask.view(mask.shape[0], -1)
        regions = (blocks[:, :block_size * head].unflatten(1, (block_size, head)),
                   blocks[:, block_size * head:block_size * (head + 4)].unflatten(1, (block_size, 4)))
    for region in regions:
        region[slots // block_size, slots % block_size] = 1
    return mask


def decoded_rows(cache: torch.Tensor, slots: torch.Tensor, head: int) -> torch.Tensor:
    if head == 512:
        return codec.read_fp8_ds_mla_slots(cache, slots, cache.shape[1])
    block_size = cache.shape[1]
    blocks = cache.view(cache.shape[0], -1)
    block, offset = slots // block_size, slots % block_size
    data = blocks[:, :block_size * head].unflatten(1, (block_size, head))[block, offset]
    scale = blocks[:, block_size * head:block_size * (head + 4)].unflatten(1, (block_size, 4))[block, offset]
    return data.view(torch.float8_e4m3fn).float() * scale.contiguous().view(torch.float32)


@needs_vllm_cpu_kernels
@pytest.mark.parametrize("ratio,head,tokens", [(4, 512, 37), (128, 512, 300), (4, 128, 37)])
def test_compress_norm_rope_store_matches_vllm_cpu(ratio, head, tokens):
    case = compressor_case(ratio, head, tokens)
    theirs = vllm_compress(case)
    ours = case.kv_cache.clone()
    standins.compress_norm_rope_store(**standin_kwargs(case, ours))
    written = case.kv_slots[case.kv_slots >= 0]
    assert written.numel() >= 2
    untouched = written_bytes(ours, written, head) == 0
    assert torch.equal(ours[untouched], case.kv_cache[untouched])  # only the boundary tokens' rows change
    # The same fp32 math (softmax pool, RMSNorm, GPT-J RoPE, UE8M0 e4m3): measured byte for byte equal.
    assert torch.equal(ours, theirs)


def test_two_stage_variant_is_the_same_store():
    case = compressor_case(128, 512, 300)
    one, two = case.kv_cache.clone(), case.kv_cache.clone()
    standins.compress_norm_rope_store(**standin_kwargs(case, one))
    NO_TRITON["vllm.models.deepseek_v4.compressor.compress_norm_rope_store_two_stage_triton"](
        **standin_kwargs(case, two), num_decode_tokens=1, compress_scratch=torch.empty(0))
    assert torch.equal(one, two)


def test_compress_skips_padding_tokens():
    case = compressor_case(4, 512, 16)
    case.state_slots[11] = -1  # a boundary token whose state slot is the pad sentinel
    ours = case.kv_cache.clone()
    standins.compress_norm_rope_store(**standin_kwargs(case, ours))
    skipped = written_bytes(ours, case.kv_slots[11:12], 512).bool()
    assert torch.equal(ours[skipped], case.kv_cache[skipped])
    kept = written_bytes(ours, case.kv_slots[7:8], 512).bool()
    assert not torch.equal(ours[kept], case.kv_cache[kept])


# ----------------------------------------------------------------------------- indexer q
@needs_vllm_cpu_kernels
def test_fused_indexer_q_rope_quant_matches_vllm_cpu():
    gen = torch.Generator().manual_seed(3)
    tokens, heads, dim = 9, 8, 128
    pos = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    q = (torch.randn(tokens, heads, dim, generator=gen) * 3).bfloat16()
    q[2, 1] *= 1e-3
    weights = torch.randn(tokens, heads, generator=gen).bfloat16()
    table = cos_sin_table()
    q_theirs = torch.empty(tokens, heads, dim, dtype=torch.float8_e4m3fn)
    w_theirs = torch.empty(tokens, heads, dtype=torch.float32)
    torch.ops._C.fused_indexer_q_rope_quant_cpu(pos, q.float(), table, q_theirs, weights.float(), 0.125, heads ** -0.5,
                                                w_theirs)
    q_ours, w_ours = standins.fused_indexer_q_rope_quant(pos, q, table, weights, 0.125, heads ** -0.5)
    assert q_ours.dtype == torch.float8_e4m3fn and w_ours.dtype == torch.float32
    torch.testing.assert_close(w_ours, w_theirs, rtol=1e-6, atol=0)
    assert torch.equal(q_ours.view(torch.uint8), q_theirs.view(torch.uint8))


# ----------------------------------------------------------------------------- index bookkeeping
def test_compute_global_topk_indices_and_lens_against_a_loop():
    gen = torch.Generator().manual_seed(4)
    tokens, topk, block_size = 6, 40, 16
    table = torch.randperm(24, generator=gen).to(torch.int32).view(3, 8)
    req = torch.tensor([0, 0, 1, 2, 2, 1], dtype=torch.int32)
    local = torch.randint(0, 8 * block_size, (tokens, topk), generator=gen, dtype=torch.int32)
    local[local % 3 == 0] = -1
    valid_token = torch.tensor([True, True, False, True, True, True])
    slots, lens = standins.compute_global_topk_indices_and_lens(local, req, table, block_size, valid_token)
    for t in range(tokens):
        for j in range(topk):
            index = local[t, j].item()
            want = -1 if index < 0 else table[req[t], index // block_size].item() * block_size + index % block_size
            assert slots[t, j].item() == want
        assert lens[t].item() == ((local[t] >= 0).sum().item() if valid_token[t] else 0)
    assert slots.dtype == torch.int32 and lens.dtype == torch.int32


def test_combine_topk_swa_indices_against_a_loop():
    gen = torch.Generator().manual_seed(5)
    window, ratio, topk, m, n = 8, 4, 16, 1000, 300
    seq_lens = torch.tensor([30, 12], dtype=torch.int32)
    query_start = torch.tensor([5, 9, 21], dtype=torch.int32)  # rebased on its first entry
    gather_lens = torch.tensor([11, 12], dtype=torch.int32)
    tokens = 16
    topk_indices = torch.randint(0, 50, (tokens, topk), generator=gen, dtype=torch.int32)
    combined, lens = vllm_triton_attention.combine_topk_swa_indices(topk_indices, query_start, seq_lens,
                                                                    gather_lens, window, ratio, topk, m, n)
    assert combined.shape == (tokens, 128)
    for t in range(tokens):
        b = 0 if t < 4 else 1
        q_start, q_len = (0, 4) if b == 0 else (4, 12)
        pos = seq_lens[b].item() - q_len + (t - q_start)
        k = min((pos + 1) // ratio, topk)
        swa_start = max(pos - window + 1, 0)
        want = [topk_indices[t, j].item() + m * b for j in range(k)]
        want += [m * b + n + p - (seq_lens[b].item() - gather_lens[b].item()) for p in range(swa_start, pos + 1)]
        assert lens[t].item() == len(want)
        assert combined[t].tolist() == want + [-1] * (128 - len(want))


def test_c128a_topk_metadata_against_a_loop():
    from dsv4_compile.frontend.ops.vllm_metadata_kernels import build_c128a_topk_metadata

    gen = torch.Generator().manual_seed(6)
    width, block_size, ratio = 128, 2, 128
    table = torch.randperm(96, generator=gen).to(torch.int32).view(2, 48)
    positions = torch.tensor([300, 9000, 127, 0, 255, 1000])  # 2 decode tokens, then 4 prefill tokens
    req = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.int32)
    slot_mapping = torch.tensor([5, -1, 1, 2, 3, 4])
    decode = torch.full((4, 256), 99, dtype=torch.int32)
    lens = torch.full((4,), 99, dtype=torch.int32)
    prefill = torch.full((6, 256), 99, dtype=torch.int32)
    build_c128a_topk_metadata(decode, 256, lens, prefill, 256, positions, ratio, width, 2, req, table, 48,
                              block_size, slot_mapping, 1024)
    for t, p in enumerate(positions.tolist()):
        n = min((p + 1) // ratio, width)
        if t < 2:
            want = [table[req[t], j // block_size].item() * block_size + j % block_size if j < n else -1
                    for j in range(width)]
            assert decode[t, :width].tolist() == want
            assert lens[t].item() == (n if slot_mapping[t] >= 0 else 0)
        else:
            assert prefill[t - 2, :width].tolist() == [j if j < n else -1 for j in range(width)]
    assert (decode[:, width:] == 99).all() and (decode[2:] == 99).all() and (prefill[4:] == 99).all()


def test_triton_host_helpers():
    helpers = NO_TRITON["vllm.models.deepseek_v4.attention.triton"]
    assert [helpers.next_power_of_2(v) for v in (0, 1, 2, 3, 64, 65, 512)] == [1, 1, 2, 4, 64, 128, 512]
    assert helpers.cdiv(257, 128) == 3
    assert callable(helpers.jit)  # everything else comes from vLLM's Triton placeholder


def test_fill_short_context_topk_indices_against_a_loop():
    out = torch.full((5, 16), 7, dtype=torch.int32)
    pos = torch.tensor([0, 3, 9, 40, 70])
    standins.GridLaunched(standins.fill_short_context_topk_indices)[(5,)](out, pos, TOP_K=16, COMPRESS_RATIO=4,
                                                                          PADDED_TOP_K=16, num_warps=8)
    for t, p in enumerate(pos.tolist()):
        n = (p + 1) // 4
        assert out[t].tolist() == [j if j < n else -1 for j in range(16)]


# ----------------------------------------------------------------------------- through the backend
@needs_vllm_cpu_kernels
def test_compiled_vllm_compressor_entry_points_match_vllm_cpu():
    """vLLM's own entry points (module globals, as compressor.py calls them) compiled by dsv4_xpu inside
    cuda_compat, which swaps the stand-ins in; the state and compressed caches must match vLLM's CPU kernels."""
    import vllm.models.deepseek_v4.compressor as compressor

    ensure_vllm_ops()
    case = compressor_case(4, 512, 24, seed=7)
    gen = torch.Generator().manual_seed(8)
    kv_score = torch.randn(case.tokens, 2 * case.width, generator=gen)
    ape = torch.randn(4, case.width, generator=gen)

    state_ours, cache_ours = case.state.clone(), case.kv_cache.clone()
    kwargs = standin_kwargs(case, cache_ours)
    kwargs["state_cache"] = state_ours

    def step(kv_score):
        kv, score = kv_score.split([case.width, case.width], dim=-1)
        compressor._SAVE_PARTIAL_STATES_KERNEL(kv=kv, score=score, ape=ape, positions=case.pos,
                                               state_cache=state_ours, slot_mapping=case.state_slots,
                                               block_size=case.state_block, state_width=case.width, compress_ratio=4,
                                               pdl_kwargs={})
        compressor.compress_norm_rope_store_triton(**kwargs)

    with dsv4_compile.cuda_compat("cpu"):
        assert compressor.compress_norm_rope_store_triton is standins.compress_norm_rope_store
        assert compressor._SAVE_PARTIAL_STATES_KERNEL is standins.save_partial_states
        torch.compile(step, backend="dsv4_xpu", fullgraph=True)(kv_score)
    assert compressor.compress_norm_rope_store_triton is not standins.compress_norm_rope_store  # restored

    kv, score = kv_score.split([case.width, case.width], dim=-1)
    torch.ops._C.save_partial_states_cpu(kv, score, ape, case.pos, case.state, case.state_slots)
    theirs = vllm_compress(case)
    assert torch.equal(state_ours, case.state)
    written = case.kv_slots[case.kv_slots >= 0]
    assert written.numel() >= 5
    # Inductor may reorder the fp32 sums: allow a few e4m3 rounding ties (one e4m3 step is <= 1/8 relative).
    got, want = decoded_rows(cache_ours, written, 512), decoded_rows(theirs, written, 512)
    differing = (got != want).float().mean().item()
    assert differing < 0.01, differing
    torch.testing.assert_close(got, want, rtol=0.13, atol=0)

"""The plain-torch stand-ins for vLLM's DeepSeek-V4 attention Triton entry points
(dsv4_compile.frontend.ops.vllm_triton_attention), each against the kernel's contract written here as a
per-element loop in fp64: no vLLM needed."""

import pytest
import torch

from dsv4_compile.frontend.ops.vllm_triton_attention import (
    combine_topk_swa_indices,
    dequantize_and_gather_k_cache,
    fused_q_kv_rmsnorm,
)

# --------------------------------------------------------------------------------------------- fused_q_kv_rmsnorm


def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_fused_q_kv_rmsnorm_is_two_weighted_rms_norms(dtype, rtol):
    # One bf16 rounding of the fp32 result (relative 2^-8), so within 2^-7 of the fp64 value; fp32: 1e-5.
    g = torch.Generator().manual_seed(0)
    qr, kv = (3 * torch.randn(5, 96, generator=g)).to(dtype), torch.randn(5, 40, generator=g).to(dtype)
    qw, kvw = (1 + torch.randn(96, generator=g)).to(dtype), (1 + torch.randn(40, generator=g)).to(dtype)
    eps = 0.5  # large, so that a misplaced eps shows
    q_out, kv_out = fused_q_kv_rmsnorm(qr, kv, qw, kvw, eps)
    assert q_out.dtype == kv_out.dtype == dtype
    torch.testing.assert_close(q_out.double(), rms_norm64(qr, qw, eps), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(kv_out.double(), rms_norm64(kv, kvw, eps), rtol=rtol, atol=1e-6)


def test_fused_q_kv_rmsnorm_zero_tokens():
    q_out, kv_out = fused_q_kv_rmsnorm(torch.empty(0, 8), torch.empty(0, 4), torch.ones(8), torch.ones(4), 1e-6)
    assert q_out.shape == (0, 8) and kv_out.shape == (0, 4)


# ---------------------------------------------------------------------------------- dequantize_and_gather_k_cache
BLOCK, DATA, SCALES = 4, 576, 8
BLOCK_STRIDE = 2600  # > BLOCK * 584: blocks padded, as when cache groups share one page size


def random_cache(num_blocks: int, g: torch.Generator) -> torch.Tensor:
    """A paged cache `[num_blocks, 1, BLOCK, 584]` over padded blocks, every byte random but valid: e4m3 bytes
    without the NaN codes, scale bytes 120..134, rope bytes from finite bf16 values."""
    storage = torch.randint(0, 256, (num_blocks, BLOCK_STRIDE), generator=g, dtype=torch.uint8)
    blocks = storage[:, :BLOCK * 584]
    for b in range(num_blocks):
        for o in range(BLOCK):
            row = blocks[b, o * DATA:(o + 1) * DATA]
            row[:448] = torch.randint(0, 0x7E, (448,), generator=g, dtype=torch.uint8) | (
                torch.randint(0, 2, (448,), generator=g, dtype=torch.uint8) << 7)
            row[448:] = torch.randn(64, generator=g).to(torch.bfloat16).view(torch.uint8)
            scales = blocks[b, BLOCK * DATA + o * SCALES: BLOCK * DATA + (o + 1) * SCALES]
            scales[:7] = torch.randint(120, 135, (7,), generator=g, dtype=torch.uint8)
    return storage.as_strided((num_blocks, 1, BLOCK, 584), (BLOCK_STRIDE, BLOCK * 584, 584, 1))


def decode_token64(cache: torch.Tensor, block: int, offset: int) -> torch.Tensor:
    """Token `offset` of cache block `block`, from the kernel's byte layout, in fp64."""
    flat = torch.as_strided(cache, (cache.shape[0], BLOCK * 584), (cache.stride(0), 1))[block]
    data = flat[offset * DATA:(offset + 1) * DATA]
    scales = flat[BLOCK * DATA + offset * SCALES: BLOCK * DATA + offset * SCALES + 7]
    out = torch.empty(512, dtype=torch.float64)
    for q in range(7):
        values = data[q * 64:(q + 1) * 64].clone().view(torch.float8_e4m3fn).double()
        out[q * 64:(q + 1) * 64] = values * 2.0 ** (int(scales[q]) - 127)
    out[448:] = data[448:].clone().view(torch.bfloat16).double()
    return out


@pytest.mark.parametrize("with_gather_lens", [True, False])
def test_dequantize_and_gather_k_cache_follows_the_kernel_contract(with_gather_lens):
    g = torch.Generator().manual_seed(1)
    cache = random_cache(12, g)
    seq_lens = torch.tensor([9, 3, 0], dtype=torch.int32)
    gather_lens = torch.tensor([5, 3, 0], dtype=torch.int32) if with_gather_lens else None
    block_table = torch.tensor([[7, 2, 11, 0], [4, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    offset, width = 2, 12
    sentinel = -7.0
    out = torch.full((3, width, 512), sentinel, dtype=torch.bfloat16)
    dequantize_and_gather_k_cache(out, cache, seq_lens, gather_lens, block_table, BLOCK, offset)

    expected = torch.full((3, width, 512), sentinel, dtype=torch.float64)
    for r in range(3):
        count = int(seq_lens[r]) if gather_lens is None else int(gather_lens[r])
        for i in range(count):
            pos = int(seq_lens[r]) - count + i
            expected[r, offset + i] = decode_token64(cache, int(block_table[r, pos // BLOCK]), pos % BLOCK)
    # The kernel decodes in fp32 and stores bf16: one bf16 rounding of an exactly representable product.
    torch.testing.assert_close(out.double(), expected.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_dequantize_and_gather_k_cache_refuses_fnuz():
    with pytest.raises(NotImplementedError):
        dequantize_and_gather_k_cache(torch.zeros(1, 1, 512, dtype=torch.bfloat16), random_cache(1, torch.Generator()),
                                      torch.tensor([1]), None, torch.zeros(1, 1, dtype=torch.int32), BLOCK, 0,
                                      use_fnuz=True)


# ------------------------------------------------------------------------------------- combine_topk_swa_indices

def combine64(topk_indices, query_start_loc, seq_lens, gather_lens, window, ratio, topk, m, n, width):
    """The kernel's loop: per request, per query token, top-k entries then the causal window."""
    indices = torch.full((topk_indices.shape[0], width), -1, dtype=torch.int64)
    lens = torch.zeros(topk_indices.shape[0], dtype=torch.int64)
    base = int(query_start_loc[0])
    for b in range(seq_lens.shape[0]):
        first, last = int(query_start_loc[b]) - base, int(query_start_loc[b + 1]) - base
        seq_len, gather_len = int(seq_lens[b]), int(gather_lens[b])
        for t in range(first, last):
            pos = seq_len - (last - first) + (t - first)
            k = min((pos + 1) // ratio, topk) if topk else 0
            start = max(pos - (window - 1), 0)
            row = [int(topk_indices[t, j]) + m * b for j in range(k)]
            row += [m * b + n + p - (seq_len - gather_len) for p in range(start, pos + 1)]
            indices[t, :len(row)] = torch.tensor(row, dtype=torch.int64)
            lens[t] = len(row)
    return indices, lens


@pytest.mark.parametrize("topk, ratio", [(0, 1), (8, 4)])
def test_combine_topk_swa_indices_follows_the_kernel_contract(topk, ratio):
    g = torch.Generator().manual_seed(2)
    window, m, n = 6, 40, 9
    # A chunk of two prefills whose query_start_loc slice starts at 3 (decode tokens before it): rebased.
    query_start_loc = torch.tensor([3, 8, 15], dtype=torch.int32)
    seq_lens = torch.tensor([12, 7], dtype=torch.int32)
    gather_lens = torch.tensor([5 + 5, 7], dtype=torch.int32)  # query 5 + min(prefix 7, window - 1)
    topk_indices = torch.randint(0, 30, (12, max(topk, 16)), generator=g, dtype=torch.int32)
    width = 128
    out = (torch.full((12, width), 99, dtype=torch.int32), torch.full((12,), 99, dtype=torch.int32))
    indices, lens = combine_topk_swa_indices(topk_indices, query_start_loc, seq_lens, gather_lens, window, ratio,
                                             topk, m, n, out=out)
    assert indices is out[0] and lens is out[1]
    expected_indices, expected_lens = combine64(topk_indices, query_start_loc, seq_lens, gather_lens, window,
                                                ratio, topk, m, n, width)
    assert torch.equal(indices.long(), expected_indices)
    assert torch.equal(lens.long(), expected_lens)
    if topk:
        assert int(lens.max()) > window  # the top-k part is exercised


def test_combine_topk_swa_indices_allocates_aligned_rows():
    indices, lens = combine_topk_swa_indices(torch.zeros(3, 512, dtype=torch.int32),
                                             torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3]),
                                             torch.tensor([3]), 128, 1, 0, 0, 0)
    assert indices.shape == (3, 128) and indices.dtype == torch.int32
    assert lens.tolist() == [1, 2, 3]
    assert indices[2, :4].tolist() == [0, 1, 2, -1]

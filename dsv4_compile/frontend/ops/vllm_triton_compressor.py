"""Plain-torch stand-ins for the Triton entry points of DeepSeek-V4's compressor and indexer (compressor.py,
attention.py, nvidia/flashmla.py), for targets without Triton (CPU). Each takes the entry point's own arguments
and fills the same buffers, written from the kernel's contract:

- save_partial_states: state row of slot s (block s // block_size, offset s % block_size) becomes
  `[kv, score + ape[position % compress_ratio]]`; slot -1 is skipped.
- compress -> RMSNorm -> RoPE -> FP8 store: a token at position p with (p + 1) % ratio == 0 compresses the
  window of positions p - W + 1 .. p (W = ratio, or 2 * ratio with overlap; the older half of an overlapping
  window reads the first half of the state row). Per dimension: softmax over the window of the scores
  (positions < 0 are left out), the kv weighted by it, summed; RMSNorm with the weight (fp32); GPT-J RoPE on the
  last rope_head_dim values at position (p // ratio) * ratio; then the cache row at the token's compressed-cache
  slot. Head 512 writes an fp8_ds_mla row (the 448 nope values quantised from their bf16 rounding before RoPE,
  the rope values as bf16); head 128 (indexer) writes 128 e4m3 bytes of the roped, bf16-rounded row under one
  UE8M0 scale stored as fp32 after the data of the block.
- fused_indexer_q_rope_quant (fp8): per token and head, GPT-J RoPE on the last rope dims (bf16-rounded), one
  UE8M0 scale 2**ceil(log2(max(amax, 1e-4) / 448)); the weights become weights * scale * softmax_scale *
  head_scale in fp32.
- compute_global_topk_indices_and_lens: index bookkeeping (see its docstring; combine_topk_swa_indices is in
  vllm_triton_attention.py).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from dsv4_compile.lowering.lowerings.fp8_ds_mla import (
    AMAX_FLOOR,
    E4M3_MAX,
    NOPE_BLOCKS,
    QUANT_BLOCK,
    SCALE_BYTES,
    TOKEN_DATA_BYTES,
    UE8M0_BIAS,
    scatter_paged_rows,
    token_major_regions,
)
from dsv4_compile.lowering.lowerings.kv_cache import gptj_rope_tail

INDEXER_SCALE_BYTES = 4  # one fp32 scale per indexer row


def save_partial_states(
    kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor, state_cache: torch.Tensor,
    slot_mapping: torch.Tensor, block_size: int, state_width: int, compress_ratio: int,
    pdl_kwargs: dict | None = None,
) -> None:
    """Write `[kv, score + ape[pos % ratio]]` (each `head = kv.shape[-1]` wide) at each token's state slot."""
    count = slot_mapping.shape[0]
    head = kv.shape[-1]
    ape_rows = ape.index_select(0, positions[:count].long() % compress_ratio)
    scores = score[:count].to(state_cache.dtype) + ape_rows.to(state_cache.dtype)
    row = state_cache.shape[-1]
    regions = [(0, row, head), (state_width, row, head)]
    scatter_paged_rows(state_cache, regions, torch.cat([kv[:count].to(state_cache.dtype), scores], dim=-1),
                       slot_mapping, block_size)


def _compressed_rows(
    state_cache: torch.Tensor, count: int, token_to_req_indices: torch.Tensor, positions: torch.Tensor,
    block_table: torch.Tensor, block_size: int, state_width: int, head_dim: int, compress_ratio: int, overlap: bool,
    rms_norm_weight: torch.Tensor, rms_norm_eps: float,
) -> torch.Tensor:
    """`[count, head_dim]` fp32: each token's window of states, softmax-pooled, then RMS-normalised."""
    window = (1 + int(overlap)) * compress_ratio
    taps = torch.arange(window, device=positions.device)
    window_positions = positions[:count].long().unsqueeze(-1) - window + 1 + taps  # [N, W]
    inside = window_positions >= 0
    safe = window_positions.clamp_min(0)
    requests = token_to_req_indices[:count].long().unsqueeze(-1).expand_as(safe)
    blocks = block_table.long()[requests, safe // block_size]
    rows = state_cache[blocks, safe % block_size].float()  # [N, W, 2 * state_width]
    # With overlap the older `compress_ratio` positions read the first half of their state rows.
    half = (taps >= compress_ratio).long() * head_dim
    columns = half.unsqueeze(-1) + torch.arange(head_dim, device=positions.device)  # [W, head_dim]
    columns = columns.unsqueeze(0).expand(count, -1, -1)
    kv = rows.gather(-1, columns).masked_fill(~inside.unsqueeze(-1), 0.0)
    score = rows.gather(-1, columns + state_width).masked_fill(~inside.unsqueeze(-1), float("-inf"))
    pooled = (kv * torch.softmax(score, dim=1)).sum(dim=1)
    variance = pooled.square().mean(dim=-1, keepdim=True)
    return pooled * torch.rsqrt(variance + rms_norm_eps) * rms_norm_weight.float()


def _ue8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(AMAX_FLOOR) / E4M3_MAX)))


def _write_ds_mla_rows(kv_cache: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor) -> None:
    """fp8_ds_mla rows (see lowerings/fp8_ds_mla.py) at `slots`: nope `[N, 448]` in 7 UE8M0-scaled e4m3 blocks,
    rope `[N, 64]` as bf16, then the 7 scale bytes and a zero byte."""
    blocks = nope.reshape(nope.shape[0], NOPE_BLOCKS, QUANT_BLOCK)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR) / E4M3_MAX))
    values = (blocks / torch.exp2(exponent)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    scale_bytes = (exponent.squeeze(-1) + UE8M0_BIAS).clamp(0, 255).to(torch.uint8)
    padding = scale_bytes.new_zeros(nope.shape[0], SCALE_BYTES - NOPE_BLOCKS)
    rows = torch.cat([values.view(torch.uint8).reshape(nope.shape[0], -1),
                      rope.to(torch.bfloat16).view(torch.uint8), scale_bytes, padding], dim=-1)
    block_size = kv_cache.shape[1]
    scatter_paged_rows(kv_cache, token_major_regions(block_size, (TOKEN_DATA_BYTES, SCALE_BYTES)), rows, slots,
                       block_size)


def _write_indexer_rows(kv_cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantise `rows [N, 128]` (fp32) to e4m3 under one power-of-two scale each and write them, with the scale
    as fp32 after the block's data, at `slots` of the paged indexer cache `[blocks, block_size, 132]`."""
    scale = _ue8m0_scale(rows.abs().amax(dim=-1, keepdim=True))
    values = (rows / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    packed = torch.cat([values, scale.view(torch.uint8)], dim=-1)
    block_size = kv_cache.shape[1]
    regions = token_major_regions(block_size, (rows.shape[-1], INDEXER_SCALE_BYTES))
    scatter_paged_rows(kv_cache, regions, packed, slots, block_size)


def compress_norm_rope_store(
    state_cache: torch.Tensor, num_actual: int, token_to_req_indices: torch.Tensor, positions: torch.Tensor,
    slot_mapping: torch.Tensor, block_table: torch.Tensor, block_size: int, state_width: int,
    cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, k_cache_metadata: Any, pdl_kwargs: dict, head_dim: int,
    rope_head_dim: int, compress_ratio: int, overlap: bool, use_fp4_cache: bool, rms_norm_weight: torch.Tensor,
    rms_norm_eps: float, quant_block: int, token_stride: int, scale_dim: int, **two_stage: object,
) -> None:
    """Stand-in for compress_norm_rope_store_triton and its two-stage variant (same result; the two-stage
    split's `num_decode_tokens` / `compress_scratch` only schedule work)."""
    if use_fp4_cache:
        raise NotImplementedError("the MXFP4 indexer cache (Blackwell only) has no plain-torch stand-in")
    if head_dim not in (128, 512):
        raise NotImplementedError(f"compressor head_dim {head_dim}: only 512 (fp8_ds_mla) and 128 (indexer)")
    count = num_actual
    if count == 0:
        return
    token_positions = positions[:count].long()
    normed = _compressed_rows(state_cache, count, token_to_req_indices, positions, block_table, block_size,
                              state_width, head_dim, compress_ratio, overlap, rms_norm_weight, rms_norm_eps)
    rope_positions = torch.div(token_positions, compress_ratio, rounding_mode="floor") * compress_ratio
    roped = gptj_rope_tail(normed, rope_positions, cos_sin_cache, rope_head_dim)
    boundary = (token_positions + 1) % compress_ratio == 0
    cache_slots = k_cache_metadata.slot_mapping[:count].long()
    slots = torch.where(boundary & (slot_mapping[:count] >= 0), cache_slots, -1)
    if head_dim == 512:
        nope = head_dim - rope_head_dim
        _write_ds_mla_rows(kv_cache, normed[:, :nope].to(torch.bfloat16).float(), roped[:, nope:], slots)
    else:
        _write_indexer_rows(kv_cache, roped.to(torch.bfloat16).float(), slots)


def fused_indexer_q_rope_quant(
    positions: torch.Tensor, index_q: torch.Tensor, index_q_cos_sin_cache: torch.Tensor,
    index_weights: torch.Tensor, index_weights_softmax_scale: float, index_weights_head_scale: float,
    use_fp4: bool = False, weights_out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as e4m3 `[T, H, D]`, weights * q_scale * softmax_scale * head_scale `[T, H]` in weights_out_dtype)."""
    if use_fp4:
        raise NotImplementedError("the MXFP4 indexer query (Blackwell only) has no plain-torch stand-in")
    rope_dim = index_q_cos_sin_cache.shape[-1]
    roped = gptj_rope_tail(index_q.float(), positions, index_q_cos_sin_cache, rope_dim)
    nope = index_q.shape[-1] - rope_dim
    q = torch.cat([roped[..., :nope], roped[..., nope:].to(torch.bfloat16).float()], dim=-1)
    scale = _ue8m0_scale(q.abs().amax(dim=-1))  # [T, H]
    q_fp8 = (q / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    weights = index_weights.float() * scale * index_weights_softmax_scale * index_weights_head_scale
    return q_fp8, weights.to(weights_out_dtype)


def compute_global_topk_indices_and_lens(
    topk_indices: torch.Tensor, token_to_req_indices: torch.Tensor, block_table: torch.Tensor, block_size: int,
    is_valid_token: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Request-local indices (-1: none) -> global cache slots through the token's block-table row (-1 kept);
    lengths = count of valid entries, 0 for tokens not valid."""
    count = topk_indices.shape[0]
    valid = topk_indices >= 0
    local = topk_indices.long().clamp_min(0)
    requests = token_to_req_indices[:count].long().unsqueeze(-1).expand_as(local)
    blocks = block_table.long()[requests, torch.div(local, block_size, rounding_mode="floor")]
    slots = torch.where(valid, blocks * block_size + local % block_size, -1).to(topk_indices.dtype)
    lens = torch.where(is_valid_token[:count].bool(), valid.sum(dim=-1), 0).to(torch.int32)
    return slots, lens


def fill_short_context_topk_indices(output: torch.Tensor, positions: torch.Tensor, TOP_K: int,
                                    COMPRESS_RATIO: int, PADDED_TOP_K: int, **launch: object) -> None:
    """Row t of `output` (rows of TOP_K): 0 .. (p_t + 1) // ratio - 1, then -1 (every candidate selected)."""
    count = positions.shape[0]
    rows = output.view(-1)[:count * TOP_K].view(count, TOP_K)
    columns = torch.arange(TOP_K, device=positions.device)
    available = torch.div(positions.long() + 1, COMPRESS_RATIO, rounding_mode="floor").unsqueeze(-1)
    rows.copy_(torch.where(columns < available, columns, -1).to(output.dtype))


class GridLaunched:
    """A stand-in launched the way a Triton kernel is, `kernel[grid](...)`; the grid is ignored."""

    def __init__(self, function: Callable[..., None]) -> None:
        self.function = function

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return self.function

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.function(*args, **kwargs)


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1), as triton.next_power_of_2."""
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


class TritonHostHelpers(types.ModuleType):
    """Stands in for the `triton` placeholder module of a Triton-less vLLM build: the same attributes plus the
    host-side helpers vLLM calls outside kernels (`triton.next_power_of_2`, attention.py:1104, sparse_mla.py:255),
    which the placeholder lacks."""

    def __init__(self) -> None:
        super().__init__("triton")
        self.next_power_of_2 = next_power_of_2
        self.cdiv = lambda a, b: -(-a // b)

    def __getattr__(self, name: str) -> object:
        from vllm.triton_utils.importing import TritonPlaceholder

        return getattr(TritonPlaceholder(), name)


# What dsv4_compile.vllm_constructs rebinds `triton` and `_fill_short_context_topk_indices` to (the other rows
# name functions of this module).
TRITON_HOST_HELPERS = TritonHostHelpers()
FILL_SHORT_CONTEXT_TOPK_INDICES = GridLaunched(fill_short_context_topk_indices)

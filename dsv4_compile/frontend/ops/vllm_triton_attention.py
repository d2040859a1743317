"""Plain-torch stand-ins for vLLM's DeepSeek-V4 attention Triton entry points, for targets without Triton (CPU).

Each is written from the kernel's contract (what it reads, what it writes, in which layout) and traces into
the graph without data-dependent shapes: per-request lengths become masks over the buffer's static width.
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.fp8_ds_mla import read_fp8_ds_mla_slots

# combine_topk_swa_indices rounds its index rows up to a multiple of this (cache_utils.py).
SPARSE_PREFILL_TOPK_ALIGNMENT = 128


def _weighted_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 throughout (x, 1/rms and the weight), one cast at the end: the kernel's rounding.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def fused_q_kv_rmsnorm(
    qr: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, kv_weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two weighted RMSNorms over the last dim, `qr [T, q]` with `q_weight` and `kv [T, kv]` with `kv_weight`;
    new tensors in the inputs' dtypes."""
    return _weighted_rms_norm(qr, q_weight, eps), _weighted_rms_norm(kv, kv_weight, eps)


def dequantize_and_gather_k_cache(
    out: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, gather_lens: torch.Tensor | None,
    block_table: torch.Tensor, block_size: int, offset: int, use_fnuz: bool = False,
) -> None:
    """Fill `out [num_reqs, width, 512]` from a paged fp8_ds_mla cache: for request r, the last
    `gather_lens[r]` (all, when None) of its `seq_lens[r]` positions, decoded, go to rows `offset, offset + 1,
    ...` of `out[r]`, in position order; `block_table [num_reqs, max_blocks]` maps a position's block
    (`pos // block_size`) to its cache block. Other rows of `out` keep their values."""
    if use_fnuz:
        raise NotImplementedError("the FNUZ fp8 variant of the DeepSeek-V4 cache (gfx942) has no stand-in")
    num_reqs = seq_lens.shape[0]
    width = out.shape[1] - offset
    lengths = (seq_lens if gather_lens is None else gather_lens).to(torch.int64)
    step = torch.arange(width, device=out.device)
    positions = (seq_lens.to(torch.int64) - lengths).unsqueeze(1) + step
    inside = step < lengths.unsqueeze(1)
    positions = torch.where(inside, positions, 0)
    blocks = block_table[:num_reqs].gather(1, (positions // block_size).clamp(max=block_table.shape[1] - 1))
    slots = torch.where(inside, blocks.to(torch.int64) * block_size + positions % block_size, -1)
    rows = read_fp8_ds_mla_slots(k_cache, slots, block_size).to(out.dtype)
    target = out[:num_reqs, offset:]
    target.copy_(torch.where(inside.unsqueeze(-1), rows, target))


def combine_topk_swa_indices(
    topk_indices: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, gather_lens: torch.Tensor,
    window_size: int, compress_ratio: int, topk: int, M: int, N: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None, left_visible: torch.Tensor | None = None,
    right_visible: torch.Tensor | None = None, max_image_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prefill query token, the rows it attends to in the gather buffer that dequantize_and_gather_k_cache
    filled (request b's rows start at `M * b`; its compressed entries at 0, its window at `N`): first its
    `min((pos + 1) // compress_ratio, topk)` top-k entries (`topk_indices[t] + M * b`), then its causal window
    `[max(pos - window_size + 1, 0), pos]` (widened by `left_visible`/`right_visible` in image spans) as
    `M * b + N + position - (seq_len - gather_len)`; -1 after. Returns (indices `[T, width]` int32, lengths
    `[T]` int32), written into `out` when given. `query_start_loc` is this chunk's slice (rebased to its
    first entry)."""
    num_tokens = topk_indices.shape[0]
    device = topk_indices.device
    if out is None:
        width = -(-(topk + window_size + max_image_tokens) // SPARSE_PREFILL_TOPK_ALIGNMENT)
        width *= SPARSE_PREFILL_TOPK_ALIGNMENT
        out = (torch.empty(num_tokens, width, dtype=torch.int32, device=device),
               torch.empty(num_tokens, dtype=torch.int32, device=device))
    combined_indices, combined_lens = out
    starts = (query_start_loc - query_start_loc[0]).to(torch.int64)
    token = torch.arange(num_tokens, device=device)
    request = torch.searchsorted(starts[1:], token, right=True).clamp(max=seq_lens.shape[0] - 1)
    in_batch = token < starts[-1]
    query_len = starts[request + 1] - starts[request]
    seq_len = seq_lens.to(torch.int64)[request]
    position = seq_len - query_len + token - starts[request]
    gather_start = seq_len - gather_lens.to(torch.int64)[request]
    if topk > 0:
        topk_len = ((position + 1) // compress_ratio).clamp(max=topk)
    else:
        topk_len = torch.zeros_like(position)
    left = left_visible.to(torch.int64) if left_visible is not None else torch.zeros_like(position)
    right = right_visible.to(torch.int64) if right_visible is not None else torch.zeros_like(position)
    window_start = (position - (window_size - 1) - (left - (window_size - 1)).clamp(min=0)).clamp(min=0)
    window_len = position + right - window_start + 1
    column = torch.arange(combined_indices.shape[1], device=device)
    base = M * request
    if topk > 0 and topk_indices.shape[1] > 0:
        picked = topk_indices.gather(1, column.clamp(max=topk_indices.shape[1] - 1).expand(num_tokens, -1))
    else:
        picked = torch.zeros(num_tokens, combined_indices.shape[1], dtype=torch.int64, device=device)
    in_window = column - topk_len.unsqueeze(1)
    indices = torch.where(
        column < topk_len.unsqueeze(1), picked.to(torch.int64) + base.unsqueeze(1),
        torch.where((in_window >= 0) & (in_window < window_len.unsqueeze(1)),
                    (base + N + window_start - gather_start).unsqueeze(1) + in_window, -1))
    indices = torch.where(in_batch.unsqueeze(1), indices, -1)
    combined_indices.copy_(indices.to(combined_indices.dtype))
    combined_lens.copy_(torch.where(in_batch, topk_len + window_len, 0).to(combined_lens.dtype))
    return combined_indices, combined_lens

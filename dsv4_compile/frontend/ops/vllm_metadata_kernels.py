"""Plain-torch stand-ins for the Triton kernels vLLM's DeepSeek-V4 metadata builders launch.

vLLM's CPU build expects triton-cpu for these (platforms/cpu.py warns "triton-cpu is expected on x86 CPUs");
without it each launch is a placeholder and every metadata build fails ("'function' object is not
subscriptable", v1/attention/ops/metadata.py:43), for vLLM's CPU port as for its NVIDIA path. Each stand-in is
written from the kernel's contract (its arguments, in the kernel's own order, are what vLLM's
`register_kernels` forwards), for batches of several requests without images, replay or context parallelism;
it fills the same output buffers the kernel fills. They run eagerly, while the model runner builds metadata,
outside any compiled region. The vLLM plugin registers them (register_metadata_kernels) where vLLM has no
Triton.
"""

from __future__ import annotations

from typing import Any

import torch


def _token_request_mapping(query_start_loc, output, num_reqs, num_mapped, num_tokens, **launch: Any) -> None:
    tokens = torch.arange(output.shape[0] if num_tokens is None else num_tokens)
    ends = query_start_loc[1: num_reqs + 1].to(torch.int64)
    requests = torch.searchsorted(ends, tokens, right=True).clamp(max=num_reqs - 1)
    output[: tokens.shape[0]] = torch.where(tokens < num_mapped, requests, 0).to(output.dtype)


def _prefill_gather_lens(gather_lens, seq_lens, query_start_loc, replay_start, num_prefills, num_decodes,
                         window_size, block_size) -> None:
    rows = slice(num_decodes, num_decodes + num_prefills)
    query_lens = query_start_loc[num_decodes + 1: num_decodes + num_prefills + 1] - query_start_loc[rows]
    visible_prefix = (seq_lens[rows] - query_lens - replay_start[rows]).clamp(min=0)
    gather_lens[:num_prefills] = (query_lens + visible_prefix.clamp(max=window_size - 1)).to(gather_lens.dtype)


def _swa_indices_and_lens(swa_indices, indices_stride, swa_lens, window_size, index_width, left_visible,
                          right_visible, query_start_loc, seq_lens, token_to_req, is_valid_token, block_table,
                          block_table_stride, block_size, replay_start, token_offset, has_image, triton_block) -> None:
    """Row r (token token_offset + r): the cache slots of its causal window, -1 padded; its window length."""
    assert not has_image, "image spans are not built by this harness"
    rows = min(swa_lens.shape[0], is_valid_token.shape[0] - token_offset)
    tokens = torch.arange(token_offset, token_offset + rows)
    requests = token_to_req[tokens].to(torch.int64)
    query_lens = query_start_loc[requests + 1] - query_start_loc[requests]
    positions = (seq_lens[requests] - query_lens + tokens - query_start_loc[requests]).to(torch.int64)
    starts = torch.maximum((positions - (window_size - 1)).clamp(min=0), replay_start[requests].to(torch.int64))
    lengths = positions + 1 - starts
    offsets = torch.arange(index_width)
    window = starts[:, None] + offsets
    inside = offsets < lengths[:, None]
    blocks = block_table[requests[:, None], (window // block_size).clamp(max=block_table.shape[1] - 1)]
    slots = torch.where(inside, blocks.to(torch.int64) * block_size + window % block_size, -1)
    valid = is_valid_token[tokens]
    swa_indices.view(-1, indices_stride)[:rows, :index_width] = torch.where(valid[:, None], slots, -1).to(
        swa_indices.dtype)
    swa_lens[:rows] = torch.where(valid, lengths, 0).to(swa_lens.dtype)


def _compressed_slot_mapping(compressed, slot_mapping, query_start_loc, seq_lens, block_table, block_table_stride,
                             block_size, dcp_world_size, cp_interleave, ratio, pad_id, triton_block) -> None:
    """The last token of every `ratio` consecutive positions writes its compressed state's slot; others pad."""
    assert dcp_world_size == 1
    for request in range(query_start_loc.shape[0] - 1):
        first, end = int(query_start_loc[request]), int(query_start_loc[request + 1])
        positions = int(seq_lens[request]) - (end - first) + torch.arange(end - first)
        states = positions // ratio
        slots = block_table[request, states // block_size].to(torch.int64) * block_size + states % block_size
        valid = ((positions + 1) % ratio == 0) & (slot_mapping[first:end] != pad_id)
        compressed[first:end] = torch.where(valid, slots, pad_id).to(compressed.dtype)


def _prefill_chunk_metadata(query_start_loc, seq_lens, cu_compressed_lens, row_starts, token_to_seq, starts, ends,
                            slice_start, slice_stop, dcp_rank, dcp_world, dcp_interleave, block, ratio) -> None:
    """Per query token: the [start, end) row range of its request's visible compressed entries; per compressed
    entry: its request."""
    assert dcp_world == 1
    for request in range(seq_lens.shape[0]):
        first, end = int(query_start_loc[request]), int(query_start_loc[request + 1])
        offsets = torch.arange(end - first)
        visible = (int(seq_lens[request]) - (end - first) + 1 + offsets) // ratio
        keep = (first + offsets >= slice_start) & (first + offsets < slice_stop)
        out = first + offsets[keep] - slice_start
        starts[out] = int(row_starts[request])
        ends[out] = (int(row_starts[request]) + visible[keep]).to(ends.dtype)
        token_to_seq[int(cu_compressed_lens[request]): int(cu_compressed_lens[request + 1])] = request


def build_c128a_topk_metadata(
    global_decode_ptr: torch.Tensor, global_decode_stride: int, decode_lens_ptr: torch.Tensor,
    prefill_local_ptr: torch.Tensor, prefill_local_stride: int, positions_ptr: torch.Tensor, compress_ratio: int,
    max_compressed_tokens: int, num_decode_tokens: int, token_to_req_indices_ptr: torch.Tensor,
    block_table_ptr: torch.Tensor, block_table_stride: int, block_size: int, slot_mapping_ptr: torch.Tensor,
    BLOCK_SIZE: int,
) -> None:
    """Token t at position p has n = min((p + 1) // ratio, width) compressed entries (width =
    max_compressed_tokens). Decode tokens (t < num_decode_tokens): row t of the global buffer gets the cache
    slots of local entries 0..n-1 through the token's block-table row, -1 after; its length is n, 0 when its
    slot is -1. Prefill tokens: row t - num_decode_tokens of the prefill buffer gets 0..n-1, then -1."""
    width = max_compressed_tokens
    positions = positions_ptr.long()
    counts = torch.clamp(torch.div(positions + 1, compress_ratio, rounding_mode="floor"), max=width)
    offsets = torch.arange(width)
    inside = offsets < counts.unsqueeze(-1)
    decodes = num_decode_tokens
    if decodes > 0:
        requests = token_to_req_indices_ptr[:decodes].long().unsqueeze(-1)
        blocks = torch.div(offsets, block_size, rounding_mode="floor").clamp(max=block_table_ptr.shape[1] - 1)
        slots = block_table_ptr.long()[requests, blocks] * block_size + offsets % block_size
        global_decode_ptr[:decodes, :width] = torch.where(inside[:decodes], slots, -1).to(global_decode_ptr.dtype)
        valid = slot_mapping_ptr[:decodes] >= 0
        decode_lens_ptr[:decodes] = torch.where(valid, counts[:decodes], 0).to(decode_lens_ptr.dtype)
    prefills = positions.shape[0] - decodes
    if prefills > 0:
        local = torch.where(inside[decodes:], offsets, -1)
        prefill_local_ptr[:prefills, :width] = local.to(prefill_local_ptr.dtype)


def register_metadata_kernels() -> None:
    """Give vLLM's metadata builders the plain-torch kernels above (the metadata-kernel rows of
    dsv4_compile.vllm_constructs), through vLLM's own override registry,
    where vLLM has no Triton (process-wide; a kernel someone registered already is left to them)."""
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import _registry, register_kernels

    from dsv4_compile.vllm_constructs import metadata_kernel_standins, resolve

    if not HAS_TRITON:
        register_kernels({name: resolve(impl) for name, impl in metadata_kernel_standins().items()
                          if name not in _registry})

"""Harness extension for the compressed (ratio 128, "C128A") NVIDIA layers: a plain-torch stand-in for the
Triton kernel DeepseekV4FlashMLAMetadataBuilder launches to build C128A top-k metadata
(sparse_mla.py:348, BuildC128ATopkMetadataKernel), registered through vLLM's own override registry as
dsv4_metadata_kernels does for the other builders' kernels.

`triton.next_power_of_2` (sparse_mla.py:255) is not here: cuda_compat's `triton` substitute
(dsv4_compile.frontend.ops.vllm_triton_compressor.TritonHostHelpers) provides it, so build the metadata inside
`cuda_compat(...)` (the NVIDIA builders need that anyway, for get_mla_metadata).
"""

from __future__ import annotations

import torch

C128A_KERNEL = "vllm.models.deepseek_v4.sparse_mla.BuildC128ATopkMetadataKernel.kernel"


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


def register_c128a_metadata_kernel() -> None:
    """Give the C128A metadata builder the stand-in above (process-wide; only where vLLM has no Triton)."""
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import _registry, register_kernels

    if not HAS_TRITON and C128A_KERNEL not in _registry:
        register_kernels({C128A_KERNEL: build_c128a_topk_metadata})

"""Attention family: sparse MQA decode over gathered latent keys (one latent is K and V), with a learned
per-head sink; the CUDA tile-scheduler arguments are dropped (the native math needs no work schedule), so
the scheduler that made them goes too."""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering


def sparse_attention_with_sink(
    q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """`q [B, H, D]` over `keys [B, K, D]` (`valid [B, K]`): softmax over the valid scores and the sink
    logit `sink [H]`, the sink's share discarded. fp32 math; returns `[B, H, D]` fp32."""
    scores = torch.einsum("bhd,bkd->bhk", q.float(), keys) * scale
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    normaliser = torch.logaddexp(torch.logsumexp(scores, dim=-1, keepdim=True), sink.float().view(1, -1, 1))
    return torch.einsum("bhk,bkd->bhd", torch.exp(scores - normaliser), keys)


@native_lowering("dsv4_cuda::sparse_decode", ignores=("tile_scheduler_metadata", "num_splits"))
def sparse_decode_native(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """`q [B, H, D]` attends to the rows `indices [B, K]` (-1: none) of `kv [N, D]`; output in q's dtype."""
    valid = indices >= 0
    keys = kv.index_select(0, indices.clamp_min(0).flatten().long()).view(*indices.shape, kv.shape[-1]).float()
    return sparse_attention_with_sink(q, keys, valid, attn_sink, scale).to(q.dtype)

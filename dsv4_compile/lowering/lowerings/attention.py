"""Attention family: sparse MQA decode over gathered latent keys (one latent is K and V), with a learned
per-head sink; the CUDA tile-scheduler arguments are dropped (the native math needs no work schedule), so
the scheduler that made them goes too."""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering


def attend_with_sink(
    q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor | None, scale: float, d_v: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q [N, H, D]` over `keys [N, K, D]` (fp32) where `valid [N, K]`, the sink logit broadcast to `[N, H]`.
    Returns (output `[N, H, d_v]` fp32, max scaled logit `[N, H]` (-inf with no valid key), log-sum-exp
    `[N, H]` (+inf with no valid key))."""
    # A masked slot may point at never-written cache bytes (NaN): its zero weight must not meet a NaN.
    keys = keys.masked_fill(~valid.unsqueeze(-1), 0.0)
    scores = torch.einsum("nhd,nkd->nhk", q.float(), keys) * scale
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    if keys.shape[1] > 0:
        max_logits = scores.amax(dim=-1)
    else:
        max_logits = torch.full_like(lse, float("-inf"))
    normaliser = lse if sink is None else torch.logaddexp(lse, sink.float())
    # -inf: nothing to attend to (and no sink); +inf makes every weight, hence the output, zero.
    normaliser = normaliser.masked_fill(normaliser == float("-inf"), float("inf"))
    weights = torch.exp(scores - normaliser.unsqueeze(-1))
    out = torch.einsum("nhk,nkd->nhd", weights, keys[..., :d_v])
    return out, max_logits, lse.masked_fill(lse == float("-inf"), float("inf"))


@native_lowering("dsv4_cuda::sparse_decode", ignores=("tile_scheduler_metadata", "num_splits"))
def sparse_decode_native(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """`q [B, H, D]` attends to the rows `indices [B, K]` (-1: none) of `kv [N, D]`; output in q's dtype."""
    valid = indices >= 0
    keys = kv.index_select(0, indices.clamp_min(0).flatten().long()).view(*indices.shape, kv.shape[-1]).float()
    return attend_with_sink(q, keys, valid, attn_sink, scale, kv.shape[-1])[0].to(q.dtype)

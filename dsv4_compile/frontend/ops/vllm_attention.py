"""FlashMLA's sparse attention ops (`_flashmla_C`), which vLLM's CPU build lacks, with FlashMLA's exact
schemas and shape-only fakes; and the substitutes of vLLM's FlashMLA entry points
(vllm.v1.attention.ops.flashmla), which in a CPU build only raise, by calls of those ops.

The substitutes pass no tile-scheduler metadata: the native lowering
(dsv4_compile.lowering.lowerings.flashmla) needs no work schedule.
"""

from __future__ import annotations

import torch

SPARSE_DECODE_SCHEMA = (
    "sparse_decode_fwd(Tensor q, Tensor kv, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
    "Tensor(a)? tile_scheduler_metadata, Tensor(b)? num_splits, Tensor? extra_kv, Tensor? extra_indices, "
    "Tensor? extra_topk_length, int d_v, float sm_scale, Tensor(c!)? out_) -> (Tensor(c!), Tensor, Tensor(a)?, "
    "Tensor(b)?)"
)
SPARSE_PREFILL_SCHEMA = (
    "sparse_prefill_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v, Tensor? attn_sink, "
    "Tensor? topk_length, Tensor(a!)? out_) -> Tensor[]"
)


def _sparse_decode_fake(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None, tile_scheduler_metadata: torch.Tensor | None, num_splits: torch.Tensor | None,
    extra_kv: torch.Tensor | None, extra_indices: torch.Tensor | None, extra_topk_length: torch.Tensor | None,
    d_v: int, sm_scale: float, out_: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    b, s_q, h_q = q.shape[:3]
    out = out_ if out_ is not None else torch.empty(b, s_q, h_q, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    return out, lse, tile_scheduler_metadata, num_splits


def _sparse_prefill_fake(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
    attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None, out_: torch.Tensor | None,
) -> list[torch.Tensor]:
    s_q, h_q = q.shape[:2]
    out = out_ if out_ is not None else torch.empty(s_q, h_q, d_v, dtype=q.dtype, device=q.device)
    stats = [torch.empty(s_q, h_q, dtype=torch.float32, device=q.device) for _ in range(2)]
    return [out, *stats]


DEFINITIONS = [
    ("_flashmla_C::sparse_decode_fwd", SPARSE_DECODE_SCHEMA, _sparse_decode_fake),
    ("_flashmla_C::sparse_prefill_fwd", SPARSE_PREFILL_SCHEMA, _sparse_prefill_fake),
]


def flash_mla_with_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
    head_dim_v: int, tile_scheduler_metadata: object, num_splits: None = None, softmax_scale: float | None = None,
    causal: bool = False, is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None, extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None, topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode entry point, sparse mode only: (out `[b, s_q, h_q, head_dim_v]`, lse `[b, h_q, s_q]`)."""
    if indices is None:
        raise NotImplementedError("dense FlashMLA decode (indices=None) has no native lowering")
    if causal or not is_fp8_kvcache:
        raise ValueError("sparse FlashMLA decode needs causal=False and is_fp8_kvcache=True")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    result, lse, _, _ = torch.ops._flashmla_C.sparse_decode_fwd(
        q, k_cache, indices, topk_length, attn_sink, None, None, extra_k_cache, extra_indices_in_kvcache,
        extra_topk_length, head_dim_v, softmax_scale, out)
    return result, lse


def flash_mla_sparse_fwd(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
    attn_sink: torch.Tensor | None = None, topk_length: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashMLA's sparse prefill entry point: (out `[s_q, h_q, d_v]`, max_logits `[s_q, h_q]`, lse `[s_q, h_q]`)."""
    result, max_logits, lse = torch.ops._flashmla_C.sparse_prefill_fwd(
        q, kv, indices, sm_scale, d_v, attn_sink, topk_length, out)
    return result, max_logits, lse


def get_mla_metadata(*args: object, **kwargs: object) -> tuple[object, None]:
    """FlashMLA's tile-scheduler planner, short-circuited: (an empty `FlashMLASchedMeta()`, FlashMLA's own
    metadata class, None). The native decode lowering needs no work schedule, and the flash_mla_with_kvcache
    substitute above drops it."""
    from vllm.v1.attention.ops.flashmla import FlashMLASchedMeta

    return FlashMLASchedMeta(), None

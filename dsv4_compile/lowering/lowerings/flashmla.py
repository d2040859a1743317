"""FlashMLA's sparse attention kernels (`_flashmla_C::sparse_decode_fwd`, `sparse_prefill_fwd`) in plain torch.

Both are multi-query attention over latent rows that serve as keys and values (the first `d_v` dims are the
value), restricted per query to the rows its `indices` pick: a negative index, an index past the cache, or a
slot at or after `topk_length` attends to nothing. A learned per-head sink logit joins the softmax's
denominator only, so it shrinks the output and never changes the returned log-sum-exp. The log-sum-exp is the
natural log of the sum of exp(scaled score) over the valid keys, +inf for a query with no valid key (whose
output is zero). The decode's tile-scheduler metadata and split count are a CUDA work schedule: dropped.

The decode reads DeepSeek-V4's "fp8_ds_mla" paged cache, uint8 `[num_blocks, block_size, 1, 584]`: a page
block holds `block_size` data rows (448 FP8 e4m3 "nope" values, then 64 bf16 rope values: 576 bytes) followed
by `block_size` scale rows (8 bytes: 7 UE8M0 exponents, one per 64 nope values, and a pad byte). An index
names `block * block_size + offset` in that cache.
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.attention import attend_with_sink
from dsv4_compile.lowering.lowerings.fp8_ds_mla import BYTES_PER_TOKEN, read_fp8_ds_mla_slots
from dsv4_compile.lowering.registry import native_lowering

DECODE_SCHEDULE = ("tile_scheduler_metadata", "num_splits")


def valid_slots(indices: torch.Tensor, rows: int, lengths: torch.Tensor | None) -> torch.Tensor:
    """Which of `indices [..., K]` name a row of a cache of `rows` rows and lie within `lengths` (broadcast
    against `indices[..., 0]`)."""
    valid = (indices >= 0) & (indices < rows)
    if lengths is not None:
        slot = torch.arange(indices.shape[-1], device=indices.device)
        valid = valid & (slot < lengths.unsqueeze(-1))
    return valid


def check_sparse_decode(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None, tile_scheduler_metadata: torch.Tensor | None, num_splits: torch.Tensor | None,
    extra_kv: torch.Tensor | None, extra_indices: torch.Tensor | None, extra_topk_length: torch.Tensor | None,
    d_v: int, sm_scale: float, out_: torch.Tensor | None,
) -> None:
    """The decode kernel's contract: q `[b, s_q, h_q, d]`, fp8_ds_mla caches, indices `[b, s_q, topk]`."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, s_q, h_q, head_dim], got {tuple(q.shape)}")
    b, s_q, h_q, _ = q.shape
    for name, cache, picks, lengths in (("kv", kv, indices, topk_length),
                                        ("extra_kv", extra_kv, extra_indices, extra_topk_length)):
        if cache is None:
            if picks is not None or lengths is not None:
                raise ValueError(f"{name} is None but its indices or lengths are given")
            continue
        if cache.dim() != 4 or cache.shape[2] != 1 or cache.shape[3] != BYTES_PER_TOKEN:
            raise ValueError(f"{name} must be a fp8_ds_mla cache [blocks, block_size, 1, "
                             f"{BYTES_PER_TOKEN}], got {tuple(cache.shape)}")
        if cache.element_size() != 1:
            raise ValueError(f"{name} must hold bytes, got {cache.dtype}")
        if picks is None or picks.dim() != 3 or tuple(picks.shape[:2]) != (b, s_q):
            raise ValueError(f"the indices into {name} must be [{b}, {s_q}, topk], got "
                             f"{None if picks is None else tuple(picks.shape)}")
        if lengths is not None and tuple(lengths.shape) != (b,):
            raise ValueError(f"the topk length of {name} must be [{b}], got {tuple(lengths.shape)}")
    if not 0 < d_v <= 512:
        raise ValueError(f"d_v must be in (0, 512], got {d_v}")
    if attn_sink is not None and tuple(attn_sink.shape) != (h_q,):
        raise ValueError(f"attn_sink must be [{h_q}], got {tuple(attn_sink.shape)}")
    if out_ is not None and (tuple(out_.shape) != (b, s_q, h_q, d_v) or out_.dtype != q.dtype):
        raise ValueError(f"out_ must be [{b}, {s_q}, {h_q}, {d_v}] {q.dtype}, got {tuple(out_.shape)} {out_.dtype}")


@native_lowering("_flashmla_C::sparse_decode_fwd", family="attention", check=check_sparse_decode,
                 ignores=DECODE_SCHEDULE, mutates=("out_",))
def sparse_decode_fwd_native(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None, extra_kv: torch.Tensor | None, extra_indices: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None, d_v: int, sm_scale: float, out_: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """(out `[b, s_q, h_q, d_v]` in q's dtype, written into `out_` when given; lse `[b, h_q, s_q]` fp32,
    None, None): one softmax over the picked rows of `kv` and of `extra_kv`, plus the sink."""
    b, s_q, h_q, _ = q.shape
    keys, valid = [], []
    for cache, picks, lengths in ((kv, indices, topk_length), (extra_kv, extra_indices, extra_topk_length)):
        if cache is None:
            continue
        rows = cache.shape[0] * cache.shape[1]
        # A length is per batch entry: every query token of the entry sees the same number of slots.
        per_token = None if lengths is None else lengths.view(b, 1).expand(b, s_q)
        valid.append(valid_slots(picks, rows, per_token).flatten(0, 1))
        # Only the picked rows are decoded; an index outside the cache reads row 0 and is masked.
        rows_read = read_fp8_ds_mla_slots(cache.view(torch.uint8), picks.long().clamp(0, rows - 1), cache.shape[1])
        keys.append(rows_read.flatten(0, 1))
    out, _, lse = attend_with_sink(q.flatten(0, 1), torch.cat(keys, 1), torch.cat(valid, 1), attn_sink, sm_scale,
                                   d_v)
    out = out.view(b, s_q, h_q, d_v).to(q.dtype)
    lse = lse.view(b, s_q, h_q).transpose(1, 2)
    if out_ is None:
        return out, lse, None, None
    out_.copy_(out)
    return out_, lse, None, None


def check_sparse_prefill(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
    attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None, out_: torch.Tensor | None,
) -> None:
    """The prefill kernel's contract: q `[s_q, h_q, d]`, kv `[s_kv, h_kv, d]`, indices `[s_q, h_kv, topk]`."""
    if q.dim() != 3 or kv.dim() != 3 or q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"q [s_q, h_q, d] and kv [s_kv, h_kv, d] do not fit: {tuple(q.shape)}, {tuple(kv.shape)}")
    s_q, h_q, d_qk = q.shape
    h_kv = kv.shape[1]
    if h_q % h_kv:
        raise ValueError(f"h_q {h_q} is not a multiple of h_kv {h_kv}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (s_q, h_kv):
        raise ValueError(f"indices must be [{s_q}, {h_kv}, topk], got {tuple(indices.shape)}")
    if not 0 < d_v <= d_qk:
        raise ValueError(f"d_v must be in (0, {d_qk}], got {d_v}")
    if topk_length is not None and tuple(topk_length.shape) != (s_q,):
        raise ValueError(f"topk_length must be [{s_q}], got {tuple(topk_length.shape)}")
    if attn_sink is not None and tuple(attn_sink.shape) != (h_q,):
        raise ValueError(f"attn_sink must be [{h_q}], got {tuple(attn_sink.shape)}")
    if out_ is not None and (tuple(out_.shape) != (s_q, h_q, d_v) or out_.dtype != q.dtype):
        raise ValueError(f"out_ must be [{s_q}, {h_q}, {d_v}] {q.dtype}, got {tuple(out_.shape)} {out_.dtype}")


@native_lowering("_flashmla_C::sparse_prefill_fwd", family="attention", check=check_sparse_prefill,
                 mutates=("out_",))
def sparse_prefill_fwd_native(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
    attn_sink: torch.Tensor | None, topk_length: torch.Tensor | None, out_: torch.Tensor | None,
) -> list[torch.Tensor]:
    """[out `[s_q, h_q, d_v]` in q's dtype (written into `out_` when given), max_logits `[s_q, h_q]`,
    lse `[s_q, h_q]`], both fp32; the heads of q are grouped over the kv heads, h_q / h_kv per kv head."""
    s_q, h_q, d_qk = q.shape
    h_kv, topk = kv.shape[1], indices.shape[-1]
    lengths = None if topk_length is None else topk_length.view(s_q, 1).expand(s_q, h_kv)
    valid = valid_slots(indices, kv.shape[0], lengths)
    rows = indices.long().clamp(0, max(kv.shape[0] - 1, 0))
    # keys[t, g, k] = kv[rows[t, g, k], g]
    keys = kv[rows, torch.arange(h_kv, device=kv.device).view(1, h_kv, 1)].float()
    grouped_sink = None if attn_sink is None else attn_sink.view(h_kv, h_q // h_kv).repeat(s_q, 1)
    out, max_logits, lse = attend_with_sink(
        q.reshape(s_q * h_kv, h_q // h_kv, d_qk), keys.reshape(s_q * h_kv, topk, d_qk),
        valid.reshape(s_q * h_kv, topk), grouped_sink, sm_scale, d_v)
    out = out.reshape(s_q, h_q, d_v).to(q.dtype)
    if out_ is not None:
        out = out_.copy_(out)
    return [out, max_logits.reshape(s_q, h_q), lse.reshape(s_q, h_q)]

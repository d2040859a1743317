"""KV-cache family: DeepSeek-V4's fused q-norm + rope + KV-cache insert ops.

Each op, per token t at position p = position_ids[t]:
  - q side: per-head RMSNorm without weight (`q * rsqrt(mean(q**2) + eps)` over the 512 values of a head),
    then GPT-J rope (interleaved pairs (2i, 2i+1)) on the last 64 values of each head;
  - kv side: the same rope on the last 64 values of the 512-wide kv row, then the row is written into the
    paged cache at slot `slot_mapping[t]` (block `slot // cache_block_size`, offset `slot % cache_block_size`);
    slot -1 skips the row. Only the first `slot_mapping.shape[0]` kv rows are written.
`cos_sin_cache [max_position, 64]`: cos of the 32 pair frequencies, then their sin. Math in fp32.

The three cache kinds: "fp8_ds_mla" (uint8 blocks, fp8_ds_mla.py), a plain bf16 `[blocks, block_size, 512]`
cache, and a per-tensor fp8 e4m3 `[blocks, block_size, 512]` cache (value / fp8_scale, saturated).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.fp8_ds_mla import (
    E4M3_MAX,
    LATENT_DIM,
    ROPE_DIM,
    paged_regions,
    scatter_paged_rows,
    write_fp8_ds_mla_slots,
)
from dsv4_compile.lowering.registry import native_lowering

PAIRS = ROPE_DIM // 2


def gptj_rope_tail(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, rope_dim: int
) -> torch.Tensor:
    """`x [T, ..., D]` fp32 with its last `rope_dim` values rotated at `positions [T]`: pair i is (x[2i], x[2i+1])
    of the rope part, turned by the angle whose cos/sin are `cos_sin_cache[p, i]` / `cos_sin_cache[p, rope_dim/2 + i]`.
    Views and reshapes only: trace-time stand-ins call it under Dynamo and a TorchFunctionMode."""
    half = rope_dim // 2
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos_sin[:, :half].reshape(shape), cos_sin[:, half:2 * half].reshape(shape)
    nope = x.shape[-1] - rope_dim
    pairs = x[..., nope:].reshape(*x.shape[:-1], half, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., :nope], rotated], dim=-1)


def gptj_rope(x: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """gptj_rope_tail on DeepSeek-V4's 512-wide latent: the last 64 values rotate."""
    return gptj_rope_tail(x, position_ids, cos_sin_cache, ROPE_DIM)


def normed_roped_q(
    q: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, eps: float, apply_q_norm: bool = True,
    apply_q_rope: bool = True,
) -> torch.Tensor:
    """`q [T, H, 512]` -> fp32, RMS-normalised per head (no weight) and roped, as the flags say."""
    value = q.float()
    if apply_q_norm:
        value = value * torch.rsqrt(value.square().mean(dim=-1, keepdim=True) + eps)
    if apply_q_rope:
        value = gptj_rope(value, position_ids, cos_sin_cache)
    return value


def roped_kv(kv: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """The kv rows the cache receives (the first `slot_mapping.shape[0]`), roped, fp32."""
    count = slot_mapping.shape[0]
    return gptj_rope(kv[:count].float(), position_ids[:count], cos_sin_cache)


def saturate_e4m3(value: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3fn, clamped to +-448 first (a saturating conversion), rounded to nearest even."""
    return value.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def write_row_cache(k_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor,
                    cache_block_size: int) -> None:
    """Scatter `rows [N, 512]` (already in the cache's dtype) into a `[blocks, block_size, 512]` cache."""
    cache = k_cache
    if cache.dtype == torch.float8_e4m3fn:  # moved as bytes: CPU torch has no where/cat for float8
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    scatter_paged_rows(cache, [(0, LATENT_DIM, LATENT_DIM)], rows, slot_mapping, cache_block_size)


# ----------------------------------------------------------------------------- contract checks
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_common(q: torch.Tensor | None, kv: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
                  cos_sin_cache: torch.Tensor) -> None:
    if q is not None:
        _require(q.dim() == 3 and q.shape[-1] == LATENT_DIM, f"q must be [tokens, heads, 512], got {tuple(q.shape)}")
    _require(kv.dim() == 2 and kv.shape[-1] == LATENT_DIM, f"kv must be [tokens, 512], got {tuple(kv.shape)}")
    _require(slot_mapping.dim() == 1 and slot_mapping.shape[0] <= kv.shape[0],
             f"slot_mapping must be [n <= {kv.shape[0]}], got {tuple(slot_mapping.shape)}")
    tokens = max(slot_mapping.shape[0], q.shape[0] if q is not None else 0)
    _require(position_ids.dim() == 1 and position_ids.shape[0] >= tokens,
             f"position_ids must be [n >= {tokens}], got {tuple(position_ids.shape)}")
    _require(position_ids.dtype == torch.int64, f"position_ids must be int64, got {position_ids.dtype}")
    _require(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[-1] == ROPE_DIM,
             f"cos_sin_cache must be [max_position, {ROPE_DIM}], got {tuple(cos_sin_cache.shape)}")


def _check_row_cache(k_cache: torch.Tensor, cache_block_size: int, dtype: torch.dtype) -> None:
    _require(k_cache.dtype == dtype, f"k_cache must be {dtype}, got {k_cache.dtype}")
    _require(k_cache.dim() == 3 and tuple(k_cache.shape[1:]) == (cache_block_size, LATENT_DIM),
             f"k_cache must be [blocks, {cache_block_size}, {LATENT_DIM}], got {tuple(k_cache.shape)}")


def check_quant_insert(
    q_in: torch.Tensor, kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, q_head_padded: int, eps: float, cache_block_size: int,
    apply_q_norm: bool = True, kv_mxfp8: bool = False, apply_q_rope: bool = True, is_q_interleaved: bool = False,
) -> None:
    _require(not kv_mxfp8, "kv_mxfp8=True (MXFP8 kv cache) is not supported: only the fp8_ds_mla UE8M0 layout")
    _require(not is_q_interleaved, "is_q_interleaved=True (chunk-interleaved q layout) is not supported")
    _check_common(q_in, kv, slot_mapping, position_ids, cos_sin_cache)
    _require(q_head_padded >= q_in.shape[1], f"q_head_padded={q_head_padded} is below q's {q_in.shape[1]} heads")
    paged_regions(k_cache, cache_block_size)  # raises ValueError on a cache that cannot hold the layout


def check_full_cache_bf16(
    q: torch.Tensor, kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
    cos_sin_cache: torch.Tensor, eps: float, cache_block_size: int, apply_q_norm: bool = True,
) -> None:
    _check_common(q, kv, slot_mapping, position_ids, cos_sin_cache)
    _check_row_cache(k_cache, cache_block_size, torch.bfloat16)


def check_full_cache_fp8(
    q: torch.Tensor, kv: torch.Tensor, q_fp8: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, fp8_scale: torch.Tensor, q_fp8_scale_inv: torch.Tensor,
    eps: float, cache_block_size: int, apply_q_norm: bool = True,
) -> None:
    _check_common(q, kv, slot_mapping, position_ids, cos_sin_cache)
    _check_row_cache(k_cache, cache_block_size, torch.float8_e4m3fn)
    _require(q_fp8.dtype == torch.float8_e4m3fn and q_fp8.shape == q.shape,
             f"q_fp8 must be float8_e4m3fn shaped like q {tuple(q.shape)}, got {q_fp8.dtype} {tuple(q_fp8.shape)}")
    _require(fp8_scale.numel() == 1 and q_fp8_scale_inv.numel() == 1, "fp8_scale and q_fp8_scale_inv are per-tensor")


def check_kv_rope_insert(
    kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
    cos_sin_cache: torch.Tensor, cache_block_size: int, fp8_scale: torch.Tensor | None = None, kv_mxfp8: bool = False,
) -> None:
    _require(not kv_mxfp8, "kv_mxfp8=True (MXFP8 kv cache) is not supported")
    _check_common(None, kv, slot_mapping, position_ids, cos_sin_cache)
    if k_cache.dtype == torch.uint8:
        paged_regions(k_cache, cache_block_size)
    elif k_cache.dtype == torch.float8_e4m3fn:
        _check_row_cache(k_cache, cache_block_size, torch.float8_e4m3fn)
        _require(fp8_scale is not None and fp8_scale.numel() == 1, "a per-tensor fp8 cache needs fp8_scale")
    else:
        _check_row_cache(k_cache, cache_block_size, torch.bfloat16)


# ----------------------------------------------------------------------------- lowerings
@native_lowering("_C::fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert", mutates=("k_cache",),
                 paged=("k_cache",), check=check_quant_insert)
def qnorm_rope_kv_rope_quant_insert_native(
    q_in: torch.Tensor, kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, q_head_padded: int, eps: float, cache_block_size: int,
    apply_q_norm: bool = True, kv_mxfp8: bool = False, apply_q_rope: bool = True, is_q_interleaved: bool = False,
) -> torch.Tensor:
    """Returns q `[T, q_head_padded, 512]` in q_in's dtype (heads past q_in's are zeros); writes the roped kv
    into the fp8_ds_mla cache `k_cache [blocks, block_bytes]` uint8."""
    q = normed_roped_q(q_in, position_ids, cos_sin_cache, eps, apply_q_norm, apply_q_rope).to(q_in.dtype)
    write_fp8_ds_mla_slots(k_cache, roped_kv(kv, slot_mapping, position_ids, cos_sin_cache), slot_mapping,
                           cache_block_size)
    return torch.nn.functional.pad(q, (0, 0, 0, q_head_padded - q_in.shape[1]))


@native_lowering("_C::fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_bf16_insert", mutates=("q", "k_cache"),
                 check=check_full_cache_bf16)
def qnorm_rope_kv_rope_full_cache_bf16_insert_native(
    q: torch.Tensor, kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
    cos_sin_cache: torch.Tensor, eps: float, cache_block_size: int, apply_q_norm: bool = True,
) -> None:
    """q normed and roped in place; the roped kv rows, in bf16, into `k_cache [blocks, block_size, 512]`."""
    q.copy_(normed_roped_q(q, position_ids, cos_sin_cache, eps, apply_q_norm))
    rows = roped_kv(kv, slot_mapping, position_ids, cos_sin_cache).to(k_cache.dtype)
    write_row_cache(k_cache, rows, slot_mapping, cache_block_size)


@native_lowering("_C::fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_fp8_insert", mutates=("q_fp8", "k_cache"),
                 check=check_full_cache_fp8)
def qnorm_rope_kv_rope_full_cache_fp8_insert_native(
    q: torch.Tensor, kv: torch.Tensor, q_fp8: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, fp8_scale: torch.Tensor, q_fp8_scale_inv: torch.Tensor,
    eps: float, cache_block_size: int, apply_q_norm: bool = True,
) -> None:
    """q_fp8 = e4m3(normed roped q * q_fp8_scale_inv); the roped kv rows as e4m3(kv / fp8_scale) into
    `k_cache [blocks, block_size, 512]` float8_e4m3fn. q itself is left as it was."""
    normed = normed_roped_q(q, position_ids, cos_sin_cache, eps, apply_q_norm)
    q_fp8.copy_(saturate_e4m3(normed * q_fp8_scale_inv.float().reshape(())))
    rows = roped_kv(kv, slot_mapping, position_ids, cos_sin_cache) / fp8_scale.float().reshape(())
    write_row_cache(k_cache, saturate_e4m3(rows), slot_mapping, cache_block_size)


@native_lowering("_C::fused_deepseek_v4_kv_rope_insert", mutates=("k_cache",), check=check_kv_rope_insert)
def kv_rope_insert_native(
    kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor, position_ids: torch.Tensor,
    cos_sin_cache: torch.Tensor, cache_block_size: int, fp8_scale: torch.Tensor | None = None, kv_mxfp8: bool = False,
) -> None:
    """The kv half of the fused ops alone: roped kv into whichever cache kind `k_cache` is (by its dtype)."""
    rows = roped_kv(kv, slot_mapping, position_ids, cos_sin_cache)
    if k_cache.dtype == torch.uint8:
        write_fp8_ds_mla_slots(k_cache, rows, slot_mapping, cache_block_size)
    elif k_cache.dtype == torch.float8_e4m3fn:
        assert fp8_scale is not None  # the contract check requires it
        write_row_cache(k_cache, saturate_e4m3(rows / fp8_scale.float().reshape(())), slot_mapping, cache_block_size)
    else:
        write_row_cache(k_cache, rows.to(k_cache.dtype), slot_mapping, cache_block_size)

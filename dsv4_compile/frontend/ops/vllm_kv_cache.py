"""vLLM's DeepSeek-V4 q-norm + rope + KV-cache insert ops (`_C::fused_deepseek_v4_*`), which only its CUDA
build has: schemas and fakes, so that the NVIDIA attention code traces anywhere. The backend lowers them
(dsv4_compile.lowering.lowerings.kv_cache). The caches and outs they write carry an `(x!)` alias annotation,
each its own alias set.
"""

from __future__ import annotations

import torch


def _quant_insert_fake(
    q_in: torch.Tensor, kv: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, q_head_padded: int, eps: float, cache_block_size: int,
    apply_q_norm: bool = True, kv_mxfp8: bool = False, apply_q_rope: bool = True, is_q_interleaved: bool = False,
) -> torch.Tensor:
    return torch.empty((q_in.shape[0], q_head_padded, q_in.shape[2]), dtype=q_in.dtype, device=q_in.device)


def _writes_only_fake(*args: object, **kwargs: object) -> None:
    return None


DEFINITIONS = [
    (
        "_C::fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert",
        "fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert(Tensor q_in, Tensor kv, Tensor(a!) k_cache, "
        "Tensor slot_mapping, Tensor position_ids, Tensor cos_sin_cache, int q_head_padded, float eps, "
        "int cache_block_size, bool apply_q_norm=True, bool kv_mxfp8=False, bool apply_q_rope=True, "
        "bool is_q_interleaved=False) -> Tensor",
        _quant_insert_fake,
    ),
    (
        "_C::fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_bf16_insert",
        "fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_bf16_insert(Tensor(a!) q, Tensor kv, Tensor(b!) k_cache, "
        "Tensor slot_mapping, Tensor position_ids, Tensor cos_sin_cache, float eps, int cache_block_size, "
        "bool apply_q_norm=True) -> ()",
        _writes_only_fake,
    ),
    (
        "_C::fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_fp8_insert",
        "fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_fp8_insert(Tensor q, Tensor kv, Tensor(a!) q_fp8, "
        "Tensor(b!) k_cache, Tensor slot_mapping, Tensor position_ids, Tensor cos_sin_cache, Tensor fp8_scale, "
        "Tensor q_fp8_scale_inv, float eps, int cache_block_size, bool apply_q_norm=True) -> ()",
        _writes_only_fake,
    ),
    (
        "_C::fused_deepseek_v4_kv_rope_insert",
        "fused_deepseek_v4_kv_rope_insert(Tensor kv, Tensor(a!) k_cache, Tensor slot_mapping, Tensor position_ids, "
        "Tensor cos_sin_cache, int cache_block_size, Tensor? fp8_scale=None, bool kv_mxfp8=False) -> ()",
        _writes_only_fake,
    ),
]
